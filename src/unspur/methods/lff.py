"""LfF: Nam, Cha, Ahn, Lee & Shin, "Learning from Failure: Training Debiased Classifier
from Biased Classifier", NeurIPS 2020; faithful to the official code (alinlab/LfF).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unspur.errors import ConfigError
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.models.base import Classifier
from unspur.models.factory import ARCHITECTURES, build_model, register_architecture
from unspur.train.group_objectives import LfFObjective
from unspur.train.loop import FitResult


class LfFPair(Classifier):
    """The biased and the debiased model of LfF, trained together as one module.

    ``forward(x)`` is the *debiased* model (so validation, prediction and saliency use
    it); ``forward(x, both=True)`` returns ``(biased_logits, debiased_logits)`` for
    :class:`~unspur.train.group_objectives.LfFObjective`. ``features``, ``head`` and
    ``cam_layer`` are the debiased model's. The pair is a registered architecture
    (``lff_pair``, options ``inner_arch`` / ``inner_options``), so the training loop's
    checkpoints save and resume both models; the method returns the debiased model.
    Freezing the "backbone" of the pair freezes everything but the debiased head.
    """

    arch = "lff_pair"

    def __init__(self, biased: Classifier, debiased: Classifier) -> None:
        super().__init__()
        if biased.spec != debiased.spec:
            raise ConfigError(
                f"LfF needs two models of the same architecture, got {biased.spec} and "
                f"{debiased.spec}"
            )
        self.biased = biased
        self.debiased = debiased
        self.options = {"inner_arch": debiased.arch, "inner_options": dict(debiased.options)}
        if debiased.cam_layer_name:
            self.cam_layer_name = f"debiased.{debiased.cam_layer_name}"

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return self.debiased.head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.debiased.features(x)

    def forward(self, x: torch.Tensor, return_features: bool = False, both: bool = False) -> Any:
        if both:
            return self.biased(x), self.debiased(x)
        return self.debiased(x, return_features=return_features)


def _build_pair(
    n_classes: int,
    pretrained: str | None = None,
    inner_arch: str = "small_cnn",
    inner_options: dict[str, Any] | None = None,
) -> Classifier:
    """Two freshly built ``inner_arch`` models (``pretrained`` loads into both)."""
    options = dict(inner_options or {})
    return LfFPair(
        build_model(inner_arch, n_classes, pretrained, **options),
        build_model(inner_arch, n_classes, pretrained, **options),
    )


if "lff_pair" not in ARCHITECTURES:
    register_architecture("lff_pair")(_build_pair)


@register_method
class LfF(Method):
    """Learning from Failure: a GCE-trained biased model steers a reweighted debiased one.

    Two models of the run's architecture train simultaneously (same optimizer settings,
    one loop): the biased model with generalized cross-entropy (LfF's GCE, ``q`` = 0.7),
    the debiased model with cross-entropy weighted per sample by the relative difficulty
    ``w = L_b / (L_b + L_d + 1e-8)``, where ``L_b``, ``L_d`` are per-sample exponential
    moving averages of each model's CE (``ema_alpha`` = 0.7, the value hard-coded in the
    official ``train.py``) divided by their class maximum. Samples the biased model
    finds hard (bias-conflicting) get ``w`` near 1, easy (bias-aligned) ones near 0.
    Details in :class:`~unspur.train.group_objectives.LfFObjective`.

    No group label is used in training; validation group labels only select the epoch
    (the official code logs validation accuracy of the debiased model every epoch and
    keeps the last one; use ``train.selection=last`` for that rule).

    The two models start from independent initialisations (:func:`independent_pair`),
    as ``model_b`` and ``model_d`` of the official ``train.py``.

    Options: ``q`` = 0.7, ``ema_alpha`` = 0.7 (official code). Training settings are the
    train config's: the official code uses Adam, lr 1e-3, weight decay 0, batch 256 for
    Colored MNIST (MLP, 100 epochs) and Corrupted CIFAR-10 (ResNet-20, 200 epochs), and
    lr 1e-4, weight decay 1e-4 for CelebA (ResNet-18); nothing is overridden here.
    """

    name = "lff"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    defaults = {"q": 0.7, "ema_alpha": 0.7}
    summary = "learning from failure: GCE-biased model + relative-difficulty weights"

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        try:
            q, ema_alpha = float(options["q"]), float(options["ema_alpha"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"lff: options q and ema_alpha must be numbers ({exc})") from exc
        objective = LfFObjective(context.train.y, context.train.n_classes, q=q, ema_alpha=ema_alpha)
        pair = independent_pair(context)
        result = context.fit(pair, "lff", objective=objective)
        return pair.debiased, result


def independent_pair(context: RunContext) -> LfFPair:
    """The biased and the debiased model, two *independent* initialisations.

    The official ``train.py`` builds ``model_b`` and then ``model_d`` with two calls of
    ``get_model`` on one random stream: two different draws of the initial weights
    (pretrained backbones, as for CelebA's ResNet-18, are shared; the fresh parts are
    not). ``context.build_model()`` reseeds with the run's seed before every build, so
    calling it twice gives two identical models. The biased model is therefore the run's
    usual first model and the debiased one is built right after it from the same,
    continuing stream, exactly as the official code draws them; both still depend on the
    run's seed alone.
    """
    biased = context.build_model()
    model = context.config.model
    debiased = build_model(model.arch, biased.n_classes, model.pretrained, **model.options)
    return LfFPair(biased, debiased)
