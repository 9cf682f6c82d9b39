"""Training objectives: what the one training loop minimises.

An objective maps a batch's logits, labels, group ids and dataset indices to a scalar
loss (``loss``). Objectives that need more than logits (SupCon needs features, LfF runs
two models) override ``step``, which receives the model and returns the loss together
with the logits used for the running training accuracy. Stateful objectives (GroupDRO's
group weights, LfF's moving averages) keep their state in ``state_dict`` so checkpoints
resume them exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class Objective:
    """Base objective: mean cross-entropy (ERM).

    Under several processes the loop binds ``gather`` (concatenate a tensor across
    processes) and ``reduce_sum`` (sum it); stateful objectives update their state from
    the global batch so every process keeps the same state. In one process both are the
    identity.
    """

    name = "erm"
    gather: Callable[[torch.Tensor], torch.Tensor] = staticmethod(_same)
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = staticmethod(_same)

    def bind_processes(self, accelerator) -> None:
        """Use ``accelerator`` to share state updates across processes."""
        if accelerator.num_processes > 1:
            self.gather = accelerator.gather
            self.reduce_sum = lambda tensor: accelerator.reduce(tensor, "sum")

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
