"""Build a :class:`Classifier` by architecture name: ``build_model("resnet50", 2, ...)``.

Architectures live in a registry (:func:`register_architecture`), so configs name them
as strings and checkpoints rebuild them from ``model.json``. Built in:

===============  ==============================================================
``resnet18/34/50/101/152``  torchvision-compatible ResNet; options ``small_images``,
                 ``in_channels``, ``zero_init_residual``, ``width``; ``pretrained`` =
                 local torchvision state dict (.pth / .safetensors) or a shipped
                 backbone ``unspur:<name>`` (e.g. ``unspur:cifar10-resnet18``)
``small_cnn``    conv-BN-ReLU blocks; options ``in_channels``, ``widths``
``mlp``          LfF's Colored MNIST MLP; options ``in_features``, ``hidden``
``hf:<id|dir>``  transformers AutoModel backbone (or ``arch="hf"`` with
                 ``pretrained``/``name``, or ``config`` for random init); ``pooling``
===============  ==============================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from unspur.errors import ConfigError
from unspur.models.base import Classifier
from unspur.models.checkpoint import load_backbone_weights
from unspur.models.hf_backbone import HFBackbone
from unspur.models.linear_head import LinearHead
from unspur.models.resnet import ResNet, load_imagenet_weights
from unspur.models.small_cnn import MLP, SmallCNN

#: A builder takes ``(n_classes, pretrained, **options)`` and returns a Classifier.
Builder = Callable[..., Classifier]

ARCHITECTURES: dict[str, Builder] = {}


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(n_classes, pretrained=None, **options)`` as ``name``."""

    def decorate(builder: Builder) -> Builder:
        if name in ARCHITECTURES:
            raise ConfigError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        return builder

    return decorate


def available_architectures() -> list[str]:
    """Registered architecture names (``hf`` also accepts ``hf:<hub id or directory>``)."""
    return sorted(ARCHITECTURES)


def _resnet_builder(depth: int) -> Builder:
    def build(
        n_classes: int,
        pretrained: str | None = None,
        small_images: bool = False,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        width: int = 64,
    ) -> Classifier:
        model = ResNet(depth, n_classes, small_images, in_channels, zero_init_residual, width)
        if pretrained:
            load_imagenet_weights(model, pretrained)
        return model

    build.__doc__ = (
        f"ResNet-{depth}; ``pretrained`` is a local torchvision state dict file or a "
        "shipped backbone ``unspur:<name>``."
    )
    return build


for _depth in (18, 34, 50, 101, 152):
    register_architecture(f"resnet{_depth}")(_resnet_builder(_depth))


@register_architecture("small_cnn")
def _build_small_cnn(
    n_classes: int,
    pretrained: str | None = None,
    in_channels: int = 3,
    widths: Sequence[int] = (32, 64, 128, 128),
) -> Classifier:
    """Small CNN; ``pretrained`` is a local state dict / checkpoint directory."""
    model = SmallCNN(n_classes, in_channels, widths)
    if pretrained:
        load_backbone_weights(model, pretrained)
    return model


@register_architecture("linear")
def _build_linear(
    n_classes: int, pretrained: str | None = None, in_features: int = 512, bias: bool = True
) -> Classifier:
    """A linear classifier on precomputed features (last-layer retraining, DFR)."""
    if pretrained:
        raise ConfigError("the linear head architecture has no pretrained weights")
    return LinearHead(in_features, n_classes, bias)


@register_architecture("mlp")
def _build_mlp(
    n_classes: int,
    pretrained: str | None = None,
    in_features: int = 3 * 28 * 28,
    hidden: Sequence[int] = (100, 100, 100),
) -> Classifier:
    """LfF MLP; ``pretrained`` is a local state dict / checkpoint directory."""
    model = MLP(n_classes, in_features, hidden)
    if pretrained:
        load_backbone_weights(model, pretrained)
    return model


@register_architecture("hf")
def _build_hf(
    n_classes: int,
    pretrained: str | None = None,
    name: str | None = None,
    config: Mapping[str, Any] | Any | None = None,
    pooling: str = "auto",
) -> Classifier:
    """transformers backbone from ``pretrained``/``name`` (hub id or dir) or a ``config``."""
    source = pretrained or name
    if source and config is not None:
        raise ConfigError(
            "hf: give either pretrained/name (load weights) or config (random init), not both"
        )
    if source:
        return HFBackbone.from_pretrained(source, n_classes, pooling)
    if config is not None:
        return HFBackbone.from_config(config, n_classes, pooling)
    raise ConfigError(
        "hf needs a model: use arch 'hf:<hub id or local directory>' or pass pretrained=..."
    )


def build_model(
    arch: str, n_classes: int, pretrained: str | None = None, **options: Any
) -> Classifier:
    """Build a registered architecture with a ``n_classes`` head.

    ``pretrained`` is a local weights file for resnets/small_cnn/mlp (a missing file is
    a :class:`~unspur.errors.CheckpointError`) or the name of a backbone shipped with
    unspur, ``unspur:<name>`` (:mod:`unspur.models.shipped`; an unknown name is a
    CheckpointError listing the shipped ones), a hub id or directory for ``hf``.
    ``arch="hf:<id or dir>"`` is shorthand for ``arch="hf", pretrained=<id or dir>``.
    Unknown architectures or options raise :class:`~unspur.errors.ConfigError`.
    """
    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"arch must be a non-empty string, got {arch!r}")
    name = arch.strip()
    if name.lower().startswith("hf:"):
        source = name[3:].strip()
        if not source:
            raise ConfigError("arch 'hf:' needs a hub id or local directory after the colon")
        if pretrained and pretrained != source:
            raise ConfigError(
                f"arch {arch!r} already names the weights; do not also pass pretrained={pretrained!r}"
            )
        name, pretrained = "hf", source
    else:
        name = name.lower()
    builder = ARCHITECTURES.get(name)
    if builder is None:
        raise ConfigError(
            f"unknown architecture {arch!r}; choose one of {available_architectures()} "
            "or 'hf:<hub id or local directory>'"
        )
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ConfigError(f"n_classes must be a positive integer, got {n_classes!r}")
    accepted = [
        p for p in inspect.signature(builder).parameters if p not in ("n_classes", "pretrained")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for architecture {name!r}; accepted: {accepted}"
        )
    return builder(n_classes, pretrained=pretrained, **options)
