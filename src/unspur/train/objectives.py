"""Training objectives: what the one training loop minimises.

An objective maps a batch's logits, labels, group ids and dataset indices to a scalar
loss (``loss``). Objectives that need more than logits (SupCon needs features, LfF runs
two models) override ``step``, which receives the model and returns the loss together
with the logits used for the running training accuracy. Stateful objectives (GroupDRO's
group weights, LfF's moving averages) keep their state in ``state_dict`` so checkpoints
resume them exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class Objective:
    """Base objective: mean cross-entropy (ERM)."""

    name = "erm"

    def step(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        g: torch.Tensor,
        index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: ``(loss, logits)``."""
        logits = model(x)
        return self(logits, y, g, index), logits

    def __call__(
        self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def on_epoch_end(self, epoch: int) -> None:
        return None
