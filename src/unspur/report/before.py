"""The "before" of a run report: the ERM model the method is compared with.

A run records its ERM reference in ``results.json`` (``reference``) when it has one:
methods that start from ERM (DFR, last-layer retraining, ...), or any run given
``method.reference``. A method trained from scratch (GroupDRO, JTT, ...) has none, but
inside a comparison (``unspur compare``, runs in ``OUT/<method>/seed<k>/``) the ERM run
of the same seed sits beside it at ``OUT/erm/seed<k>/``: when that run used the same
data config and seed, its test and validation metrics are the "before" of this run
(same images, same splits, same evaluation). Otherwise the report says how to get one.
"""

from __future__ import annotations

import json
import shlex
from html import escape
from pathlib import Path
from typing import Any


def sibling_erm(run_dir: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """The ERM run beside ``run_dir`` in a comparison, as a ``reference`` record, or None.

    Only a finished ERM run (``results.json``) on the same data config and seed counts:
    anything else would not be a before/after pair on the same images.
    """
    method = str(results.get("method", ""))
    if method == "erm" or run_dir.parent.name != method:
        return None
    erm_dir = run_dir.parent.parent / "erm" / run_dir.name
    try:
        erm = json.loads((erm_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(erm, dict) or erm.get("method") != "erm":
        return None
    same_data = (erm.get("config") or {}).get("data") == (results.get("config") or {}).get("data")
    if not same_data or erm.get("seed") != results.get("seed") or not erm.get("metrics"):
        return None
    return {
        "method": "erm",
        "model": str(erm_dir / "model"),
        "metrics": erm["metrics"],
        "source": "the ERM run of the same comparison (same data config and seed)",
    }


def find_reference(run_dir: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    """The run's own ERM reference, else the comparison's ERM run beside it, else None."""
    if str(results.get("method", "")) == "erm":
        return None
    return results.get("reference") or sibling_erm(run_dir, results)


def how_to_get_before(run_dir: Path, results: dict[str, Any]) -> str:
    """A note (HTML) on how to get ERM "before" bars for a run that has none."""
    method = str(results.get("method", "METHOD"))
    seed = results.get("seed", 0)
    config = run_dir / "config.yaml"
    command = shlex.join(
        [
            "unspur",
            "compare",
            "--config",
            str(config) if config.is_file() else "CONFIG.yaml",
            "--methods",
            f"erm,{method}",
            "--seeds",
            str(seed),
            "--out",
            f"{run_dir}-vs-erm",
        ]
    )
    return (
        "<p class='note'>No ERM \"before\" bars: this run has no ERM reference. To see "
        f"{escape(method)} next to ERM on the same data and seed, run:</p>"
        f"<pre>{escape(command)}</pre>"
        f"<p class='note'>The report of its <code>{escape(method)}/seed{escape(str(seed))}</code> "
        "run then shows both. Or give a new run a trained ERM model to compare with: "
        "<code>--set method.reference=ERM_RUN/model</code>.</p>"
    )
