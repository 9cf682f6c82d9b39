"""``unspur demo``: the shortcut and its fixes on the built-in synthetic benchmark, on CPU.

The demo is the first thing a new user runs, so it shows what unspur is for: ERM's
shortcut, a strong baseline (DFR) and two of the founding papers' methods (MaC and DBB),
all starting from the shipped pretrained backbone, DBB drawing with the shipped
generator. It is sized to finish in about three minutes on 2 idle cores (the README's
five-minute budget includes the install) and to print the same table on every rerun on a
given machine: the data, model, seeds and thread count are all fixed. Where a method runs
at a reduced budget, the plan names the option and the paper's value before anything
runs. ``--full`` runs all five seed methods with the baselines (at most about 15 minutes).

Both run through :func:`unspur.compare.compare`, the same runner as ``unspur compare``; this
module only holds the demo's choices (all ours: the paper benchmarks need real data and GPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unspur.compare import compare, format_duration

#: The shipped assets both demos run on (issue 20): the CIFAR-10 ResNet-18 that stands in for
#: the papers' ImageNet backbones, and the text-to-image + inpainting domain models that
#: stand in for Stable Diffusion (trained on an independent draw of the synthetic benchmark,
#: see bench/results/pretrained_backbone.md and shipped_generators.md).
BACKBONE = "unspur:cifar10-resnet18"
GENERATOR = "unspur:synthetic-domain"
#: The five methods unspur exists for (the founding papers).
SEED_METHODS = ("mac", "dbb", "ffr", "clustered_dreambooth", "diffinject")

#: Data, model and training shared by both demos: the synthetic benchmark at 99% bias (10
#: minority images per group), the shipped backbone fine-tuned for 8 epochs of SGD (the
#: settings of bench/results/pretrained_backbone.md). A 1,200-image test set (300 per group)
#: keeps the evaluation noise of a group's accuracy under 3 points. ``train.threads=2``
#: fixes the thread count, since a different count changes the float reductions and so
#: the trained model.
DEMO_SETTINGS = [
    "data.name=synthetic",
    "data.options.bias=0.99",
    "data.options.n_train=2000",
    "data.options.n_test=1200",
    "data.image_size=32",
    "model.arch=resnet18",
    "model.options.small_images=true",
    "model.options.width=16",
    f"model.pretrained={BACKBONE}",
    "train.epochs=8",
    "train.lr=0.05",
    "train.batch_size=64",
    "train.augment=false",
    "train.threads=2",
    "train.progress=false",
]


def demo_settings(overrides: list[str] | None = None) -> list[str]:
    """:data:`DEMO_SETTINGS`, without the backbone's settings (``model.*``) when the user's
    ``--set model.arch=...`` picks another architecture: its options and the shipped
    ResNet-18 weights would not fit it."""
    if any(o.split("=", 1)[0].strip() == "model.arch" for o in overrides or []):
        return [s for s in DEMO_SETTINGS if not s.startswith("model.")]
    return list(DEMO_SETTINGS)


@dataclass(frozen=True)
class DemoPlan:
    """Which methods and seeds one demo runs, each method's own settings (``--set
    METHOD:key=value``, applied only when that method runs) with a note that names every
    speed option and the paper's value it replaces, and the seconds each method's run is
    expected to take on 2 idle cores, for the time-left estimate (the estimate then follows
    this machine's pace). Measured as each run's wall seconds (``cost.json``) on 2 idle
    cores (load average 0.1) from a fresh clone, 2026-12-06: ``unspur demo`` erm 35,
    dfr_val 7, mac 15, dbb 63; ``unspur demo --full`` groupdro 39, ffr 76,
    clustered_dreambooth 54, diffinject 132."""

    methods: str
    seeds: str
    seconds: dict[str, float]
    settings: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


#: MaC, both demos: the paper's xGradCAM masks of ERM's model and the head's Sec. 4.2
#: settings, with two speed options (MAC_NOTE). Both demos run the same MaC (and DBB), so
#: ``unspur demo --full`` after ``unspur demo`` reuses their runs in the same folder.
#: ``views: 4`` precomputes 4 intervened views per image instead of drawing fresh ones every
#: batch (the paper, ``views: 0``); no (alpha, beta) search: (2, 3), Sec. 4.2's Waterbirds
#: values (the synthetic benchmark is Waterbirds-like), instead of App. B's 18 head fits
#: (measured with the search: worst group 80.0 instead of 77.0, 56 instead of 34 CPU-s).
MAC = ["method.options.views=4", "method.options.search=false"]
MAC_NOTE = (
    "speed options views=4 (4 precomputed interventions per image; the paper draws fresh "
    "ones every batch, views=0) and search=false: (alpha, beta) = (2, 3), Sec. 4.2's "
    "Waterbirds values, instead of App. B's search on validation (18 fits)"
)
#: DBB: the shipped inpainting model, masks from xGradCAM of ERM's model (``masker:
#: saliency``; the paper's GroundingDINO + SAM have no offline weights, and the benchmark's
#: exact object masks would be an oracle input a user does not have), and a CPU budget: K per class, textual-inversion steps, IG steps and the
#: retraining epochs are reduced (the paper's values in DBB_NOTE). Retraining as the method's
#: default, the official train.py's Adam without weight decay, at Table 10's Waterbirds batch
#: 32, the rate chosen on validation over 1e-5, 1e-4, 1e-3 (three 2-epoch retrainings; the
#: run's SGD lr 0.05 sent the retrained model to chance, worst group 0.0, measured).
DBB = [
    f"method.options.generator={GENERATOR}",
    "method.options.masker=saliency",
    "method.options.mask_dilation=2",
    "method.options.k=50",
    "method.options.inversion_steps=100",
    "method.options.ig_steps=16",
    "method.options.retrain_epochs=2",
    "method.options.retrain_batch_size=32",
    "method.options.generation_batch_size=16",
]
DBB_NOTE = (
    f"generator {GENERATOR}, masks from xGradCAM of ERM's model grown by 2 px (the paper: "
    "LangSAM, no offline weights; our choice); speed options k=50 per class (Table 4: "
    "hundreds), 100 textual-inversion steps (3000), 16 IG steps (50), 2 retraining epochs "
    "(official train.py: 200) with Adam, the rate chosen on validation over 1e-5, 1e-4, 1e-3"
)

#: FFR: the shipped text-to-image model, a group-balanced synthetic set of ``budget`` images
#: (USB's total would be 1,960 here), FFR's optimiser (Adam, no scheduler) at the learning
#: rates of Table 2(b), UTKFace at 99% (stage 1 1e-4, stage 2 1e-6: the synthetic benchmark
#: has no Table 2 column; our choice of the closest one).
FFR = [
    f"method.options.generator={GENERATOR}",
    "method.options.budget=400",
    "method.options.pretrain.lr=1.0e-4",
    "method.options.pretrain.epochs=20",
    "method.options.finetune.lr=1.0e-6",
    "method.options.finetune.epochs=2",
    "train.weight_decay=0",
]
FFR_NOTE = (
    f"generator {GENERATOR}; speed options budget=400 synthetic images (USB's total: 1960), "
    "stage 1 for 20 epochs and stage 2 for 2 (official scripts: 50 each); Adam at Table "
    "2(b)'s learning rates (UTKFace 99%: 1e-4, 1e-6; no column for this benchmark)"
)
#: Clustered DreamBooth: the paper's classifier settings (A.2, A.8: both stages SGD 1e-3,
#: 20 epochs; the run's lr 0.05 made stage 1's SupCon diverge) and configs/synthetic_cdb.yaml's
#: CPU reductions, smaller still.
CDB = [
    f"method.options.generator={GENERATOR}",
    "method.options.classifier=paper",
    "method.options.clip=tiny",
    "method.options.n_per_group=80",
    "method.options.steps=15",
    "method.options.guidance_scale=7.5",
    "method.options.max_clusters=2",
    "method.options.lora={steps: 30, batch_size: 4, learning_rate: 1.0e-3}",
    "method.options.lora_finetune={rank: 16, alpha: 16, steps: 30, batch_size: 4, "
    "learning_rate: 1.0e-3}",
    "method.options.identifier_template=photo of a {identifier} {class} on {bias}",
    "method.options.fid=false",
]
CDB_NOTE = (
    f"generator {GENERATOR}; A.2 / A.8 classifier (SGD 1e-3, 20 epochs per stage); speed "
    "options 80 images per group (A.2: 5000), 15 DDIM steps (25), at most 2 clusters (k_D "
    "rule), 30 LoRA steps (200); CLIP filter on a "
    "random-init tiny CLIP (no CLIP weights offline: the filter is untested)"
)
#: DiffInject: no DDPM ships yet, so the method trains its own small one on the training
#: images for a few hundred steps; a small DDPM with every skip barely reads its h-space
#: (h_share 0.08 at t = 500 even after 8,000 steps: the DiffInject suite's
#: ``cmnist_ddpm_allskips``,
#: bench/results/diffinject/colored_mnist-1_50steps_allskips.md), so the synthetic images are
#: mostly label noise.
DIFFINJECT = [
    "method.options.ddpm_steps=300",
    "method.options.ddpm_lr=5.0e-4",
    "method.options.inv_steps=20",
    "method.options.gen_steps=20",
    "method.options.replace_steps=20",
    "method.options.synthetic_ratio=0.05",
    "method.options.biased_epochs=4",
]
DIFFINJECT_NOTE = (
    "NOT MEANINGFUL: its own small DDPM trained 300 steps here (the paper: an ADM pretrained "
    "on the domain; none ships yet), 20 DDIM steps (1000), 100 synthetic images (ratio "
    "0.05; 0.1); such a DDPM does not carry content (bench/results/diffinject/)"
)

#: The quick demo: the shortcut (ERM), DFR (validation group labels, reuses ERM's model) and
#: two seed methods that start from ERM's model too: MaC (last layer, no generator) and DBB
#: (the shipped inpainting model). One seed; the README states what the table shows.
QUICK = DemoPlan(
    methods="erm,dfr_val,mac,dbb",
    seeds="0",
    seconds={"erm": 35.0, "dfr_val": 7.0, "mac": 15.0, "dbb": 63.0},
    settings={"mac": MAC, "dbb": DBB},
    notes={"mac": MAC_NOTE, "dbb": DBB_NOTE},
)
#: ``--full``: all five seed methods and the baselines (ERM, GroupDRO, DFR), one seed.
FULL = DemoPlan(
    methods="erm,groupdro,dfr_val,mac,dbb,ffr,clustered_dreambooth,diffinject",
    seeds="0",
    seconds={
        **QUICK.seconds,
        "groupdro": 39.0,
        "ffr": 76.0,
        "clustered_dreambooth": 54.0,
        "diffinject": 132.0,
    },
    settings={
        "mac": MAC,
        "dbb": DBB,
        "ffr": FFR,
        "clustered_dreambooth": CDB,
        "diffinject": DIFFINJECT,
    },
    notes={
        "mac": MAC_NOTE,
        "dbb": DBB_NOTE,
        "ffr": FFR_NOTE,
        "clustered_dreambooth": CDB_NOTE,
        "diffinject": DIFFINJECT_NOTE,
    },
)


#: Methods that load diffusers / transformers pipelines.
GENERATIVE = ("dbb", "ffr", "usb", "asb", "clustered_dreambooth", "diffinject")


def _quiet_generative_libraries() -> None:
    """No loading bars or advisory warnings from diffusers / transformers in the demo's
    output (e.g. "requires torchvision ... falling back"), so the plan, the per-epoch
    lines and the table stay readable. Errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def run_demo(
    out: str | Path,
    *,
    full: bool = False,
    methods: str | None = None,
    seeds: str | None = None,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo comparison into ``out`` (resumable) and print its table and verdict."""
    from unspur.compare import parse_list, parse_seeds

    plan = FULL if full else QUICK
    names = parse_list(methods or plan.methods, "--methods")
    seed_list = parse_seeds(seeds or plan.seeds)
    expected = sum(plan.seconds.get(name, 30.0) for name in names) * len(seed_list)
    log(
        "unspur demo: methods against ERM on the synthetic benchmark (shape = class, "
        "background = bias; 99% of training images show each shape on its usual background)."
    )
    log(
        f"Methods {', '.join(names)}; seeds {', '.join(map(str, seed_list))}; about "
        f"{format_duration(expected)} on 2 idle cores. Runs go to {out}/<method>/seed<k>/."
    )
    log(
        f"Every model starts from the shipped backbone {BACKBONE} (ResNet-18 trained on "
        f"CIFAR-10); generative methods use the shipped generator {GENERATOR}."
    )
    for name in names:
        if name in plan.notes:
            log(f"  {name}: {plan.notes[name]}")
    if any(name in GENERATIVE for name in names):
        _quiet_generative_libraries()
    per_method = [f"{name}:{value}" for name in names for value in plan.settings.get(name, [])]
    return compare(
        {},
        names,
        seed_list,
        out,
        demo_settings(overrides) + per_method + list(overrides or []),
        command="unspur demo" + (" --full" if full else ""),
        log=log,
        estimate=plan.seconds,
    )


def verdict(summary: dict[str, Any]) -> str | None:
    """One sentence: ERM's shortcut and the best worst-group accuracy, or None without ERM."""
    aggregate = summary["aggregate"]
    erm = aggregate.get("erm")
    if not erm:
        return None
    best, values = max(aggregate.items(), key=lambda m: m[1]["worst_group_accuracy"]["mean"])
    sentence = (
        f"ERM's worst-group accuracy: {100 * erm['worst_group_accuracy']['mean']:.1f}% "
        f"(average {100 * erm['average_accuracy']['mean']:.1f}%): the shortcut. Best "
        f"worst-group accuracy: {best}, {100 * values['worst_group_accuracy']['mean']:.1f}%."
    )
    seed = [name for name in SEED_METHODS if name in aggregate]
    if not seed:
        return sentence
    erm_worst = erm["worst_group_accuracy"]["mean"]
    parts = []
    for name in seed:
        worst = aggregate[name]["worst_group_accuracy"]["mean"]
        parts.append(f"{name} {100 * (worst - erm_worst):+.1f}")
    return f"{sentence} Seed methods, worst-group vs ERM (points): {', '.join(parts)}."
