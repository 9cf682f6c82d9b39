"""Last-layer retraining (LLR) on cached features: ``llr_all`` and ``llr_b``.

The recipe the Clustered DreamBooth paper ("Harnessing Diffusion-Generated Synthetic
Images for Fair Image Classification", Basu et al.) and MaC ("Mitigating Spurious
Correlation in Images by Intervention") use as a baseline and as their final stage:
take a trained classifier, freeze the backbone, draw a fresh linear head and train only
the head on real training data.

- ``llr_all`` (the paper's LLR_all): all training data, class-uniform batches, i.e.
  class-balanced sampling with replacement (each class drawn with equal probability).
  No group label is used for training; validation group labels only select the epoch
  (with ``train.selection=average`` none at all): supervision ✓ (x with average).
- ``llr_b`` (LLR_b): group-balanced training data; uses training group labels (✓✓).
  "Group-balanced data" is read as a group-balanced *subset* (every group subsampled
  to the smallest, as DFR does, option ``balance: subsample``, the default); ``balance:
  sample`` instead draws groups uniformly with replacement from all the data.

The backbone runs once: features of the training set (eval transform, no augmentation)
and of the validation set are cached (:mod:`unspur.train.features`) and the head is
trained on them through the one training loop; per-epoch validation and model selection
read the cached validation features too.

Optimiser defaults. The Clustered DreamBooth paper states its classifier settings for
ResNet-50 on Waterbirds, CelebA and UTKFace (Sec. 4: "finetuned on real data for 20
epochs using SGD"; its hyperparameter appendix: lr 1e-3, weight decay 1e-3, batch 128,
20 epochs, the same for every dataset); MaC's own head settings (Adam 5e-3, StepLR 5 /
0.5, batch 32, 10 / 6 epochs) live in :mod:`unspur.methods.mac`. The generic defaults
here are *our choice* for the small from-scratch models of the CPU benchmarks, set
before the paper's text was at hand and not compared with its values since: SGD
(momentum from ``train.momentum``), lr 0.01, weight decay 1e-4, batch 64, 50 epochs, no
scheduler, recorded with every result. They are method options
(``method.options.lr=...``); a paper-setting config sets the paper's values.

:func:`train_head` (a classifier's head trained on cached features, in place) and
:func:`cached_features` are the reusable parts: MaC's last-layer stage calls them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from unspur.config import TrainConfig
from unspur.data.dataset import GroupDataset
from unspur.errors import ConfigError
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.models.base import Classifier
from unspur.models.linear_head import LinearHead
from unspur.train.features import FeatureDataset, extract_features, with_transform
from unspur.train.loop import FitResult
from unspur.train.objectives import Objective
from unspur.train.sampling import (
    balanced_subsample_indices,
    class_balanced_weights,
    group_balanced_weights,
)

HEAD_DEFAULTS: dict[str, Any] = {
    "epochs": 50,
    "optimizer": "sgd",
    "lr": 0.01,
    "weight_decay": 1e-4,
    "batch_size": 64,
}
HEAD_DEBUG = {"epochs": 2}


# ------------------------------------------------------------------ reusable parts
def cached_features(
    context: RunContext,
    model: nn.Module,
    dataset: GroupDataset | None,
    batch_size: int | None = None,
) -> FeatureDataset | None:
    """``model``'s backbone features of ``dataset`` (eval transform), cached on disk.

    The cache lives in ``out_dir/features``; it is keyed by the backbone weights, the
    dataset and the transform, so a rerun or another stage with the same model reuses
    it and a changed model computes anew.
    """
    if dataset is None:
        return None
    view = with_transform(dataset, context.eval_transform)
    features = extract_features(
        model,
        view,
        batch_size=batch_size or context.config.train.eval_batch_size,
        cache_dir=context.out_dir / "features",
        num_workers=context.config.train.num_workers,
    )
    return features.dataset()


def head_train_config(base: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    """The run's train config with the head's optimiser settings from ``options``."""
    overrides = {k: options[k] for k in HEAD_DEFAULTS if k in options}
    for key in ("epochs", "batch_size"):
        if key in overrides and (not isinstance(overrides[key], int) or overrides[key] < 0):
            raise ConfigError(f"method option {key} must be a non-negative integer")
    if overrides.get("optimizer", base.optimizer) not in ("sgd", "adam", "adamw"):
        raise ConfigError(
            f"method option optimizer={overrides['optimizer']!r} is not sgd|adam|adamw"
        )
    # Features are fixed tensors: augmentation and loader workers do not apply.
    return replace(base, scheduler="none", augment=False, num_workers=0, **overrides)


def backbone_device(model: nn.Module) -> torch.device:
    if isinstance(model, Classifier):
        for p in model.backbone_parameters():
            return p.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train_head(
    context: RunContext,
    model: Classifier,
    stage: str,
    train_features: FeatureDataset,
    val_features: FeatureDataset | None,
    train_config: TrainConfig,
    *,
    sample_weights: np.ndarray | torch.Tensor | None = None,
    objective: Objective | None = None,
    reset: bool = True,
    val_group_labels: bool = True,
) -> FitResult:
    """Train ``model.head`` on cached features through the one training loop, in place.

    The backbone is frozen (``freeze_backbone``) and never run: the loop sees a
    :class:`LinearHead` sharing ``model.head`` and the feature datasets. With ``reset``
    a fresh head is drawn first (last-layer retraining from scratch). Validation and
    model selection run on ``val_features``. Returns the loop's :class:`FitResult`; the
    selected head is left in ``model``, on the backbone's device.
    """
    if not isinstance(model, Classifier):
        raise ConfigError("last-layer retraining needs an unspur Classifier (backbone + head)")
    if train_features.feature_dim != model.feature_dim:
        raise ConfigError(
            f"cached features have {train_features.feature_dim} dimensions but the head "
            f"expects {model.feature_dim}"
        )
    model.freeze_backbone()
    if reset:
        model.reset_head()
    probe = LinearHead.around(model.head)
    result = context.fit(
        probe,
        stage,
        train=train_features,
        train_config=train_config,
        objective=objective,
        sample_weights=sample_weights,
        parameters=probe.head.parameters(),
        val_group_labels=val_group_labels,
        val=val_features,
    )
    model.head.to(backbone_device(model))
    model.eval()
    return result


def retrain_last_layer(
    context: RunContext,
    model: Classifier,
    stage: str,
    options: dict[str, Any],
    balance: str,
    *,
    reset: bool = True,
) -> FitResult:
    """LLR of ``model`` on the run's training data, balanced by ``balance``.

    ``balance``: ``"class"`` (class-balanced sampling, LLR_all), ``"group_subsample"``
    (group-balanced subset, LLR_b), ``"group_sample"`` (group-balanced sampling) or
    ``"none"``. ``reset=False`` fine-tunes the current head instead of drawing a new one.
    """
    train = cached_features(context, model, context.train)
    val = cached_features(context, model, context.val)
    assert train is not None
    weights = None
    if balance == "class":
        weights = class_balanced_weights(train.y, train.n_classes)
    elif balance == "group_sample":
        weights = group_balanced_weights(train.g, train.n_groups)
    elif balance == "group_subsample":
        # Groups absent from the training set (Colored MNIST at 1% leaves some colour x
        # digit pairs empty) are skipped: every present group is cut to the smallest
        # present one, as SUBG does. A group-balanced subset cannot invent samples.
        keep = balanced_subsample_indices(
            train.g, train.n_groups, context.config.seed, "training group"
        )
        train = train.subset(keep)
    elif balance != "none":
        raise ConfigError(f"unknown balance {balance!r}")
    config = head_train_config(context.config.train, options)
    return train_head(
        context, model, stage, train, val, config, sample_weights=weights, reset=reset
    )


# ------------------------------------------------------------------------ methods
@register_method
class LLRAll(Method):
    """LLR_all: a fresh head on all training data with class-balanced batches.

    Starts from the reference ERM model (``context.reference_model()``), freezes the
    backbone, caches features and retrains the head (see the module docstring for the
    optimiser defaults). No training group label is used.
    """

    name = "llr_all"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    uses_reference = True
    summary = "last-layer retraining on all training data, class-balanced sampling"
    defaults = dict(HEAD_DEFAULTS)
    debug_options = dict(HEAD_DEBUG)

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        model = context.reference_model()
        return model, retrain_last_layer(context, model, "llr_all", context.options, "class")


@register_method
class LLRBalanced(Method):
    """LLR_b: a fresh head on group-balanced training data (training group labels).

    ``balance``: ``subsample`` (default; every group cut to the smallest, one draw
    seeded by ``seed``) or ``sample`` (group-uniform sampling with replacement).
    """

    name = "llr_b"
    supervision = Supervision(train_group_labels=True, val_group_labels=True)
    uses_reference = True
    summary = "last-layer retraining on group-balanced training data"
    defaults = {**HEAD_DEFAULTS, "balance": "subsample"}
    debug_options = dict(HEAD_DEBUG)

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        balance = context.options.get("balance", "subsample")
        if balance not in ("subsample", "sample"):
            raise ConfigError(f"llr_b option balance={balance!r} is not subsample or sample")
        model = context.reference_model()
        rule = "group_subsample" if balance == "subsample" else "group_sample"
        return model, retrain_last_layer(context, model, "llr_b", context.options, rule)
