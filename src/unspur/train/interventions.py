"""MaC's two interventions on a batch (Mitigating Spurious Correlation in Images by
Intervention, Sec. 3.2, "Mask and Combine").

With images ``x`` of shape ``(B, C, H, W)``, binary core masks ``m`` of shape
``(B, 1, H, W)`` (1 = core pixel) and a fill colour ``b``:

- remove (Eq. 1):   ``x_rmv_i  = x_i * m_i + (1 - m_i) * b``
- combine (Eq. 2):  ``x_comb_i = x_i * m_i + (1 - m_i) * (1 - m_j) * x_j + (1 - m_i) * m_j * b``
  with a partner ``j`` of another class (``y_j != y_i``) from the same batch (Eq. 2:
  "X^(i), X^(j) in B such that y^(i) != y^(j)"); the combined image keeps the label
  ``y_i`` (Eq. 5; its core is ``x_i``'s). Pixels that are core in neither image show
  ``x_j``'s background, pixels that are core only in ``x_j`` are filled with ``b`` (so
  ``x_j``'s core never leaks into the new image). The paper does not say how ``j`` is
  picked among the other-class images of the batch: a uniform draw is *our choice* (no
  candidate is preferred).

``b`` is the batch mean colour (Eq. 1: "a 1 x 1 x 3 vector indicating the mean of B
across the colour channels", chosen "to change the statistics of the batch as
insignificantly as possible"): one value per channel, the mean over every pixel of
every image of the batch (``x.mean(dim=(0, 2, 3))``), computed on the tensors the model
sees. The classifier's normalisation is a per-channel affine map, so this is the
normalised batch mean of the raw colours: the same colour either way. Whether core
pixels count is not said: all pixels are used (*our choice*: the plain mean of ``B``,
and it does not depend on the masks).

Samples whose batch holds no image of another class get no partner: they are left out
of the combine term (:func:`draw_partners` marks them ``-1``); the term is the mean over
the samples that have one (Eq. 5 averages over the samples with a partner ``j_i``), and
zero when none has (never NaN).
"""

from __future__ import annotations

import torch


def batch_mean_colour(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over the batch's pixels, shaped ``(1, C, 1, 1)`` to broadcast."""
    return x.mean(dim=(0, 2, 3), keepdim=True)


def _as_mask(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if m.ndim == 3:
        m = m[:, None]
    return m.to(dtype=x.dtype, device=x.device)


def remove(x: torch.Tensor, m: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x * m + (1 - m) * b``; ``b`` defaults to the batch mean colour of ``x``."""
    m = _as_mask(m, x)
    b = batch_mean_colour(x) if b is None else b.to(dtype=x.dtype, device=x.device)
    return x * m + (1 - m) * b


def draw_partners(y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each sample, a uniformly drawn index ``j`` in the batch with ``y[j] != y[i]``;
    ``-1`` where the batch holds no other class. Uses ``generator`` (or torch's global
    RNG, which the training loop reseeds every epoch)."""
    y = y.reshape(-1)
    other = y[None, :] != y[:, None]  # (B, B): candidate partners per row
    count = other.sum(1)
    u = torch.rand(len(y), generator=generator).to(y.device)  # drawn on the CPU
    # The k-th candidate (0-based) with k = floor(u * count): uniform over candidates.
    k = torch.minimum((u * count).floor().long(), (count - 1).clamp_min(0))
    cumulative = other.long().cumsum(1)  # 1-based rank of each candidate in its row
    hit = other & (cumulative == (k + 1)[:, None])
    partner = hit.float().argmax(1)
    return torch.where(count > 0, partner, torch.full_like(partner, -1))


def combine(
    x: torch.Tensor,
    m: torch.Tensor,
    partner: torch.Tensor,
    b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combined images for the samples that have a partner: ``(x_comb, positions)``.

    ``partner[i]`` is ``j`` or ``-1`` (skipped); ``positions`` are the ``i`` kept, so the
    labels are ``y[positions]``. ``b`` defaults to the batch mean colour of all of ``x``.
    """
    m = _as_mask(m, x)
    b = batch_mean_colour(x) if b is None else b.to(dtype=x.dtype, device=x.device)
    keep = torch.nonzero(partner >= 0).reshape(-1)
    j = partner[keep]
    xi, mi, xj, mj = x[keep], m[keep], x[j], m[j]
    mixed = xi * mi + (1 - mi) * (1 - mj) * xj + (1 - mi) * mj * b
    return mixed, keep
