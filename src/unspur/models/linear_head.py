"""A linear classifier on precomputed features (last-layer retraining, DFR)."""

from __future__ import annotations

import torch
from torch import nn

from unspur.models.base import Classifier


class LinearHead(Classifier):
    """A linear classifier on precomputed features: identity backbone + ``head``.

    ``LinearHead.around(model.head)`` shares the given ``nn.Linear``: training the probe
    trains the classifier's head in place. ``arch="linear"`` lets the training loop
    checkpoint it (the loop's ``best/`` and resume state).
    """

    arch = "linear"

    def __init__(self, in_features: int, n_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.options = {"in_features": int(in_features), "bias": bool(bias)}
        self.head = nn.Linear(int(in_features), int(n_classes), bias=bias)

    @classmethod
    def around(cls, linear: nn.Linear) -> LinearHead:
        probe = cls(linear.in_features, linear.out_features, linear.bias is not None)
        probe.head = linear
        return probe

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x
