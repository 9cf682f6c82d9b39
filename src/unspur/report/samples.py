"""Sample grids of the generated images of a run, for run and comparison reports.

Every generative method (FFR, USB, ASB, DBB, Clustered DreamBooth, DiffInject) keeps its
images in a :class:`~unspur.generate.store.SyntheticStore` somewhere under its run
directory (``<root>/manifest/part-*.jsonl`` plus ``<root>/images/``). This module finds
those stores and shows, per store, up to ``per_group`` images of every ``(y, a)`` group
in request order (the first images, so the grid is the same on every render), each with
the prompt it was generated from. A reader sees at a glance whether the generator drew
what the method asked for.

Images are embedded as data URIs (the page stays self-contained) and shown enlarged
without smoothing (the synthetic benchmark's images are 32 px). Every string that
comes from a manifest (prompts, group names, paths) is escaped.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from unspur.data.store import safe_join
from unspur.errors import UnspurError
from unspur.generate.store import run_store_rows

#: Images shown per group and store: one row of a readable grid (our choice).
PER_GROUP = 8
#: Shown width of each image in CSS pixels (4x a 32-px image; our choice).
CELL_PX = 96


def group_names(results: dict[str, Any]) -> dict[tuple[int, int], str]:
    """``(y, a) -> "circle / water"`` from the run's recorded group counts, when present
    (group ``g = y * n_attrs + a``, the canonical table's numbering)."""
    records = (results.get("data") or {}).get("group_counts") or []
    attributes = list(dict.fromkeys(str(r.get("a")) for r in records))
    names: dict[tuple[int, int], str] = {}
    for r in records:
        if "g" in r and attributes:
            g = int(r["g"])
            names[(g // len(attributes), g % len(attributes))] = f"{r.get('y')} / {r.get('a')}"
    return names


def _image(root: Path, filename: str, title: str) -> str:
    try:
        path = safe_join(root, filename)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except (OSError, UnspurError):
        return "<td>missing</td>"
    return (
        f'<td><img src="data:image/png;base64,{data}" alt="{escape(title, quote=True)}" '
        f'title="{escape(title, quote=True)}" width="{CELL_PX}" height="{CELL_PX}" '
        'style="image-rendering: pixelated"></td>'
    )


def store_grid(
    root: Path,
    rows: list[dict[str, Any]],
    names: dict[tuple[int, int], str] | None = None,
    per_group: int = PER_GROUP,
    label: str = "",
) -> str:
    """The HTML of one store's grid: a row per ``(y, a)`` group, its first images.

    ``kept`` images only (what the method trained on) when the store records any;
    otherwise every image. Empty string when the store holds no image.
    """
    if any(r.get("kept", True) for r in rows):
        rows = [r for r in rows if r.get("kept", True)]
    if not rows:
        return ""
    names = names or {}
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((int(row["y"]), int(row["a"])), []).append(row)
    lines = [
        f"<p><b>{escape(label or root.name)}</b>: {len(rows)} image(s), the first "
        f"{per_group} of each group (label y, attribute a of the generated image); "
        "hover for the prompt.</p>",
        "<table><tbody>",
    ]
    for (y, a), members in sorted(groups.items()):
        group = names.get((y, a), f"y={y}, a={a}")
        # DiffInject's images have no prompt (None): show nothing rather than "None".
        prompts = sorted({str(r.get("prompt") or "") for r in members[:per_group]} - {""})
        cells = "".join(
            _image(root, str(r["filename"]), str(r.get("prompt") or ""))
            for r in members[:per_group]
        )
        lines.append(
            f"<tr><td class='l'>{escape(group)} ({len(members)})<br>"
            f"<span class='note'>{escape('; '.join(prompts[:2]))}</span></td>{cells}</tr>"
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def run_grids(run_dir: Path, results: dict[str, Any], per_group: int = PER_GROUP) -> str:
    """The grids of every store below ``run_dir`` ('' when it has none)."""
    names = group_names(results)
    parts = []
    for root, rows in run_store_rows(run_dir):
        where = root.relative_to(run_dir).as_posix()
        grid = store_grid(root, rows, names, per_group, label=where)
        if grid:
            parts.append(grid)
    return "\n".join(parts)
