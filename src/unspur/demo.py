"""``unspur demo``: the shortcut and its fixes on the built-in synthetic benchmark, on CPU.

The demo is the first thing a new user runs, so it is sized to finish within about two
minutes on 2 idle cores (the README's five-minute budget includes the install) and to print
the same table on every rerun on a given machine: the data, model, seeds and thread count are
all fixed. ``--full`` is the longer comparison (more methods, three seeds).

Both run through :func:`unspur.compare.compare`, the same runner as ``unspur compare``; this
module only holds the demo's choices (all ours: the paper benchmarks need real data and GPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unspur.compare import compare, format_duration

#: Data, model and training shared by both demos: the synthetic benchmark at 99% bias (10
#: minority images per group), a small CNN from scratch, 8 epochs of SGD. A 1,200-image test
#: set (300 per group) keeps the evaluation noise of a group's accuracy under 3 points.
#: ``train.threads=2`` fixes the thread count, since a different count changes the float
#: reductions and so the trained model.
DEMO_SETTINGS = [
    "data.name=synthetic",
    "data.options.bias=0.99",
    "data.options.n_train=2000",
    "data.options.n_test=1200",
    "data.image_size=32",
    "model.arch=small_cnn",
    "train.epochs=8",
    "train.lr=0.05",
    "train.batch_size=64",
    "train.augment=false",
    "train.threads=2",
    "train.progress=false",
]


@dataclass(frozen=True)
class DemoPlan:
    """Which methods and seeds one demo runs, and the seconds each method's run took on 2
    idle cores (measured for the time-left estimate; the estimate then follows this machine)."""

    methods: str
    seeds: str
    seconds: dict[str, float]


#: The quick demo: the shortcut (ERM), a reweighting baseline that uses training group labels
#: and DFR, which needs only validation group labels and reuses ERM's model. One seed; the
#: README states the spread over seeds, measured with ``--seeds 0,1,2``.
QUICK = DemoPlan(
    methods="erm,groupdro,resample_group,dfr_val",
    seeds="0",
    seconds={"erm": 30.0, "groupdro": 18.0, "resample_group": 18.0, "dfr_val": 12.0},
)
#: ``--full``: adds JTT (which trains twice) and runs three seeds.
FULL = DemoPlan(
    methods="erm,groupdro,resample_group,jtt,dfr_val",
    seeds="0,1,2",
    seconds={**QUICK.seconds, "jtt": 60.0},
)


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
    return compare(
        {},
        names,
        seed_list,
        out,
        DEMO_SETTINGS + list(overrides or []),
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
    return (
        f"ERM's worst-group accuracy: {100 * erm['worst_group_accuracy']['mean']:.1f}% "
        f"(average {100 * erm['average_accuracy']['mean']:.1f}%): the shortcut. Best "
        f"worst-group accuracy: {best}, {100 * values['worst_group_accuracy']['mean']:.1f}%."
    )
