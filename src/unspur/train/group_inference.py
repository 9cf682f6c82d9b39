"""Group inference without group labels: pseudo-groups from a reference model.

Several methods replace the unknown bias attribute by what a biased (ERM or GCE) model
gets wrong or finds hard:

- JTT (Liu et al. 2021): the *error set*, training samples the identification model
  misclassifies (:func:`misclassified`, rule ``"error"``).
- DiffInject / LfF-style ranking: the samples with the highest per-sample loss, either
  the top ``k`` or the top ``quantile`` fraction, within each class by default
  (rules ``"loss_topk"`` and ``"loss_quantile"``).

Either way a sample gets ``is_minority`` (predicted bias-conflicting) and the
pseudo-group ``y * 2 + is_minority``, usable by any method that needs training groups
(group-balanced sampling, GroupDRO). Losses are per sample (``reduction="none"``),
never batch means, and computed in eval mode with the dataset's own (eval) transform.

When true groups exist, :func:`precision_recall` scores the inferred minority against
the true one: the *bias-conflicting* samples, i.e. those whose group is not the
majority group of their class (:func:`true_minority`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unspur.errors import ConfigError
from unspur.evaluate.predict import predict

RULES = ("error", "loss_quantile", "loss_topk")


@dataclass
class GroupInference:
    """Per-sample pseudo-groups, in dataset order.

    ``is_minority``: predicted bias-conflicting; ``pseudo_g = y * 2 + is_minority``
    (``n_pseudo_groups = 2 * n_classes``); ``losses`` and ``predicted`` from the
    reference model; ``rule`` and ``params`` say how the minority was chosen.
    """

    y: np.ndarray
    is_minority: np.ndarray
    losses: np.ndarray
    predicted: np.ndarray
    n_classes: int
    rule: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def pseudo_g(self) -> np.ndarray:
        return self.y.astype(np.int64) * 2 + self.is_minority.astype(np.int64)

    @property
    def n_pseudo_groups(self) -> int:
        return 2 * self.n_classes

    @property
    def minority_indices(self) -> np.ndarray:
        return np.flatnonzero(self.is_minority)

    def report(self, g: np.ndarray | None = None, n_attrs: int | None = None) -> dict[str, Any]:
        """Counts, and precision/recall against the true minority when ``g`` is given."""
        out: dict[str, Any] = {
            "rule": self.rule,
            "params": dict(self.params),
            "n": int(len(self.y)),
            "n_minority": int(self.is_minority.sum()),
            "minority_per_class": np.bincount(
                self.y[self.is_minority], minlength=self.n_classes
            ).tolist(),
        }
        if g is not None and n_attrs is not None:
            out["against_true_groups"] = precision_recall(
                self.is_minority, true_minority(self.y, g, self.n_classes, n_attrs)
            )
        return out


# --------------------------------------------------------------- reference model
def per_sample_losses(
    model: nn.Module, dataset: Any, batch_size: int = 256, num_workers: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(losses, predicted, y)`` for every item, in dataset order, in eval mode.

    Cross-entropy with ``reduction="none"``: one loss per sample.
    """
    preds = predict(model, dataset, batch_size, num_workers)
    logits = torch.from_numpy(preds.logits).float()
    y = torch.from_numpy(preds.y).long()
    losses = F.cross_entropy(logits, y, reduction="none").numpy()
    return losses, preds.predicted, preds.y


def misclassified(
    model: nn.Module, dataset: Any, batch_size: int = 256, num_workers: int = 0
) -> np.ndarray:
    """Boolean mask of the items ``model`` gets wrong (JTT's error set)."""
    _, predicted, y = per_sample_losses(model, dataset, batch_size, num_workers)
    return predicted != y


# ------------------------------------------------------------------ the rules
def minority_from_errors(predicted: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray(predicted) != np.asarray(y)


def minority_from_losses(
    losses: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    quantile: float | None = None,
    top_k: int | None = None,
    per_class: bool = True,
) -> np.ndarray:
    """The highest-loss samples: the top ``quantile`` fraction or the top ``top_k``.

    With ``per_class`` (default) the ranking is within each class, so every class gets
    its share of pseudo-minority samples (the majority class's easy samples do not
    crowd out another class's hard ones). Ties are broken by dataset order.
    """
    if (quantile is None) == (top_k is None):
        raise ConfigError("give exactly one of quantile (0 < q < 1) or top_k (>= 1)")
    if quantile is not None and not 0 < quantile < 1:
        raise ConfigError(f"quantile must be in (0, 1), got {quantile}")
    if top_k is not None and int(top_k) < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    losses = np.asarray(losses, dtype=np.float64)
    y = np.asarray(y)
    minority = np.zeros(len(losses), dtype=bool)
    pools = (
        [np.flatnonzero(y == c) for c in range(n_classes)]
        if per_class
        else [np.arange(len(losses))]
    )
    for pool in pools:
        if len(pool) == 0:
            continue
        n = round(quantile * len(pool)) if quantile is not None else int(top_k)
        n = min(max(n, 0), len(pool))
        if n == 0:
            continue
        order = pool[np.argsort(-losses[pool], kind="stable")]
        minority[order[:n]] = True
    return minority


def infer_groups(
    model: nn.Module,
    dataset: Any,
    rule: str = "error",
    *,
    quantile: float | None = None,
    top_k: int | None = None,
    per_class: bool = True,
    batch_size: int = 256,
    num_workers: int = 0,
) -> GroupInference:
    """Pseudo-groups of ``dataset`` from ``model``'s errors or per-sample losses.

    ``rule``: ``"error"`` (misclassified, JTT), ``"loss_quantile"`` (top ``quantile``
    of the loss, per class by default) or ``"loss_topk"`` (top ``top_k``).
    Pass the dataset with its eval transform: augmentation would make the choice random.
    """
    if rule not in RULES:
        raise ConfigError(f"group inference rule {rule!r} is not one of {', '.join(RULES)}")
    losses, predicted, y = per_sample_losses(model, dataset, batch_size, num_workers)
    n_classes = int(getattr(dataset, "n_classes", int(y.max()) + 1))
    params: dict[str, Any] = {}
    if rule == "error":
        minority = minority_from_errors(predicted, y)
    elif rule == "loss_quantile":
        if quantile is None:
            raise ConfigError("rule loss_quantile needs quantile (e.g. 0.1)")
        minority = minority_from_losses(
            losses, y, n_classes, quantile=quantile, per_class=per_class
        )
        params = {"quantile": quantile, "per_class": per_class}
    else:
        if top_k is None:
            raise ConfigError("rule loss_topk needs top_k")
        minority = minority_from_losses(losses, y, n_classes, top_k=top_k, per_class=per_class)
        params = {"top_k": top_k, "per_class": per_class}
    return GroupInference(y, minority, losses, predicted, n_classes, rule, params)


# --------------------------------------------------------- against true groups
def true_minority(y: np.ndarray, g: np.ndarray, n_classes: int, n_attrs: int) -> np.ndarray:
    """Bias-conflicting samples: their group is not the largest group of their class.

    Groups are ``g = y * n_attrs + a``; the majority group of class ``c`` is the most
    frequent ``(c, a)`` in the given samples.
    """
    y = np.asarray(y, dtype=np.int64)
    g = np.asarray(g, dtype=np.int64)
    counts = np.bincount(g, minlength=n_classes * n_attrs).reshape(n_classes, n_attrs)
    majority_group = np.arange(n_classes) * n_attrs + counts.argmax(axis=1)
    return g != majority_group[y]


def precision_recall(pseudo_minority: np.ndarray, true_minority: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 of the inferred minority against the true minority.

    Precision is 0 when nothing is predicted and recall 0 when there is no true
    minority (scikit-learn's ``zero_division=0`` convention).
    """
    pred = np.asarray(pseudo_minority, dtype=bool)
    true = np.asarray(true_minority, dtype=bool)
    if pred.shape != true.shape:
        raise ConfigError(f"shapes differ: {pred.shape} predicted vs {true.shape} true")
    hits = int((pred & true).sum())
    n_pred, n_true = int(pred.sum()), int(true.sum())
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n_predicted": n_pred,
        "n_true": n_true,
        "n_correct": hits,
    }


def with_inferred_groups(dataset: Any, inference: GroupInference) -> Any:
    """A copy of a :class:`GroupDataset` whose attribute is the inferred minority flag.

    The table's ``a`` becomes ``is_minority`` (attributes "inferred majority" /
    "inferred minority"), so a method that needs training groups (GroupDRO,
    group-balanced sampling) runs on the pseudo-groups ``y * 2 + is_minority`` without
    seeing the true attribute. The true ``a`` is kept in a ``true_a`` column.
    """
    from unspur.data.dataset import DECODE_CACHE_MB, GroupDataset

    table = dataset.table
    frame = table.frame.copy()
    frame["true_a"] = frame["a"]
    frame["a"] = inference.is_minority.astype(np.int64)
    relabelled = table.with_frame(frame)
    relabelled.attr_names = ["inferred majority", "inferred minority"]
    return GroupDataset(
        relabelled, dataset.transform, getattr(dataset, "cache_mb", DECODE_CACHE_MB)
    )
