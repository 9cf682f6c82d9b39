"""Benchmark: ERM on the synthetic benchmark, Colored MNIST and UTKFace, on CPU.

Writes a table of worst-group accuracy, average accuracy and wall time to
``bench/results/erm_baseline.md`` (and ``.csv``) together with the command that made it.

    python bench/erm_baseline.py --data-dir ../shared/data [--seeds 0] [--only synthetic-99]

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from unspur.config import load_config
from unspur.pipeline import run

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
    "train.selection=last",
]

# name -> (config overrides, the path it needs under --data-dir)
SETTINGS: dict[str, tuple[list[str], str | None]] = {
    "synthetic-95": (SYNTHETIC + ["data.options.bias=0.95"], None),
    "synthetic-99": (SYNTHETIC + ["data.options.bias=0.99"], None),
    "colored_mnist-1%": (COLORED_MNIST + ["data.options.conflict_ratio=0.01"], "mnist"),
    "colored_mnist-5%": (COLORED_MNIST + ["data.options.conflict_ratio=0.05"], "mnist"),
    "utkface-gender-age-99": (
        [
            "data.name=utkface",
            "data.options.target=gender",
            "data.options.bias=age",
            "data.image_size=64",
            "data.balance_eval=true",
            "model.arch=resnet18",
            "train.epochs=5",
            "train.optimizer=adam",
            "train.lr=0.001",
            "train.batch_size=64",
            "train.weight_decay=0",
        ],
        "utkface/UTKFace.tar.gz",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder like ../shared/data")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--only", default=None, help="comma-separated setting names")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(SETTINGS)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in names:
        overrides, needs = SETTINGS[name]
        if needs is not None:
            if args.data_dir is None or not (args.data_dir / needs).exists():
                print(f"skip {name}: needs {needs} under --data-dir", file=sys.stderr)
                continue
            overrides = overrides + [f"data.root={args.data_dir / needs}"]
        for seed in seeds:
            config = load_config(None, overrides + [f"seed={seed}", "train.progress=false"])
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                results = run(config, tmp)
                seconds = time.perf_counter() - started
            test = results["metrics"]["test"]
            rows.append(
                {
                    "setting": name,
                    "seed": seed,
                    "worst_group_accuracy": round(100 * test["worst_group_accuracy"], 2),
                    "average_accuracy": round(100 * test["average_accuracy"], 2),
                    "balanced_accuracy": round(100 * test["balanced_accuracy"], 2),
                    "accuracy": round(100 * test["accuracy"], 2),
                    "selection": results["selection"]["rule"],
                    "wall_seconds": round(seconds, 1),
                }
            )
            print(rows[-1], flush=True)
    write(rows, args.out, "erm_baseline", " ".join(shlex.quote(a) for a in sys.argv))
    return 0


def write(rows: list[dict], out: Path, stem: str, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        return
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |"
    lines = [
        f"# {stem}",
        "",
        f"Command: `python {command}`",
        "",
        f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
        "test split, percentages.",
        "",
        header,
        "|" + "---|" * len(rows[0]),
    ]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
