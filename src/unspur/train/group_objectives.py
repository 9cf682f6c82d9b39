"""Objectives of the group-robustness baselines: GroupDRO, loss reweighting, SupCon, LfF.

Each is an :class:`~unspur.train.objectives.Objective` for the one training loop. The
stateful ones (GroupDRO's group weights ``q``, LfF's per-sample moving averages) keep
their state in ``state_dict`` so that a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unspur.errors import ConfigError
from unspur.train.losses import (
    generalized_cross_entropy,
    supervised_contrastive_loss,
    weighted_cross_entropy,
)
from unspur.train.objectives import Objective


def _as_vector(values: Any, n: int, what: str) -> torch.Tensor:
    vector = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)
    if vector.dim() == 0:
        vector = vector.expand(n).clone()
    if vector.shape != (n,):
        raise ConfigError(f"{what} needs {n} values (one per group), got {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise ConfigError(f"{what} must be finite, got {vector.tolist()}")
    return vector


def group_mean_losses(
    losses: torch.Tensor, g: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sample loss of each group in the batch, and the batch's group counts.

    Groups absent from the batch get loss 0 (as the official group_DRO
    ``compute_group_avg``), never NaN.
    """
    one_hot = F.one_hot(g.long(), n_groups).to(losses.dtype)  # (B, G)
    count = one_hot.sum(0)
    loss = (one_hot * losses.unsqueeze(1)).sum(0) / count.clamp_min(1.0)
    return loss, count


# ------------------------------------------------------------------------- GroupDRO
class GroupDROObjective(Objective):
    """Online group DRO (Sagawa et al. 2020, Algorithm 1), as the official ``LossComputer``.

    Per batch: the mean cross-entropy ``L_g`` of every group (0 for groups absent from
    the batch), the adjusted losses ``L_g + C / sqrt(n_g)`` (the generalization
    adjustment; ``n_g`` = the group's training count; applied only when every
    adjustment is positive, as the official code does), optionally divided by their
    sum (``normalize_loss``), then the exponentiated-gradient step
    ``q_g <- q_g * exp(eta * adjusted_g)`` and ``q <- q / sum(q)``; the loss is
    ``sum_g q_g * L_g`` (q detached) - a sum over the groups present in the batch,
    since the absent ones have ``L_g = 0``. ``q`` starts uniform.

    Choices: groups with no training sample get no adjustment (the official code would
    divide by 0); the official code's in-place ``+=`` also adds the constant adjustment
    to the reported loss - it has no gradient, so it is left out here.
    Per-group losses come from per-sample CE in float32 (safe under mixed precision).
    """

    name = "groupdro"

    def __init__(
        self,
        n_groups: int,
        group_counts: Any,
        eta: float = 0.01,
        adjustment: float | Any = 0.0,
        normalize_loss: bool = False,
    ) -> None:
        if n_groups < 1:
            raise ConfigError(f"GroupDRO needs at least one group, got n_groups={n_groups}")
        if not eta > 0:
            raise ConfigError(f"GroupDRO step size eta must be positive, got {eta}")
        self.n_groups = int(n_groups)
        self.eta = float(eta)
        self.normalize_loss = bool(normalize_loss)
        self.group_counts = _as_vector(group_counts, self.n_groups, "group_counts")
        adjustment = _as_vector(adjustment, self.n_groups, "GroupDRO adjustment")
        if (adjustment < 0).any():
            raise ConfigError(f"GroupDRO adjustment C must be >= 0, got {adjustment.tolist()}")
        if bool((adjustment > 0).all()):
            present = self.group_counts > 0
            term = adjustment / self.group_counts.clamp_min(1.0).sqrt()
            self.adjustment = torch.where(present, term, torch.zeros_like(term))
        else:
            self.adjustment = torch.zeros(self.n_groups)
        self.q = torch.full((self.n_groups,), 1.0 / self.n_groups)

    def __call__(
        self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        group_loss, count = group_mean_losses(losses, g, self.n_groups)
        # q moves with the group losses of the global batch (all processes), so every
        # process keeps the same q; gradients flow through the local losses only.
        total = self.reduce_sum((group_loss * count).detach())
        global_count = self.reduce_sum(count.detach())
        self.update_q(total / global_count.clamp_min(1.0))
        return (self.q * group_loss).sum()

    def update_q(self, group_loss: torch.Tensor) -> torch.Tensor:
        """One exponentiated-gradient step on ``q`` from this batch's group losses."""
        device = group_loss.device
        adjusted = group_loss.float() + self.adjustment.to(device)
        if self.normalize_loss:
            total = adjusted.sum()
            adjusted = adjusted / total if bool(total > 0) else adjusted
        q = self.q.to(device) * torch.exp(self.eta * adjusted)
        self.q = q / q.sum()
        return self.q

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        q = torch.as_tensor(state["q"], dtype=torch.float32)
        if q.shape != (self.n_groups,):
            raise ValueError(
                f"GroupDRO state has {tuple(q.shape)} weights, expected {self.n_groups}"
            )
        self.q = q.clone()


# ---------------------------------------------------------------------- reweighting
class WeightedCEObjective(Objective):
    """Cross-entropy with a fixed weight per group (``by="group"``) or class (``by="class"``).

    ``loss = mean_i(w[k_i] * CE_i)`` over the batch (SubpopBench's ReWeight), with
    ``k_i`` the sample's group or class; build ``w`` with
    :func:`unspur.train.sampling.inverse_count_weights`.
    """

    name = "weighted_ce"

    def __init__(self, weights: Any, by: str = "group") -> None:
        if by not in ("group", "class"):
            raise ConfigError(f"WeightedCEObjective by must be 'group' or 'class', got {by!r}")
        self.by = by
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
        if self.weights.dim() != 1 or not torch.isfinite(self.weights).all():
            raise ConfigError("loss weights must be a finite vector, one per group or class")
        if (self.weights < 0).any():
            raise ConfigError(f"loss weights must be non-negative, got {self.weights.tolist()}")

    def __call__(
        self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        key = g if self.by == "group" else y
        w = self.weights.to(logits.device)[key.long()]
        return weighted_cross_entropy(logits, y, w, reduction="mean")


# --------------------------------------------------------------------------- SupCon
class SupConObjective(Objective):
    """``beta * CE + (1 - beta) * SupCon`` on the model's penultimate features.

    SupCon is Khosla et al.'s L_out (:func:`supervised_contrastive_loss`) on the
    L2-normalised ``features`` returned by ``model(x, return_features=True)``, with the
    class labels defining positives. ``beta=1`` is plain CE, ``beta=0`` pure SupCon (the
    head then gets no gradient).
    """

    name = "supcon"

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        base_temperature: float | None = None,
    ) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"SupCon beta must be in [0, 1], got {beta}")
        if not temperature > 0:
            raise ConfigError(f"SupCon temperature must be positive, got {temperature}")
        self.beta, self.temperature, self.base_temperature = beta, temperature, base_temperature

    def step(self, model, x, y, g, index):
        logits, features = model(x, return_features=True)
        return self.combine(logits, features, y), logits

    def combine(
        self, logits: torch.Tensor, features: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), y)
        con = supervised_contrastive_loss(features, y, self.temperature, self.base_temperature)
        return self.beta * ce + (1.0 - self.beta) * con


# ------------------------------------------------------------------------------ LfF
class LfFObjective(Objective):
    """Learning from Failure (Nam et al. 2020), as the official alinlab/LfF ``train.py``.

    ``model(x, both=True)`` returns ``(biased_logits, debiased_logits)`` (see
    :class:`unspur.methods.lff.LfFPair`). Per batch:

    1. per-sample CE of both models (detached) updates each model's per-sample moving
       average: ``ema[i] = alpha * ema[i] + (1 - alpha * updated[i]) * loss`` (the first
       visit stores the loss itself), ``alpha = ema_alpha = 0.7``;
    2. each EMA is divided by its class maximum over the *whole* training set (labels
       of every training item are given at construction);
    3. relative difficulty ``w = L_b / (L_b + L_d + 1e-8)``;
    4. loss = mean GCE(biased; q) + mean(w * CE(debiased)), w detached - both models
       step on the sum (the official code uses two optimizers with identical settings,
       which is the same update for SGD/Adam since both are per-parameter).

    GCE is LfF's own form (:func:`generalized_cross_entropy`, ``form="lff"``). Choice: a
    class maximum of exactly 0 (every loss of the class underflowed) is replaced by a
    tiny number so the weight becomes 0 instead of the official code's NaN. The
    returned logits (training accuracy) are the debiased model's.
    """

    name = "lff"

    def __init__(self, labels: Any, n_classes: int, q: float = 0.7, ema_alpha: float = 0.7) -> None:
        if not 0.0 <= ema_alpha < 1.0:
            raise ConfigError(f"LfF ema_alpha must be in [0, 1), got {ema_alpha}")
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"LfF GCE q must be in (0, 1], got {q}")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        self.n_classes = int(n_classes)
        if self.labels.numel() and int(self.labels.max()) >= self.n_classes:
            raise ConfigError("LfF labels exceed n_classes")
        self.q, self.ema_alpha = float(q), float(ema_alpha)
        n = self.labels.numel()
        self.ema_b = torch.zeros(n)
        self.ema_d = torch.zeros(n)
        self.updated = torch.zeros(n)

    # ---- state
    def update_ema(self, loss_b: torch.Tensor, loss_d: torch.Tensor, index: torch.Tensor) -> None:
        """Step 1: the per-sample moving averages of both models' losses."""
        index = index.detach().cpu().long()
        first = 1.0 - self.ema_alpha * self.updated[index]
        self.ema_b[index] = (
            self.ema_alpha * self.ema_b[index] + first * loss_b.detach().cpu().float()
        )
        self.ema_d[index] = (
            self.ema_alpha * self.ema_d[index] + first * loss_d.detach().cpu().float()
        )
        self.updated[index] = 1.0

    def class_max(self, ema: torch.Tensor) -> torch.Tensor:
        """Largest moving-average loss of each class over the whole training set."""
        out = torch.zeros(self.n_classes)
        return out.scatter_reduce(0, self.labels, ema, reduce="amax", include_self=True)

    def weights(self, index: torch.Tensor) -> torch.Tensor:
        """Steps 2-3: relative difficulty ``w`` of the given training items (CPU tensor)."""
        index = index.detach().cpu().long()
        y = self.labels[index]
        tiny = torch.finfo(torch.float32).tiny
        loss_b = self.ema_b[index] / self.class_max(self.ema_b)[y].clamp_min(tiny)
        loss_d = self.ema_d[index] / self.class_max(self.ema_d)[y].clamp_min(tiny)
        return loss_b / (loss_b + loss_d + 1e-8)

    # ---- training
    def step(self, model, x, y, g, index):
        logits_b, logits_d = model(x, both=True)
        ce_b = F.cross_entropy(logits_b.float(), y, reduction="none")
        ce_d = F.cross_entropy(logits_d.float(), y, reduction="none")
        # Every process applies the EMA update of the global batch (same state everywhere).
        self.update_ema(self.gather(ce_b.detach()), self.gather(ce_d.detach()), self.gather(index))
        w = self.weights(index).to(ce_d.device)
        gce = generalized_cross_entropy(logits_b, y, self.q, reduction="none", form="lff")
        loss = gce.mean() + (ce_d * w).mean()
        return loss, logits_d

    def __call__(self, logits, y, g, index):
        raise TypeError("LfFObjective needs both models' logits: call step(model, ...)")

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema_b": self.ema_b.clone(),
            "ema_d": self.ema_d.clone(),
            "updated": self.updated.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("ema_b", "ema_d", "updated"):
            value = torch.as_tensor(state[key], dtype=torch.float32)
            if value.shape != self.ema_b.shape:
                raise ValueError(
                    f"LfF state {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(self.ema_b.shape)} (one per training item)"
                )
            setattr(self, key, value.clone())
