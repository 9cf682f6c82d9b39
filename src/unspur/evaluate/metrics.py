"""Group-robust metrics, each printed with its one-line definition.

People disagree about what "average accuracy" means on Waterbirds; we report every
variant under its own name and always print the definition next to the number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFINITIONS = {
    "worst_group_accuracy": "lowest accuracy over the groups (y, a) present in the split",
    "average_accuracy": (
        "per-group accuracy weighted by each group's share of the TRAINING set "
        "(the Waterbirds convention)"
    ),
    "balanced_accuracy": "unweighted mean of the per-group accuracies (mean-per-group)",
    "accuracy": "fraction of all samples of the split classified correctly",
}


@dataclass
class GroupRow:
    group: int
    name: str
    n: int
    correct: int
    accuracy: float | None


@dataclass
class GroupMetrics:
    """The four headline numbers plus the per-group table for one split."""

    worst_group_accuracy: float
    worst_group: int
    average_accuracy: float
    balanced_accuracy: float
    accuracy: float
    n: int
    groups: list[GroupRow]

    def headline(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in DEFINITIONS}

    def to_dict(self) -> dict:
        return asdict(self)


def group_metrics(
    predictions: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    train_group_counts: np.ndarray | None = None,
    group_names: list[str] | None = None,
) -> GroupMetrics:
    """Compute the metrics of one split.

    ``train_group_counts`` gives the weights of ``average_accuracy``; without it the
    split's own proportions are used (then it equals plain accuracy). Groups absent
    from the split are listed with ``accuracy=None`` and excluded from every metric;
    weights are renormalised over the groups present.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    groups = np.asarray(groups, dtype=np.int64)
    if not (len(predictions) == len(labels) == len(groups)):
        raise ValueError("predictions, labels and groups must have the same length")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    correct = predictions == labels
    n = np.bincount(groups, minlength=n_groups)
    hits = np.bincount(groups, weights=correct.astype(np.float64), minlength=n_groups)
    present = n > 0
    accuracy = np.divide(hits, n, out=np.zeros(n_groups), where=present)
    weights = (
        n.astype(np.float64)
        if train_group_counts is None
        else np.asarray(train_group_counts, dtype=np.float64)
    )
    weights = np.where(present, weights, 0.0)
    if weights.sum() <= 0:
        weights = present.astype(np.float64)
    worst = int(np.flatnonzero(present)[np.argmin(accuracy[present])])
    names = group_names or [f"g{g}" for g in range(n_groups)]
    rows = [
        GroupRow(g, names[g], int(n[g]), int(hits[g]), float(accuracy[g]) if present[g] else None)
        for g in range(n_groups)
    ]
    return GroupMetrics(
        worst_group_accuracy=float(accuracy[worst]),
        worst_group=worst,
        average_accuracy=float((accuracy * weights).sum() / weights.sum()),
        balanced_accuracy=float(accuracy[present].mean()),
        accuracy=float(correct.mean()),
        n=int(len(labels)),
        groups=rows,
    )


def format_metrics(metrics: GroupMetrics, title: str = "") -> str:
    """A plain-text per-group table followed by the headline numbers and definitions."""
    width = max([len(r.name) for r in metrics.groups] + [5])
    lines = [title] if title else []
    lines.append(f"  {'group':<{width}}  {'n':>6}  {'accuracy':>8}")
    for row in metrics.groups:
        acc = "-" if row.accuracy is None else f"{100 * row.accuracy:7.2f}%"
        lines.append(f"  {row.name:<{width}}  {row.n:>6}  {acc:>8}")
    for key, definition in DEFINITIONS.items():
        value = getattr(metrics, key)
        lines.append(f"  {key:<22} {100 * value:6.2f}%   ({definition})")
    return "\n".join(lines)
