"""Data balancing baselines: resampling, loss reweighting and subsampling, by group or class.

Names and semantics follow SubpopBench (Yang et al. 2023, "Change is Hard: A Closer
Look at Subpopulation Shift"; methods ``ReSample`` and ``ReWeight``, which balance
groups when attributes are known in training and classes otherwise) and Idrissi et al.
2022, "Simple data balancing achieves competitive worst-group-accuracy" (SUBG / SUBY
subsample groups / classes; their RWG / RWY draw minibatches with group- / class-
balanced probabilities, which is ``resample_group`` / ``resample_class`` here).

=================  ==============================================================  =====
name               what changes                                                    sup.
=================  ==============================================================  =====
resample_group     minibatches drawn with replacement, P(i) ~ 1/n_{g(i)}            ✓✓
resample_class     minibatches drawn with replacement, P(i) ~ 1/n_{y(i)}            ✓
reweight_group     uniform minibatches, loss mean_i w_{g(i)} CE_i, w_g ~ 1/n_g      ✓✓
reweight_class     uniform minibatches, loss mean_i w_{y(i)} CE_i, w_y ~ 1/n_y      ✓
subsample_group    train on min_g n_g random samples of each group (SUBG)          ✓✓
subsample_class    train on min_y n_y random samples of each class (SUBY)          ✓
=================  ==============================================================  =====

Loss weights are SubpopBench's: ``w_g = (1/n_g) / sum_h (1/n_h) * G`` (mean 1 over the
groups; empty groups 0). Resampling draws as many items per epoch as the training set
has, as SubpopBench and the group_DRO code do. Subsampling keeps a fixed random subset
chosen once from the run's seed (deterministic, no global RNG), so an epoch is much
shorter: Idrissi et al. select the number of epochs on validation; raise
``train.epochs`` accordingly. Class-level variants read no group label in training; their
validation group labels serve model selection only.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from torch.utils.data import Subset

from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.train.group_objectives import WeightedCEObjective
from unspur.train.loop import FitResult
from unspur.train.sampling import (
    balanced_subsample_indices,
    balanced_weights,
    counts,
    inverse_count_weights,
)


class _Balancing(Method):
    """One implementation for the six balancing baselines (see the module docstring)."""

    mode: ClassVar[str]  # resample | reweight | subsample
    by: ClassVar[str]  # group | class

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        train = context.train
        labels, n = (train.g, train.n_groups) if self.by == "group" else (train.y, train.n_classes)
        model = context.build_model()
        if self.mode == "resample":
            weights = balanced_weights(labels, n, self.by)
            return model, context.fit(model, self.name, sample_weights=weights)
        if self.mode == "reweight":
            objective = WeightedCEObjective(
                inverse_count_weights(counts(labels, n, self.by)), self.by
            )
            return model, context.fit(model, self.name, objective=objective)
        keep = balanced_subsample_indices(labels, n, context.config.seed, self.by)
        subset = Subset(train, keep.tolist())
        return model, context.fit(model, self.name, train=subset)


def _balancing(name: str, mode: str, by: str, summary: str) -> type[Method]:
    supervision = Supervision(train_group_labels=by == "group", val_group_labels=True)
    cls = type(
        name,
        (_Balancing,),
        {
            "name": name,
            "mode": mode,
            "by": by,
            "supervision": supervision,
            "defaults": {},
            "summary": summary,
            "__doc__": f"{summary} (see :mod:`unspur.methods.resample`).",
            "__module__": __name__,
        },
    )
    return register_method(cls)


ResampleGroup = _balancing(
    "resample_group", "resample", "group", "group-balanced sampling with replacement"
)
ResampleClass = _balancing(
    "resample_class", "resample", "class", "class-balanced sampling with replacement"
)
ReweightGroup = _balancing(
    "reweight_group", "reweight", "group", "loss weights 1/n_g per group (SubpopBench ReWeight)"
)
ReweightClass = _balancing(
    "reweight_class", "reweight", "class", "loss weights 1/n_y per class (SubpopBench ReWeight)"
)
SubsampleGroup = _balancing(
    "subsample_group", "subsample", "group", "subsample every group to the smallest (SUBG)"
)
SubsampleClass = _balancing(
    "subsample_class", "subsample", "class", "subsample every class to the smallest (SUBY)"
)
