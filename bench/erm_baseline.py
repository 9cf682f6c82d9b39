"""Benchmark: ERM on the synthetic benchmark, Colored MNIST and UTKFace, on CPU.

Writes a table of worst-group accuracy, average accuracy and wall time to
``bench/results/erm_baseline.md`` (and ``.csv``) together with the command that made it.

    python bench/erm_baseline.py --data-dir ../shared/data [--seeds 0] [--only synthetic-99]

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import COLORED_MNIST, SYNTHETIC, data_overrides, row, run_setting, write_results  # noqa: E402

# LfF and DiffInject report the last epoch on Colored MNIST.
CMNIST_LAST = COLORED_MNIST + ["train.selection=last"]

# name -> (config overrides, the path it needs under --data-dir)
SETTINGS: dict[str, tuple[list[str], str | None]] = {
    "synthetic-95": (SYNTHETIC + ["data.options.bias=0.95"], None),
    "synthetic-99": (SYNTHETIC + ["data.options.bias=0.99"], None),
    "colored_mnist-1%": (CMNIST_LAST + ["data.options.conflict_ratio=0.01"], "mnist"),
    "colored_mnist-5%": (CMNIST_LAST + ["data.options.conflict_ratio=0.05"], "mnist"),
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
    parser.add_argument("--stem", default="erm_baseline", help="name of the results files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.only.split(",") if args.only else list(SETTINGS):
        overrides, needs = SETTINGS[name]
        extra = data_overrides(needs, args.data_dir, name)
        if extra is None:
            continue
        for seed in [int(s) for s in args.seeds.split(",")]:
            rows.append(row(name, seed, run_setting(overrides + extra, seed)))
            print(rows[-1], flush=True)
    write_results(rows, args.out, args.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
