"""Benchmark: ERM on the synthetic benchmark, Colored MNIST and UTKFace, on CPU.

Writes a table of worst-group accuracy, average accuracy and wall time to
``bench/results/erm_baseline.md`` (and ``.csv``) together with the command that made it.

    python bench/erm_baseline.py --data-dir ../shared/data [--seeds 0] [--only synthetic-99]

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    COLORED_MNIST,
    SYNTHETIC,
    bench_arguments,
    data_overrides,
    row,
    run_setting,
    write_results,
)

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


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0], "erm_baseline", seeds="0")
    rows = []
    for name in args.only_list or list(SETTINGS):
        overrides, needs = SETTINGS[name]
        extra = data_overrides(needs, args.data_dir, name)
        if extra is None:
            continue
        for seed in args.seed_list:
            rows.append(row(name, seed, run_setting(overrides + extra, seed)))
            print(rows[-1], flush=True)
    write_results(rows, args.out, args.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
