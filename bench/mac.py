"""Benchmark: MaC (Mask and Combine) against ERM, DFR (dfr_val) and MaskTune.

For every setting and seed ERM is trained first; DFR, MaskTune and MaC reuse that ERM
model as their reference (``method.reference``), so every comparison is paired. MaC
needs a convolutional model for xGradCAM: Colored MNIST therefore uses
``model.arch=small_cnn`` here instead of the usual LfF MLP (its numbers are not
comparable to the MLP rows of ``baselines.md``). The synthetic benchmark has exact core
masks, so the quality of MaC's xGradCAM masks (the paper's Table 1: saliency and mask
coverage in foreground and background, per group) is reported too, averaged over seeds.
Writes ``bench/results/mac.md`` / ``.csv``. The default methods run MaC as the paper
does (interventions drawn afresh for every batch); the ``*_views4`` variants use 4
precomputed views per image, a speed option for the CPU (what the recorded results
used, see ``VIEWS4``).

    python bench/mac.py --threads 1 --data-dir ../shared/data --seeds 0,1,2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from unspur.methods import available_methods

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
    # The same digits and groups with the colour behind a white digit: the bias lies
    # outside the core, as MaC's interventions assume.
    "colored_mnist-bg-1%": (
        COLORED_MNIST
        + [
            "data.options.conflict_ratio=0.01",
            "data.options.colour_on=background",
            "model.arch=small_cnn",
        ],
        "mnist",
    ),
}
#: MaC as the paper runs it: xGradCAM masks, (alpha, beta) chosen on validation
#: worst-group accuracy over {0,1,2} x {0..5} (App. B), interventions drawn afresh for
#: every batch (Sec. 3.2, ``views: 0``). ``mac_gt``: the same with the dataset's exact
#: object masks, which separates mask quality from the rest of the recipe. The other
#: variants change only the mask: DaC's adaptive size, an earlier CAM layer, a 15% top-K,
#: Integrated Gradients.
MAC = ["method.name=mac", "method.options.search=true"]
MASKS = {
    "mac": [],
    "mac_gt": ["method.options.saliency=ground_truth"],
    "mac_adaptive": ["method.options.mask_size=adaptive"],
    "mac_block2": ["method.options.layer=body.block2"],
    "mac_block2_adaptive": [
        "method.options.layer=body.block2",
        "method.options.mask_size=adaptive",
    ],
    "mac_k15": ["method.options.top_k=0.15"],
    "mac_ig": ["method.options.saliency=integrated_gradients"],
    "mac_ig_k15": ["method.options.saliency=integrated_gradients", "method.options.top_k=0.15"],
    "mac_ig_adaptive": [
        "method.options.saliency=integrated_gradients",
        "method.options.mask_size=adaptive",
    ],
}
#: ``<variant>_views4``: the same on 4 precomputed intervened views per image
#: (``views: 4``), a *speed option* for the CPU, not the paper (which draws new partners
#: and a new batch colour in every batch). The recorded results in ``results/mac*.md``
#: all used it, hence their ``_views4`` labels.
VIEWS4 = ["method.options.views=4"]
VARIANTS = {
    **{name: MAC + extra for name, extra in MASKS.items()},
    **{f"{name}_views4": MAC + extra + VIEWS4 for name, extra in MASKS.items()},
}
METHODS = ["erm", "dfr_val", "masktune", "mac", "mac_gt"]


def quality_notes(tables: list[pd.DataFrame]) -> list[str]:
    """Mean over seeds of MaC's mask-quality table, per setting (exact core masks)."""
    if not tables:
        return []
    frame = pd.concat(tables)
    columns = ["saliency_fg", "saliency_bg", "mask_fg", "mask_bg"]
    out = []
    for setting, part in frame.groupby("setting", sort=False):
        mean = part.groupby(["group", "name"], sort=True)[columns].mean().reset_index()
        mean = mean.sort_values("group", key=lambda s: s.where(s >= 0, 10**6))
        rows = [
            {"group": r["name"], **{c: f"{r[c]:.3f}" for c in columns}} for _, r in mean.iterrows()
        ]
        out += [
            f"## MaC mask quality on {setting} (saliency of the ERM model vs exact core masks)",
            "",
            f"Mean over {part['seed'].nunique()} seed(s), training images. saliency_fg / "
            "saliency_bg: mean min-max-scaled saliency inside / outside the core object; "
            "mask_fg / mask_bg: fraction of core / background pixels inside MaC's top-K "
            "mask.",
            "",
            *markdown(rows),
            "",
        ]
    return out


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0], "mac", methods=METHODS)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(VARIANTS) - set(available_methods()))
    if unknown:  # before any model is trained
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; variants: {', '.join(VARIANTS)}")
    rows, quality, failures = [], [], []
    seeds, only = args.seed_list, args.only_list
    searches = []
    runs = (
        item
        for setting in only or list(SETTINGS)
        for item in paired_runs(
            SETTINGS,
            [setting],
            methods,
            seeds,
            args.data_dir,
            failures,
            VARIANTS,
        )
    )
    for name, seed, method, results, run_dir in runs:
        csv = run_dir / "mac" / "mask_quality.csv"
        if method.startswith("mac") and not method.startswith("mac_gt") and csv.is_file():
            quality.append(pd.read_csv(csv).assign(seed=seed, setting=f"{name}, {method}"))
        search = run_dir / "mac" / "search.json"
        if search.is_file():
            chosen = json.loads(search.read_text())
            searches.append(f"| {name} | {method} | {seed} | {chosen['alpha']:g} | "
                            f"{chosen['beta']:g} |")  # fmt: skip
        rows.append(row(name, seed, results))
        print(rows[-1], flush=True)
        write_results(rows, args.out, args.stem, notes(quality, searches, failures))
    return 0


def notes(quality, searches, failures) -> list[str]:
    return [
        "MaC: xGradCAM masks of the ERM model (last conv block, true class, top 29.9% of "
        "the pixels = the paper's 15000/224^2), Adam 5e-3, StepLR 5/0.5, batch 32, the "
        "method's default head epochs (App. B); (alpha, beta) chosen by validation "
        "worst-group accuracy over the paper's {0,1,2} x {0..5}. `mac*`: interventions "
        "drawn afresh for every batch (the paper, `views: 0`); `*_views4`: 4 precomputed "
        "intervened views per image (`views: 4`), a speed option for the CPU, not the "
        "paper. `mac_gt`: the same with the dataset's exact object masks (the "
        "synthetic shapes, the digit's strokes) instead of xGradCAM. Other variants change "
        "only the mask: `_adaptive` DaC's adaptive mask size, `_block2` xGradCAM on the "
        "7x7 block instead of the last (4x4) one, `_k15` the top 15% of the pixels, "
        "`_ig` Integrated Gradients instead of xGradCAM. Colored MNIST uses "
        "model.arch=small_cnn (MaC needs a conv layer); `colored_mnist-1%` is LfF's "
        "(colour on the strokes), `colored_mnist-bg-1%` the same digits and groups with "
        "the colour behind a white digit.",
        "",
        *quality_notes(quality),
        "## (alpha, beta) chosen on validation",
        "",
        "| setting | method | seed | alpha | beta |",
        "|---|---|---|---|---|",
        *searches,
        "",
        *failure_notes(failures),
    ]


if __name__ == "__main__":
    sys.exit(main())
