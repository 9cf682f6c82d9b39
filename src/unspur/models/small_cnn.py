"""Small models for MNIST/CIFAR-size images that train in seconds on a CPU.

* :class:`SmallCNN`: a few conv-BN-ReLU blocks with 2x max-pooling and a global average
  pool; the quick convolutional baseline (and an xGradCAM target) for 28-64 px images.
* :class:`MLP`: LfF's Colored MNIST model (Nam et al. 2020, also DiffInject's baseline):
  flattened pixels -> three hidden layers of 100 units with ReLU -> linear classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unspur.errors import ConfigError
from unspur.models.base import Classifier


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if not out or any(v < 1 for v in out):
        raise ConfigError(f"{name} must be a non-empty list of positive integers, got {values!r}")
    return out


class SmallCNN(Classifier):
    """Conv(3x3)-BN-ReLU blocks, max-pool 2x after all but the last, global average pool.

    Args:
        n_classes: size of the head.
        in_channels: input channels (1 for grey MNIST, 3 for RGB).
        widths: channels of each block; the last one is ``feature_dim``.
    """

    def __init__(
        self, n_classes: int, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 128)
    ) -> None:
        super().__init__()
        widths = _positive_ints("widths", widths)
        self.arch = "small_cnn"
        self.options = {"in_channels": int(in_channels), "widths": list(widths)}
        body = nn.Sequential()
        prev = int(in_channels)
        for i, width in enumerate(widths):
            block = nn.Sequential(
                nn.Conv2d(prev, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
            if i < len(widths) - 1:
                block.append(nn.MaxPool2d(2, ceil_mode=True))
            body.add_module(f"block{i}", block)
            prev = width
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, n_classes)
        self.cam_layer_name = f"body.block{len(widths) - 1}"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv blocks then global average pool: ``(B, widths[-1])``."""
        return torch.flatten(self.pool(self.body(x)), 1)


class MLP(Classifier):
    """LfF's Colored MNIST MLP: flatten -> [Linear-ReLU] x len(hidden) -> linear head.

    Args:
        n_classes: size of the head.
        in_features: number of input values per image (3 x 28 x 28 = 2352 for Colored
            MNIST); the input is flattened, so any shape with that many values works.
        hidden: widths of the hidden layers (LfF: 100, 100, 100).
    """

    def __init__(
        self,
        n_classes: int,
        in_features: int = 3 * 28 * 28,
        hidden: Sequence[int] = (100, 100, 100),
    ) -> None:
        super().__init__()
        hidden = _positive_ints("hidden", hidden)
        self.arch = "mlp"
        self.options = {"in_features": int(in_features), "hidden": list(hidden)}
        layers: list[nn.Module] = []
        prev = int(in_features)
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU(inplace=True)]
            prev = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten each image and run the hidden layers: ``(B, hidden[-1])``."""
        flat = x.reshape(x.shape[0], -1)
        expected = self.options["in_features"]
        if flat.shape[1] != expected:
            raise ConfigError(
                f"the mlp expects {expected} values per image but got {flat.shape[1]} "
                f"(input shape {tuple(x.shape[1:])}); build it with in_features={flat.shape[1]}"
            )
        return self.body(flat)
