"""Benchmark: the group-robustness baselines side by side, like the papers' tables.

For every setting and seed, ERM is trained first; the last-layer methods (DFR, LLR)
reuse that ERM model as their reference (``method.reference``), as in their papers, so
each comparison is paired. Writes ``bench/results/baselines.md`` / ``.csv`` with mean ±
std over seeds and each method's supervision, plus the cost of a last-layer epoch
relative to an ERM epoch (goal: at most 0.05).

    python bench/baselines.py --data-dir ../shared/data --seeds 0,1,2
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from unspur.methods import get_method

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    COLORED_MNIST,
    SYNTHETIC,
    UTKFACE_TRAIN,
    bench_arguments,
    failure_notes,
    paired_runs,
    row,
    write_results,
)

UTKFACE = [
    "data.name=utkface",
    "data.options.target=gender",
    "data.options.bias=age",
    "data.image_size=48",
    *UTKFACE_TRAIN,
]
SETTINGS: dict[str, tuple[list[str], str | None]] = {
    "synthetic-99": (SYNTHETIC + ["data.options.bias=0.99"], None),
    "colored_mnist-1%": (COLORED_MNIST + ["data.options.conflict_ratio=0.01"], "mnist"),
    "utkface-99.9": (UTKFACE + ["data.bias_ratio=0.999"], "utkface"),
    "utkface-natural": (UTKFACE, "utkface"),
}
METHODS = [
    "erm",
    "groupdro",
    "resample_group",
    "reweight_group",
    "jtt",
    "lff",
    "dfr_val",
    "llr_all",
    "llr_b",
]


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0], "baselines", methods=METHODS)
    methods = args.methods.split(",")
    rows, cost_ratios, failures = [], [], []
    seeds, only = args.seed_list, args.only_list
    for name, seed, method, results, _ in paired_runs(
        SETTINGS, only, methods, seeds, args.data_dir, failures
    ):
        head = {k: v for k, v in results["stage_seconds"].items() if k != "erm"}
        if get_method(method).uses_reference and head and results["erm_epoch_seconds"]:
            cost_ratios.append((name, method, min(head.values()) / results["erm_epoch_seconds"]))
        rows.append(row(name, seed, results))
        print(rows[-1], flush=True)
        write_results(rows, args.out, args.stem, cost_notes(cost_ratios) + failure_notes(failures))
    return 0


def cost_notes(cost_ratios: list[tuple[str, str, float]]) -> list[str]:
    notes = []
    if cost_ratios:
        notes = [
            "## Last-layer epoch cost relative to an ERM epoch (features cached once)",
            "",
            "| setting | method | ratio (mean over seeds) |",
            "|---|---|---|",
        ]
        keys = sorted({(s, m) for s, m, _ in cost_ratios})
        for s, m in keys:
            ratio = np.mean([r for s2, m2, r in cost_ratios if (s2, m2) == (s, m)])
            notes.append(f"| {s} | {m} | {ratio:.3f} |")
        notes.append("")
    return notes


if __name__ == "__main__":
    sys.exit(main())
