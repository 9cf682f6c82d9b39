"""Loss functions shared by the methods, each with a per-sample form (``reduction="none"``).

* :func:`generalized_cross_entropy` - GCE (Zhang & Sabuncu 2018) in the form LfF's
  official code trains its biased model with (and DiffInject reuses).
* :func:`supervised_contrastive_loss` - SupCon (Khosla et al. 2020), the L_out form, or
  with the negatives-only denominator of Clustered DreamBooth's Eq. 3.
* :func:`weighted_cross_entropy` - per-sample weighted CE that never returns NaN for an
  empty selection (all weights zero), the guard multi-source losses need.

Per-sample values are what rankings (JTT's error set, DBB's low-loss samples, LfF's
moving averages) must be computed from: never rank samples by a batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unspur.errors import ConfigError

REDUCTIONS = ("none", "mean", "sum")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        # The mean of an empty batch is 0 (with a graph), not NaN.
        return values.sum() / max(values.numel(), 1)
    raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _zero_like(reference: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that is still connected to ``reference``'s graph (so backward works)."""
    return reference.sum() * 0.0


# ----------------------------------------------------------------------------- GCE
def generalized_cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    q: float = 0.7,
    reduction: str = "mean",
    form: str = "lff",
) -> torch.Tensor:
    """Generalized cross-entropy, per sample or reduced.

    ``form="lff"`` (default) is what LfF's official ``GeneralizedCELoss``
    (alinlab/LfF, ``module/loss.py``) computes and trains the biased model with::

        CE(logits, y) * q * p_y.detach() ** q

    i.e. cross-entropy re-weighted by the (detached) probability of the true class.
    Its gradient is ``q * p_y^q * grad CE``: exactly ``q`` times the gradient of Zhang &
    Sabuncu's GCE ``(1 - p_y^q) / q`` (whose gradient is ``p_y^q * grad CE``). So it
    optimises the same objective up to a constant factor ``q`` in the step size, and
    emphasises samples the model already finds easy (high ``p_y``) - which is what makes
    the LfF/DiffInject biased model latch onto the bias. The *value* differs from the
    paper's formula; use ``form="zhang"`` for ``(1 - p_y^q) / q`` itself.
    """
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"GCE q must be in (0, 1], got {q}")
    if form == "lff":
        ce = F.cross_entropy(logits, y, reduction="none")
        p_y = torch.softmax(logits.float(), dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        values = ce * (p_y.detach() ** q) * q
    elif form == "zhang":
        log_p_y = F.log_softmax(logits.float(), dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        values = (1.0 - torch.exp(q * log_p_y)) / q
    else:
        raise ConfigError(f"GCE form must be 'lff' or 'zhang', got {form!r}")
    return _reduce(values, reduction)


class GeneralizedCELoss(nn.Module):
    """Module wrapper of :func:`generalized_cross_entropy` (default: per-sample values)."""

    def __init__(self, q: float = 0.7, reduction: str = "none", form: str = "lff") -> None:
        super().__init__()
        self.q, self.reduction, self.form = q, reduction, form

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return generalized_cross_entropy(logits, y, self.q, self.reduction, self.form)


# -------------------------------------------------------------------------- SupCon
def supervised_contrastive_loss(
    features: torch.Tensor,
    y: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float | None = None,
    reduction: str = "mean",
    denominator: str = "all",
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, eq. 2, "L_out"), one view per sample.

    Features are L2-normalised first (so the loss is invariant to their scale). For each
    anchor ``i`` with positives ``P(i)`` (other samples of its class) and ``A(i)`` (all
    other samples)::

        L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

    Anchors with no positive in the batch (singleton classes) are left out of the mean
    (the official code divides by ``|P(i)| = 0`` there and produces NaN); a batch with no
    positive pair at all gives 0, still connected to the graph. The official code also
    multiplies by ``temperature / base_temperature`` (``base_temperature=0.07``); that
    factor is 1 unless ``base_temperature`` is given. ``temperature=0.07`` is the official
    code's default. ``reduction="none"`` returns ``L_i`` per anchor (0 where excluded).

    ``denominator="negatives"`` sums the denominator over the anchor's negatives
    ``N(i)`` (other classes) only, as Clustered DreamBooth writes SupCon (its Eq. 3,
    ``clustered_dreambooth.md`` A.1); L_out's ``A(i)`` also holds the positives. An
    anchor without a negative in the batch is then left out as well (its denominator
    would be empty). That paper's Eq. 3 also sums over the anchors (``reduction="sum"``)
    where L_out averages.
    """
    if temperature <= 0:
        raise ConfigError(f"SupCon temperature must be positive, got {temperature}")
    if denominator not in ("all", "negatives"):
        raise ConfigError(f"SupCon denominator must be 'all' or 'negatives', got {denominator!r}")
    if features.dim() != 2:
        features = features.flatten(1)
    n = features.shape[0]
    if n < 2:  # no pair at all (and logsumexp over an empty row would give NaN gradients)
        zero = _zero_like(features)
        return zero.expand(n).clone() if reduction == "none" else zero
    z = F.normalize(features.float(), dim=1)
    sim = z @ z.t() / temperature
    # Subtracting the row max (detached) changes nothing mathematically; it keeps exp finite.
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    positives = (y.view(-1, 1) == y.view(1, -1)) & ~self_mask
    excluded = self_mask if denominator == "all" else positives | self_mask
    n_pos = positives.sum(1)
    has_pos = (n_pos > 0) & ~excluded.all(1)
    # Rows with an empty denominator are excluded below; fill them so logsumexp is finite.
    excluded = excluded & has_pos.view(-1, 1) | self_mask & ~has_pos.view(-1, 1)
    log_prob = sim - torch.logsumexp(sim.masked_fill(excluded, float("-inf")), 1, keepdim=True)
    # masked_fill (not multiplication) so -inf from a 1-sample row never meets a zero.
    summed = log_prob.masked_fill(~positives, 0.0).sum(1)
    per_anchor = torch.where(has_pos, -summed / n_pos.clamp_min(1), torch.zeros_like(summed))
    if base_temperature is not None:
        per_anchor = per_anchor * (temperature / base_temperature)
    if reduction == "none":
        return per_anchor
    if not bool(has_pos.any()):
        return _zero_like(features)
    if reduction == "sum":
        return per_anchor.sum()
    if reduction == "mean":
        return per_anchor.sum() / has_pos.sum()
    raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# -------------------------------------------------------------------- weighted CE
def weighted_cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    reduction: str = "weighted_mean",
) -> torch.Tensor:
    """Cross-entropy with one non-negative weight per sample.

    ``reduction``:
      ``"weighted_mean"`` (default) ``sum(w * CE) / sum(w)``: the mean over a selection
      (weights 0/1 select a subset, e.g. the generated samples of one source); an empty
      selection (``sum(w) == 0``) gives 0 with a graph instead of NaN.
      ``"mean"`` ``sum(w * CE) / batch_size``: loss reweighting as in SubpopBench's
      ReWeight (weights keep their scale across batches).
      ``"sum"``, ``"none"`` (the per-sample ``w * CE``).
    """
    weights = torch.as_tensor(weights, device=logits.device).to(torch.float32)
    if weights.shape != y.shape:
        raise ConfigError(
            f"weights must have one value per sample: got shape {tuple(weights.shape)} "
            f"for {tuple(y.shape)} labels"
        )
    values = F.cross_entropy(logits.float(), y, reduction="none") * weights
    if reduction == "weighted_mean":
        total = weights.sum()
        if not bool(total > 0):
            return _zero_like(logits)
        return values.sum() / total
    return _reduce(values, reduction)
