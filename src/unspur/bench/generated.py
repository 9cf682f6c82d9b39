"""Measurements of the images a run generated: a sample grid, and trained judges' verdicts.

Every generative method (USB, ASB, FFR, DBB, Clustered DreamBooth, DiffInject) keeps its
images in a :class:`~unspur.generate.store.SyntheticStore` under its run directory; each
manifest row records the group ``(y, a)`` the image was asked to show. Two measurements
read them (was ``bench/clustered_dreambooth.py``'s, ``bench/ffr.py``'s,
``bench/domain_model.py``'s and ``bench/shipped_generators.py``'s judging loops, now one):

* ``samples``: a PNG grid, one row per requested group, of the first kept images, written
  into the run directory and published next to the table (:mod:`unspur.bench.artefacts`).
* ``judge_verdicts``: the class and the bias attribute of every kept image as
  ``build: judge`` assets of the suite see them (classifiers trained on real images,
  :func:`unspur.bench.assets.build_judge`), against what was asked: overall and per
  requested group. A judge is trained by the suite, never here; the synthetic
  benchmark's background is also judged by a fixed rule (``generated_judged``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unspur.bench.artefacts import Artefact
from unspur.bench.measurements import _judge, register
from unspur.generate.store import run_store_rows
from unspur.report.samples import group_names

#: Images per group in a sample grid, their enlargement and the grid's padding (our
#: choice, as the legacy grids: 12 images, 3x nearest-neighbour).
GRID_IMAGES, GRID_SCALE, GRID_PAD, LABEL_WIDTH = 12, 3, 2, 110
SAMPLES_FILE = "samples.png"


#: A method's own selection of its store's images, written beside the store: file name
#: and the column that marks an image chosen (Clustered DreamBooth's CLIP filter; DBB's
#: pruning in its chosen mode, whose ``used`` can differ from the store's ``kept``, the
#: paper's two conditions, e.g. under ``pruning: none``).
METHOD_SELECTIONS = (("filter.csv", "selected"), ("candidates.csv", "used"))


def generated_rows(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(store root, manifest row) of every image the run generated and trains on: the
    store's ``kept``, unless the method records its own selection beside the store (see
    :data:`METHOD_SELECTIONS`), which then decides; stores in path order, rows in request
    order."""
    found = []
    for root, rows in run_store_rows(run_dir):
        chosen = _selected(root.parent)
        if chosen is not None:
            rows = [r for r in rows if str(r["key"]) in chosen]
        elif any("kept" in r for r in rows):
            rows = [r for r in rows if r.get("kept")]
        found += [(root, r) for r in rows if (root / str(r.get("filename", ""))).is_file()]
    return found


def _selected(folder: Path) -> set[str] | None:
    """The keys a method's own selection beside its store chose (the first file of
    :data:`METHOD_SELECTIONS` found with ``key`` and its column), or None."""
    import pandas as pd

    for name, column in METHOD_SELECTIONS:
        path = folder / name
        if not path.is_file():
            continue
        frame = pd.read_csv(path)
        if not {"key", column} <= set(frame.columns):
            continue
        chosen = frame[column].astype(str).str.strip().str.lower().isin(("true", "1", "1.0"))
        return set(frame.loc[chosen, "key"].astype(str))
    return None


def sample_grid(rows: list[tuple[Path, dict[str, Any]]], names: dict, path: Path) -> None:
    """One row per requested group ``(y, a)``, its first :data:`GRID_IMAGES` images,
    enlarged without smoothing, the group's name at the left."""
    from PIL import Image, ImageDraw

    groups: dict[tuple[int, int], list[Path]] = {}
    for root, row in rows:
        groups.setdefault((int(row["y"]), int(row["a"])), []).append(root / str(row["filename"]))
    with Image.open(rows[0][0] / str(rows[0][1]["filename"])) as first:
        size = first.size[0] * GRID_SCALE
    width = max(len(v[:GRID_IMAGES]) for v in groups.values())
    canvas = Image.new(
        "RGB",
        (
            LABEL_WIDTH + width * (size + GRID_PAD) + GRID_PAD,
            len(groups) * (size + GRID_PAD) + GRID_PAD,
        ),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for r, (group, files) in enumerate(sorted(groups.items())):
        top = GRID_PAD + r * (size + GRID_PAD)
        label = names.get(group, f"y={group[0]}, a={group[1]}")
        draw.text((4, top + size // 2 - 5), f"{label} ({len(files)})", fill="black")
        for c, file in enumerate(files[:GRID_IMAGES]):
            with Image.open(file) as image:
                tile = image.convert("RGB").resize((size, size), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + GRID_PAD + c * (size + GRID_PAD), top))
    canvas.save(path)


@register("samples")
def samples(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """A grid of the run's generated (kept) images, a row per requested group with its
    name and image count; published next to the table for each method's first seed.
    Empty for a run that generated nothing."""
    path = run_dir / SAMPLES_FILE
    if not path.is_file():
        rows = generated_rows(run_dir)
        if not rows:
            return {}
        sample_grid(rows, group_names(results), path)
    return {"samples": Artefact(path)}


@register("judge_verdicts")
def judge_verdicts(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The run's generated (kept) images judged by the suite's ``build: judge`` assets
    that the setting ``uses``: the share (percent) whose class (``target: y`` judge) and
    bias attribute (``target: a`` judge) are what the image was asked to show, over all
    images, and both together per requested group (``as asked: circle / water``); and
    each judge's accuracy on its own real validation images (its record), which bounds
    how far its verdicts can be trusted. Empty without judges or generated images."""
    import torch
    from PIL import Image

    judges = [j for j in map(_judge, (results.get("bench_assets") or {}).values()) if j]
    rows = generated_rows(run_dir) if judges else []
    if not rows:
        return {}
    verdicts: dict[str, np.ndarray] = {}
    for model, transform, record in judges:
        predicted = []
        with torch.no_grad():
            for start in range(0, len(rows), 256):
                batch = []
                for root, row in rows[start : start + 256]:
                    with Image.open(root / str(row["filename"])) as image:
                        batch.append(transform(image.convert("RGB")))
                predicted.append(model(torch.stack(batch)).argmax(1).numpy())
        target = record["target"]
        asked = np.array([int(row[target]) for _, row in rows])
        verdicts[target] = np.concatenate(predicted) == asked
    names = group_names(results)
    columns: dict[str, Any] = {"judged images": len(rows)}
    accuracy = {record["target"]: record.get("val_accuracy") for _, _, record in judges}
    for target, what in (("y", "class"), ("a", "attribute")):
        if target in verdicts:
            columns[f"{what} as asked (judge)"] = 100.0 * float(verdicts[target].mean())
            if accuracy.get(target) is not None:  # how far the judge reads real images
                columns[f"{what} judge, real val acc."] = 100.0 * float(accuracy[target])
    both = np.logical_and.reduce(list(verdicts.values()))
    groups = np.array([(int(r["y"]), int(r["a"])) for _, r in rows])
    for group in sorted({tuple(g) for g in groups.tolist()}):
        members = (groups == group).all(axis=1)
        label = names.get(group, f"y={group[0]}, a={group[1]}")
        columns[f"as asked: {label}"] = 100.0 * float(both[members].mean())
    return columns


@register("synthetic_budget")
def synthetic_budget(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """How many synthetic images a USB / ASB / FFR run used (``budget.json``, was
    ``bench/ffr.py``'s budget table): the total and per group (real / synthetic, in group
    order). Empty for other runs."""
    import json

    for path in sorted(run_dir.glob("*/budget.json")):
        try:
            budget = json.loads(path.read_text()).get("budget") or {}
        except (OSError, ValueError, AttributeError):
            continue
        groups = budget.get("groups") or []
        if "synthetic_total" not in budget:
            continue
        return {
            "synthetic images": int(budget["synthetic_total"]),
            "real / synthetic per group": ", ".join(
                f"{g.get('name', g.get('group'))}: {g.get('real')} / {g.get('synthetic')}"
                for g in groups
            ),
        }
    return {}
