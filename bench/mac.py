"""Benchmark: MaC (Mask and Combine) against ERM, DFR (dfr_val) and MaskTune.

For every setting and seed ERM is trained first; DFR, MaskTune and MaC reuse that ERM
model as their reference (``method.reference``), so every comparison is paired. MaC
needs a convolutional model for xGradCAM: Colored MNIST therefore uses
``model.arch=small_cnn`` here instead of the usual LfF MLP (its numbers are not
comparable to the MLP rows of ``baselines.md``). The synthetic benchmark has exact core
masks, so the quality of MaC's xGradCAM masks (the paper's Table 1: saliency and mask
coverage in foreground and background, per group) is reported too, averaged over seeds.
Writes ``bench/results/mac.md`` / ``.csv``.

    python bench/mac.py --data-dir ../shared/data --seeds 0,1,2
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    COLORED_MNIST,
    SYNTHETIC,
    bench_arguments,
    failure_notes,
    markdown,
    paired_runs,
    row,
    write_results,
)

SETTINGS: dict[str, tuple[list[str], str | None]] = {
    "synthetic-99": (SYNTHETIC + ["data.options.bias=0.99"], None),
    # MaC needs a conv layer for xGradCAM: small_cnn instead of the LfF MLP.
    "colored_mnist-1%": (
        COLORED_MNIST + ["data.options.conflict_ratio=0.01", "model.arch=small_cnn"],
        "mnist",
    ),
}
METHODS = ["erm", "dfr_val", "masktune", "mac"]


def quality_notes(tables: list[pd.DataFrame]) -> list[str]:
    """Mean over seeds of MaC's mask-quality table (synthetic, ground-truth masks)."""
    if not tables:
        return []
    frame = pd.concat(tables)
    columns = ["saliency_fg", "saliency_bg", "mask_fg", "mask_bg"]
    mean = frame.groupby(["group", "name"], sort=True)[columns].mean().reset_index()
    mean = mean.sort_values("group", key=lambda s: s.where(s >= 0, 10**6))
    rows = [{"group": r["name"], **{c: f"{r[c]:.3f}" for c in columns}} for _, r in mean.iterrows()]
    return [
        "## MaC mask quality on synthetic-99 (xGradCAM of the ERM model vs exact core masks)",
        "",
        f"Mean over {len(tables)} seed(s), training images. saliency_fg / saliency_bg: mean "
        "min-max-scaled xGradCAM inside / outside the core object; mask_fg / mask_bg: "
        "fraction of core / background pixels inside MaC's top-K mask (paper's fraction "
        "15000/224^2 = 29.9% of the pixels).",
        "",
        *markdown(rows),
        "",
    ]


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0], "mac", methods=METHODS)
    methods = args.methods.split(",")
    rows, quality, failures = [], [], []
    seeds, only = args.seed_list, args.only_list
    for name, seed, method, results, run_dir in paired_runs(
        SETTINGS, only, methods, seeds, args.data_dir, failures
    ):
        csv = run_dir / "mac" / "mask_quality.csv"
        if method == "mac" and csv.is_file():
            quality.append(pd.read_csv(csv).assign(seed=seed))
        rows.append(row(name, seed, results))
        print(rows[-1], flush=True)
    notes = [
        "MaC: xGradCAM masks of the ERM model, alpha = beta = 1 (search off), Adam 5e-3, "
        "StepLR 5/0.5, batch 32, 20 head epochs, interventions per batch. Colored MNIST "
        "uses model.arch=small_cnn (MaC needs a conv layer).",
        "",
        *quality_notes(quality),
        *failure_notes(failures),
    ]
    write_results(rows, args.out, args.stem, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
