"""Measurements: what a benchmark table reports besides accuracy.

A measurement is a function ``(run_dir, results) -> {column: value}`` registered under a
name; a suite lists the names it wants (``measurements: [timing, mac_mask_quality]``) and
the runner adds their columns to the table (numbers: mean ± sample std over seeds). A
measurement that does not apply to a run (MaC's mask quality on a DFR run) returns ``{}``.
Measurements read what a run left in its directory; they never train anything.

    from unspur.bench.measurements import register

    @register("my_column")
    def my_column(run_dir, results):
        return {"my value": 1.0}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unspur.errors import ConfigError, did_you_mean

Measurement = Callable[[Path, dict[str, Any]], dict[str, Any]]
MEASUREMENTS: dict[str, Measurement] = {}


def register(name: str) -> Callable[[Measurement], Measurement]:
    """Register ``function`` as measurement ``name`` (a name is registered once)."""

    def add(function: Measurement) -> Measurement:
        if name in MEASUREMENTS:
            raise ValueError(f"measurement {name!r} is registered twice")
        MEASUREMENTS[name] = function
        return function

    return add


def get_measurement(name: str) -> Measurement:
    if name not in MEASUREMENTS:
        raise ConfigError(
            f"unknown measurement {name!r}{did_you_mean(name, MEASUREMENTS)}; "
            f"available: {', '.join(sorted(MEASUREMENTS))}"
        )
    return MEASUREMENTS[name]


def measure(names: list[str], run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Every listed measurement's columns for one run, in the order listed."""
    columns: dict[str, Any] = {}
    for name in names:
        columns.update(get_measurement(name)(Path(run_dir), results))
    return columns


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def epoch_seconds(stage_dir: Path) -> float | None:
    """Mean seconds of one training epoch of a stage (its ``history.json``), or None."""
    history = _read_json(stage_dir / "history.json")
    seconds = [e["seconds"] for e in history or [] if isinstance(e, dict) and "seconds" in e]
    return float(np.mean(seconds)) if seconds else None


@register("timing")
def timing(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Wall seconds of the run (earlier interrupted invocations included), CPU seconds of
    the process that trained it (``cost.json``; absent for a run resumed after an
    interruption only in part), and the mean epoch seconds of its first trained stage."""
    cost = _read_json(run_dir / "cost.json") or {}
    stages = results.get("stages") or []
    epoch = epoch_seconds(run_dir / stages[0]) if stages else None
    return {
        "wall s": results.get("wall_seconds"),
        "CPU s": cost.get("cpu_seconds"),
        "epoch s": epoch,
    }


@register("head_epoch_cost")
def head_epoch_cost(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """For a method that trains on a reference ERM model (DFR, LLR): the cost of its
    cheapest stage's epoch relative to an epoch of that ERM model (goal: at most 0.05)."""
    reference = (results.get("config") or {}).get("method", {}).get("reference")
    if not reference:
        return {}
    erm = epoch_seconds(Path(reference).parent / "erm")
    own = [epoch_seconds(run_dir / s) for s in results.get("stages") or [] if s != "erm"]
    own = [s for s in own if s is not None]
    if erm is None or not own or erm <= 0:
        return {}
    return {"head epoch / ERM epoch": min(own) / erm}


@register("mac_mask_quality")
def mac_mask_quality(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """MaC's mask quality against the dataset's exact object masks (the MaC paper's
    Table 1), all training images: mean min-max-scaled saliency inside / outside the core
    (``saliency_fg`` / ``saliency_bg``) and the share of core / background pixels inside
    MaC's mask (``mask_fg`` / ``mask_bg``). Empty for runs without exact masks."""
    import pandas as pd

    path = run_dir / "mac" / "mask_quality.csv"
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    everything = frame[frame["name"] == "all"]
    if everything.empty:
        return {}
    row = everything.iloc[0]
    return {
        c: float(row[c]) for c in ("saliency_fg", "saliency_bg", "mask_fg", "mask_bg") if c in row
    }


@register("dbb_pruning")
def dbb_pruning(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """DBB's generated and pruned images (the DBB paper's Table 2), summed over classes:
    candidates generated, passing the softmax (psi, Eq. 3) and the attribution (rho,
    Eq. 4-5) condition, kept by the paper's rule (both), and used by the variant."""
    statistics = _read_json(run_dir / "dbb" / "statistics.json")
    if not isinstance(statistics, dict) or not statistics.get("classes"):
        return {}
    names = {
        "generated": "generated",
        "pass_psi": "pass psi",
        "pass_rho": "pass rho",
        "kept_paper_rule": "kept (paper)",
        "used": "used",
    }
    return {
        column: sum(int(c.get(key, 0)) for c in statistics["classes"])
        for key, column in names.items()
    }


@register("bg_probe")
def bg_probe(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """FFR's (B, G) diagnostic: mean over groups of a linear probe's accuracy telling real
    from synthetic images in the final model's features (0.5 = chance, i.e. mixed), from
    the ``probe.json`` an FFR / USB / ASB run writes in its method folder."""
    for path in sorted(run_dir.glob("*/probe.json")):
        record = _read_json(path)
        if isinstance(record, dict) and record.get("mean_accuracy") is not None:
            return {"real-vs-synthetic probe": float(record["mean_accuracy"])}
    return {}


@register("mac_search")
def mac_search(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """MaC's (alpha, beta): chosen on validation worst-group accuracy with ``search:
    true`` (``search.json``), else the fixed values (``mac.json``)."""
    for name in ("search.json", "mac.json"):
        chosen = _read_json(run_dir / "mac" / name)
        if isinstance(chosen, dict) and "alpha" in chosen:
            return {"alpha": f"{chosen['alpha']:g}", "beta": f"{chosen['beta']:g}"}
    return {}
