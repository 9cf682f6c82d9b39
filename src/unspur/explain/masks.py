"""From saliency maps to binary core masks, and how good those masks are.

Everything here takes a saliency map ``(B, H, W)`` and does not care which method made
it (xGradCAM, Integrated Gradients summed over channels, a ground-truth mask), so a
method can swap its saliency source without touching the masking.

Top-K masks (MaC, "Mitigating Spurious Correlation in Images by Intervention"): the
``K`` highest-scoring pixels of each image form its core mask. The paper keeps 15000
pixels of a 224x224 image; :data:`PAPER_FRACTION` is that share (29.9%) and is the
default at any image size (15000 pixels would be the whole image at 64 px or below).
``K`` may be given as a count (an ``int``) or a fraction of the pixels (a ``float`` in
(0, 1]; note ``1`` is one pixel, ``1.0`` all of them). Ties (e.g. the flat zero region of
a ReLU'd CAM, or a binary ground-truth mask) are broken by a fixed pseudo-random order
of the pixels (seeded), not by their position, so the mask never favours the top-left
corner; exactly ``K`` pixels are always chosen.

Threshold masks (MaskTune, Asgari et al. 2022, official ``mask_heatmap_using_threshold``):
the pixels whose saliency exceeds the mean + 2 std of the image's *positive* saliency.

Adaptive mask size (DaC, Noohdani et al. 2024, "Decompose-and-Compose"): the fraction
``q`` of kept pixels is chosen at the elbow of the reference model's loss on images
that keep only their top-``q`` salient pixels (the rest filled as in MaC's "remove"),
over a grid of ``q``. The elbow rule (:func:`elbow_index`): scale both axes to [0, 1]
and take the grid point farthest from the straight line joining the curve's first and
last points (the "kneedle" chord rule); a curve with no bend (all points on the chord
within 1e-9) gives the middle grid point.

Mask quality (the paper's Table 1), where ground-truth core masks exist: per group, the
mean saliency inside and outside the core (maps min-max scaled to [0, 1] per image
first, so images are comparable), and the fraction of core (foreground) and non-core
(background) pixels the mask covers; per image first, then averaged over the group's
images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from unspur.errors import ConfigError
from unspur.explain.xgradcam import normalize_maps

PAPER_TOP_K = 15000
PAPER_IMAGE_SIZE = 224
#: The paper's 15000 of 224 * 224 pixels: the default share of pixels in a core mask.
PAPER_FRACTION = PAPER_TOP_K / (PAPER_IMAGE_SIZE * PAPER_IMAGE_SIZE)
#: Default grid of kept-pixel fractions for the adaptive (DaC) mask size.
ADAPTIVE_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TIE_SEED = 0


# -------------------------------------------------------------------- top-K
def resolve_top_k(top_k: Any, height: int, width: int) -> int:
    """``top_k`` as a pixel count for an ``height x width`` image.

    ``None`` / ``"paper"``: the paper's fraction; an ``int >= 1``: a count (at most the
    number of pixels); a ``float`` in (0, 1]: a fraction (rounded, at least one pixel).
    """
    n = int(height) * int(width)
    if top_k is None or top_k == "paper":
        return max(1, round(PAPER_FRACTION * n))
    if isinstance(top_k, bool):
        raise ConfigError(f"top_k must be a count or a fraction, got {top_k!r}")
    if isinstance(top_k, int):
        if not 1 <= top_k <= n:
            raise ConfigError(
                f"top_k={top_k} pixels is not in 1..{n} (a {height}x{width} image); give "
                "a fraction such as 0.3 instead"
            )
        return top_k
    if isinstance(top_k, float):
        if not 0.0 < top_k <= 1.0:
            raise ConfigError(f"top_k fraction {top_k} must be in (0, 1]")
        return max(1, round(top_k * n))
    raise ConfigError(f"top_k must be null, 'paper', a count or a fraction; got {top_k!r}")


def _tie_order(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)


def top_k_mask(saliency: torch.Tensor, k: Any, seed: int = TIE_SEED) -> torch.Tensor:
    """Boolean ``(B, H, W)`` masks with exactly ``K`` pixels: each image's highest scores.

    ``k`` goes through :func:`resolve_top_k` (a count or a fraction). Ties are broken by
    a pseudo-random pixel order fixed by ``seed``.
    """
    if saliency.ndim != 3:
        raise ConfigError(f"saliency maps must be (B, H, W), got {tuple(saliency.shape)}")
    b, h, w = saliency.shape
    count = resolve_top_k(k, h, w)
    flat = saliency.detach().reshape(b, h * w).float().cpu()
    order = _tie_order(h * w, seed)
    ranked = torch.sort(flat[:, order], dim=1, descending=True, stable=True).indices[:, :count]
    chosen = order[ranked]
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask.reshape(b, h, w).to(saliency.device)


def threshold_mask(saliency: torch.Tensor, n_std: float = 2.0) -> torch.Tensor:
    """MaskTune's mask: pixels above mean + ``n_std`` std of the image's positive scores.

    Returns a boolean ``(B, H, W)`` mask of the pixels to *hide*. Images with no
    positive score get an empty mask.
    """
    flat = saliency.detach().reshape(saliency.shape[0], -1).float()
    positive = flat > 0
    count = positive.sum(1, keepdim=True).clamp_min(1)
    values = torch.where(positive, flat, torch.zeros_like(flat))
    mean = values.sum(1, keepdim=True) / count
    var = (torch.where(positive, flat - mean, torch.zeros_like(flat)) ** 2).sum(
        1, keepdim=True
    ) / count  # numpy's nanstd: population std (ddof=0)
    threshold = mean + n_std * var.sqrt()
    mask = (flat > threshold) & positive.any(1, keepdim=True)
    return mask.reshape(saliency.shape)


# ------------------------------------------------------------- adaptive size
def elbow_index(x: Sequence[float], y: Sequence[float]) -> int:
    """Index of the elbow of a curve: the point farthest from the first-last chord.

    Both axes are min-max scaled to [0, 1] first. A straight (or constant) curve has
    no elbow and gives the middle index.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 3:
        raise ConfigError("the elbow needs a curve of at least 3 points (x and y alike)")
    if not np.all(np.isfinite(y)):
        raise ConfigError("the masked-loss curve has non-finite values")
    order = np.argsort(x)
    x, y = x[order], y[order]

    def scale(v: np.ndarray) -> np.ndarray:
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    xs, ys = scale(x), scale(y)
    start = np.array([xs[0], ys[0]])
    direction = np.array([xs[-1], ys[-1]]) - start
    length = np.linalg.norm(direction)
    if length == 0:
        return int(order[len(x) // 2])
    points = np.stack([xs, ys], 1) - start
    distance = np.abs(points[:, 0] * direction[1] - points[:, 1] * direction[0]) / length
    if distance.max() <= 1e-9:
        return int(order[len(x) // 2])
    return int(order[int(np.argmax(distance))])


@torch.no_grad()
def masked_loss_curve(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    grid: Sequence[float] = ADAPTIVE_GRID,
    fill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Mean cross-entropy of ``model`` on images keeping their top-``q`` salient pixels.

    ``batches`` holds ``(x, y, saliency)``; the rest of each image is filled by ``fill(x,
    mask)`` (default: MaC's remove, the batch mean colour). One value per ``q``.
    """
    from unspur.train.interventions import remove

    fill = fill or remove
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    try:
        for q in grid:
            total, count = 0.0, 0
            for x, y, saliency in batches:
                mask = top_k_mask(saliency, float(q))
                x = x.to(device)
                logits = model(fill(x, mask.to(device)))
                total += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
                count += len(y)
            losses.append(total / max(count, 1))
    finally:
        model.train(was_training)
    return losses


# --------------------------------------------------------------- ground truth
def has_ground_truth(table) -> bool:
    """Whether a table carries a ground-truth core mask for every row."""
    return (
        getattr(table, "mask_store", None) is not None
        and "mask" in table.frame.columns
        and bool(table.frame["mask"].notna().all())
    )


def load_ground_truth(
    table, rows: Sequence[int], transform: Any, size: tuple[int, int]
) -> torch.Tensor:
    """Ground-truth core masks of ``rows`` as float ``(B, H, W)`` in [0, 1].

    The mask goes through the same geometric steps as the image (``transform.steps``:
    resize / centre crop, when the transform exposes them) and is then resized to
    ``size`` (bilinear), so it lines up with the classifier's input pixel for pixel.
    """
    if not has_ground_truth(table):
        raise ConfigError(
            f"{getattr(table, 'name', 'the dataset')} has no ground-truth masks (a 'mask' "
            "column and a mask store); use saliency: xgradcam"
        )
    steps = list(getattr(transform, "steps", []) or [])
    out = []
    for row in rows:
        image = table.mask_store.open(table.frame["mask"].iloc[int(row)]).convert("L")
        for step in steps:
            image = step(image)
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    return torch.stack(out)


# -------------------------------------------------------------- mask quality
def image_mask_stats(
    saliency: torch.Tensor, mask: torch.Tensor, ground_truth: torch.Tensor
) -> pd.DataFrame:
    """Per image: mean scaled saliency in fore/background, mask coverage of each.

    ``ground_truth`` is binarised at 0.5. Columns: ``saliency_fg``, ``saliency_bg``,
    ``mask_fg`` (fraction of foreground pixels in the mask), ``mask_bg`` (fraction of
    background pixels in the mask); NaN where an image has no fore/background pixel.
    """
    s = normalize_maps(saliency.detach().float().cpu()).reshape(saliency.shape[0], -1)
    m = mask.detach().cpu().reshape(s.shape).float()
    fg = (ground_truth.detach().cpu().reshape(s.shape) >= 0.5).float()
    bg = 1 - fg

    def mean_over(values: torch.Tensor, region: torch.Tensor) -> np.ndarray:
        n = region.sum(1)
        total = (values * region).sum(1)
        return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(n, float("nan"))).numpy()

    return pd.DataFrame(
        {
            "saliency_fg": mean_over(s, fg),
            "saliency_bg": mean_over(s, bg),
            "mask_fg": mean_over(m, fg),
            "mask_bg": mean_over(m, bg),
        }
    )


QUALITY_COLUMNS = ("saliency_fg", "saliency_bg", "mask_fg", "mask_bg")


def summarize_mask_stats(
    stats: pd.DataFrame, groups: Sequence[int], group_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Group means of :func:`image_mask_stats` rows, plus an ``all`` row."""
    frame = stats.assign(group=np.asarray(groups, dtype=np.int64))
    rows = []
    for g, part in frame.groupby("group", sort=True):
        name = group_names[int(g)] if group_names is not None else str(g)
        rows.append({"group": int(g), "name": name, "n": len(part), **_means(part)})
    rows.append({"group": -1, "name": "all", "n": len(frame), **_means(frame)})
    return pd.DataFrame(rows, columns=["group", "name", "n", *QUALITY_COLUMNS])


def _means(part: pd.DataFrame) -> dict[str, float]:
    return {
        c: float(np.nanmean(part[c])) if part[c].notna().any() else np.nan for c in QUALITY_COLUMNS
    }


def mask_quality(
    saliency: torch.Tensor,
    mask: torch.Tensor,
    ground_truth: torch.Tensor,
    groups: Sequence[int],
    group_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The paper's Table 1 for one set of maps: one row per group and an ``all`` row.

    Columns ``group, name, n, saliency_fg, saliency_bg, mask_fg, mask_bg`` (see the
    module docstring).
    """
    return summarize_mask_stats(image_mask_stats(saliency, mask, ground_truth), groups, group_names)
