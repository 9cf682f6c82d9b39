"""Balancing helpers: per-sample sampler weights, per-group loss weights, subsampling.

Three ways of giving groups (or classes) equal say, used by the balancing baselines
(:mod:`unspur.methods.resample`) and by GroupDRO's group-balanced minibatches:

* **resampling** - draw with replacement with per-sample weight ``1 / n_{g(i)}``, so every
  non-empty group is drawn equally often (:func:`group_balanced_weights`,
  :func:`class_balanced_weights`; pass them to the loop as ``sample_weights``);
* **reweighting** - keep uniform sampling but weight each sample's loss by its group's
  ``1 / n_g``, normalised (:func:`inverse_count_weights`);
* **subsampling** - drop samples until every group has the smallest group's size
  (:func:`balanced_subsample_indices`), as SUBG/SUBY of Idrissi et al. 2022.

Empty groups get weight 0 everywhere (never a division by zero).
"""

from __future__ import annotations

import numpy as np
import torch

from unspur.errors import ConfigError


def _labels(values: torch.Tensor | np.ndarray, n: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(values), dtype=torch.long).reshape(-1)
    if n < 1:
        raise ConfigError(f"number of {what}s must be at least 1, got {n}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise ConfigError(
            f"{what} ids must lie in [0, {n - 1}], got values from {int(labels.min())} "
            f"to {int(labels.max())}"
        )
    return labels


def counts(values: torch.Tensor | np.ndarray, n: int, what: str = "group") -> torch.Tensor:
    """How many samples carry each id ``0..n-1`` (zeros included)."""
    return torch.bincount(_labels(values, n, what), minlength=n)


def inverse_counts(count: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``1 / count`` per entry, 0 where the count is 0."""
    count = torch.as_tensor(np.asarray(count), dtype=torch.double)
    safe = count.clamp_min(1.0)
    return torch.where(count > 0, 1.0 / safe, torch.zeros_like(count))


def balanced_weights(values: torch.Tensor | np.ndarray, n: int, what: str) -> torch.Tensor:
    """Per-sample weights ``1 / n_{label(i)}``: each present label gets total weight 1."""
    labels = _labels(values, n, what)
    return inverse_counts(torch.bincount(labels, minlength=n))[labels]


def group_balanced_weights(g: torch.Tensor | np.ndarray, n_groups: int) -> torch.Tensor:
    """Per-sample sampler weights ``1 / n_{g(i)}`` (group-balanced draws with replacement).

    Proportional to the official group_DRO ``--reweight_groups`` sampler weights
    (``len(dataset) / n_g``); the scale is irrelevant to ``WeightedRandomSampler``.
    """
    return balanced_weights(g, n_groups, "group")


def class_balanced_weights(y: torch.Tensor | np.ndarray, n_classes: int) -> torch.Tensor:
    """Per-sample sampler weights ``1 / n_{y(i)}`` (class-balanced draws with replacement)."""
    return balanced_weights(y, n_classes, "class")


def inverse_count_weights(count: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Loss weight per group (or class) as SubpopBench's ReWeight: ``1/n_g``, normalised.

    ``w_g = (1/n_g) / sum_h (1/n_h) * G`` with ``G`` the number of groups, so the weights
    average 1 over the groups; empty groups get 0 (SubpopBench sets ``n_g = inf``). The
    expected loss under uniform sampling is then the mean of the per-group losses.
    """
    inverse = inverse_counts(count)
    total = inverse.sum()
    if not bool(total > 0):
        raise ConfigError("cannot balance: every group is empty")
    return (inverse / total * len(inverse)).to(torch.float32)


def balanced_subsample_indices(
    values: torch.Tensor | np.ndarray,
    n: int,
    seed: int | np.random.Generator,
    what: str = "group",
    require_all: bool = False,
) -> np.ndarray:
    """Indices keeping ``min_g n_g`` samples of every non-empty group, chosen at random.

    ``seed`` is an int (a NumPy generator of its own; no global state) or a generator to
    draw from (DFR draws many subsets in a row). Empty groups are ignored (the size is
    the smallest *non-empty* group) unless ``require_all``, which raises a
    :class:`ConfigError` naming them. Returned sorted.
    """
    labels = _labels(values, n, what).numpy()
    present = [k for k in range(n) if (labels == k).any()]
    if require_all and len(present) < n:
        empty = [k for k in range(n) if k not in present]
        raise ConfigError(
            f"the data has no sample of {what}(s) {empty}; a {what}-balanced subset needs "
            f"every {what} (use a method without training group labels, e.g. llr_all, or "
            "a split where every group occurs)"
        )
    if not present:
        raise ConfigError(f"cannot subsample: no {what} has any sample")
    size = min(int((labels == k).sum()) for k in present)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == k))[:size] for k in present]
    return np.sort(np.concatenate(keep))
