"""Shared pieces of the benchmark scripts not yet ported to suites (DBB, FFR, Clustered
DreamBooth, DiffInject, the domain model, generation): run one setting, aggregate seeds,
write tables, judge generated images.

The benchmarks that compare methods over seeds are suites (``bench/suites/*.yaml``, run by
``unspur bench``, which pairs every method with ERM through ``unspur.compare``); these
helpers serve the scripts whose generators a suite does not build yet. Benchmarks
measure; tests never assert timings. Every table is written with the command that
produced it and the machine it ran on.
"""

from __future__ import annotations

import argparse
import csv
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unspur.config import load_config
from unspur.pipeline import run

# CPU-sized base settings shared by the benchmark scripts.
SYNTHETIC = [
    "data.name=synthetic",
    "data.options.n_train=2000",
    "model.arch=small_cnn",
    "train.epochs=8",
    "train.lr=0.05",
    "train.augment=false",
]
COLORED_MNIST = [
    "data.name=colored_mnist",
    "data.image_size=28",
    "data.normalize=false",
    "model.arch=mlp",
    "train.epochs=20",
    "train.optimizer=adam",
    "train.lr=0.001",
    "train.weight_decay=0",
    "train.augment=false",
]

#: The UTKFace CPU recipe: balanced evaluation, small CNN, Adam, 6 epochs, no augmentation.
UTKFACE_TRAIN = [
    "data.balance_eval=true",
    "model.arch=small_cnn",
    "train.epochs=6",
    "train.optimizer=adam",
    "train.lr=0.001",
    "train.weight_decay=0",
    "train.batch_size=128",
    "train.augment=false",
]

HEADLINE = ("worst_group_accuracy", "average_accuracy", "balanced_accuracy", "accuracy")


def bench_arguments(
    description: str, stem: str, seeds: str = "0,1,2", methods: list[str] | None = None
) -> argparse.Namespace:
    """The command line every benchmark script shares; sets torch's thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", type=Path, default=None, help="folder like ../shared/data")
    parser.add_argument("--seeds", default=seeds, help="comma-separated seeds")
    parser.add_argument("--only", default=None, help="comma-separated setting names")
    if methods is not None:
        parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--stem", default=stem, help="name of the results files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.seed_list = [int(x) for x in args.seeds.split(",")]
    args.only_list = args.only.split(",") if args.only else None
    return args


def data_overrides(needs: str | None, data_dir: Path | None, name: str) -> list[str] | None:
    """``data.root`` for a setting that needs real data, or None (with a note) to skip it."""
    if needs is None:
        return []
    if data_dir is None or not (data_dir / needs).exists():
        print(f"skip {name}: needs {needs} under --data-dir", file=sys.stderr)
        return None
    return [f"data.root={data_dir / needs}"]


def run_setting(overrides: list[str], seed: int, keep: Path | None = None) -> dict[str, Any]:
    """Train and evaluate one config; returns results.json plus wall seconds."""
    config = load_config(None, overrides + [f"seed={seed}", "train.progress=false"])
    with tempfile.TemporaryDirectory() as tmp:
        out = keep if keep is not None else Path(tmp)
        started = time.perf_counter()
        results = run(config, out)
        results["bench_wall_seconds"] = time.perf_counter() - started
        results["stage_seconds"] = stage_epoch_seconds(out)
    return results


def failure_notes(failures: list[str]) -> list[str]:
    if not failures:
        return []
    return ["## Runs that did not complete", "", "| run | seed | reason |", "|---|---|---|",
            *failures, ""]  # fmt: skip


def stage_epoch_seconds(run_dir: Path) -> dict[str, float]:
    """Mean seconds per training epoch of every stage in a run directory."""
    import json

    seconds = {}
    for history in sorted(run_dir.glob("*/history.json")):
        epochs = json.loads(history.read_text())
        if epochs:
            seconds[history.parent.name] = float(np.mean([e["seconds"] for e in epochs]))
    return seconds


def row(setting: str, seed: int, results: dict[str, Any]) -> dict[str, Any]:
    test = results["metrics"]["test"]
    return {
        "setting": setting,
        "method": results["method"],
        "supervision": results["supervision"]["symbol"],
        "seed": seed,
        **{key: round(100 * test[key], 2) for key in HEADLINE},
        "selection": results["selection"]["rule"],
        "wall_seconds": round(results["bench_wall_seconds"], 1),
    }


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sample std (ddof = 1) over seeds for every (setting, method)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    table = []
    for (setting, method), members in groups.items():
        entry = {"setting": setting, "method": method, "supervision": members[0]["supervision"]}
        for key in ("worst_group_accuracy", "average_accuracy", "balanced_accuracy"):
            values = np.array([m[key] for m in members])
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            entry[key] = f"{values.mean():.1f} ± {spread:.1f}"
        entry["seeds"] = len(members)
        entry["wall_seconds"] = round(float(np.mean([m["wall_seconds"] for m in members])), 1)
        table.append(entry)
    return table


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    return lines


def write_results(
    rows: list[dict[str, Any]], out: Path, stem: str, notes: list[str] | None = None
) -> None:
    """``stem.csv`` (one row per run) and ``stem.md`` (seeds aggregated + all runs)."""
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"# {stem}",
        "",
        f"Command: `python {command}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__}. Test split, percentages; supervision: x none, "
        "✓ validation group labels, ✓✓ train group labels.",
        "",
        "## Mean ± sample std (ddof = 1) over seeds",
        "",
        *markdown(aggregate(rows)),
        "",
        *(notes or []),
        "## Every run",
        "",
        *markdown(rows),
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


class Judges:
    """Shape and background classifiers of the synthetic benchmark, trained on real,
    group-balanced images (an independent draw, data seed 7) of ``table_overrides``'
    benchmark; they judge whether generated images show what their prompt asked for.
    ``accuracy``: each judge's test accuracy on real images, in percent."""

    def __init__(self, table_overrides: list[str], work: Path) -> None:
        from unspur.config import TrainConfig
        from unspur.data.dataset import GroupDataset
        from unspur.data.table import GroupTable
        from unspur.data.transforms import eval_transform
        from unspur.models.factory import build_model
        from unspur.pipeline import prepare_table
        from unspur.train.loop import fit

        balanced = table_overrides + ["data.options.bias=0.5", "data.options.seed=7"]
        table = prepare_table(load_config(None, balanced))
        swapped = GroupTable(
            frame=table.frame.assign(y=table.frame["a"], a=table.frame["y"]),
            store=table.store,
            class_names=table.attr_names,
            attr_names=table.class_names,
            name="background",
        )
        self.transform = eval_transform(32, 1.0, True)
        config = TrainConfig(epochs=6, batch_size=64, optimizer="adam", lr=1e-3,
                             weight_decay=0, augment=False, progress=False,
                             selection="average")  # fmt: skip
        self.models, self.accuracy = {}, {}
        for what, source in (("shape", table), ("background", swapped)):
            model = build_model("small_cnn", source.n_classes)
            fit(model, GroupDataset(source.split("train"), self.transform),
                GroupDataset(source.split("val"), self.transform), config,
                work / f"judge_{what}", seed=0, val_group_labels=False)  # fmt: skip
            model.eval()
            test = GroupDataset(source.split("test"), self.transform)
            with torch.no_grad():
                pred = torch.cat(
                    [model(x).argmax(1) for x, *_ in torch.utils.data.DataLoader(test, 256)]
                )
            self.accuracy[what] = round(100 * float((pred == test.y).float().mean()), 1)
            self.models[what] = model
        self.class_names, self.attr_names = table.class_names, table.attr_names

    @torch.no_grad()
    def __call__(self, images) -> dict[str, np.ndarray]:
        """Each judge's predicted label (shape = class, background = attribute) per image."""
        x = torch.stack([self.transform(im) for im in images])
        return {
            what: torch.cat([m(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()
            for what, m in self.models.items()
        }
