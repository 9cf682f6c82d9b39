"""Saliency figures as PNG grids, drawn with PIL only (no matplotlib needed).

:func:`saliency_grid` lays out one row per sample: the image, then one overlay per map
set (e.g. the reference model's xGradCAM and the retrained model's), each map min-max
scaled per image and drawn with a jet-like colour map at 50% over the image. A caption
row names the columns; each row can carry a short label (true / predicted class).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from unspur.explain.xgradcam import normalize_maps
from unspur.io import atomic_write_bytes


def to_display(x: torch.Tensor, transform: Any = None) -> torch.Tensor:
    """Model inputs ``(B, C, H, W)`` back to displayable RGB in [0, 1].

    Undoes the transform's normalisation when it exposes ``mean`` / ``std`` tensors
    (:class:`unspur.data.transforms.Compose` does); grey images are repeated to RGB.
    """
    x = x.detach().float().cpu()
    mean = getattr(transform, "mean", None)
    std = getattr(transform, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and x.shape[1] == 3:
        x = x * std.reshape(1, -1, 1, 1) + mean.reshape(1, -1, 1, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x[:, :3].clamp(0, 1)


def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: ``(H, W)`` in [0, 1] -> ``(H, W, 3)`` in [0, 1]."""
    v = np.clip(values, 0, 1)[..., None]
    # Red, green and blue peak at 0.75, 0.5 and 0.25: blue (low) -> green -> red (high).
    return np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)


def overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` image and ``(H, W)`` map in [0, 1] -> blended ``(H, W, 3)``."""
    return (1 - alpha) * image + alpha * jet(saliency)


def saliency_grid(
    images: torch.Tensor,
    maps: Sequence[torch.Tensor],
    titles: Sequence[str],
    labels: Sequence[str] | None = None,
    cell: int = 96,
) -> Image.Image:
    """A PIL image: rows = samples; columns = the image, then one overlay per map set.

    ``images`` are displayable RGB ``(B, 3, H, W)`` in [0, 1] (see :func:`to_display`),
    ``maps`` a list of ``(B, H, W)`` saliency maps, ``titles`` one per column (image
    column included).
    """
    n = images.shape[0]
    columns = 1 + len(maps)
    if len(titles) != columns:
        raise ValueError(f"need {columns} titles (image + one per map set), got {len(titles)}")
    header, label_h = 14, 14 if labels is not None else 0
    row_h = cell + label_h
    canvas = Image.new("RGB", (columns * cell, header + max(n, 1) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * cell + 3, 1), str(title)[: cell // 6], fill="black")
    scaled = [normalize_maps(m.detach().float().cpu()).numpy() for m in maps]
    for i in range(n):
        base = images[i].permute(1, 2, 0).numpy()
        cells = [base] + [overlay(base, s[i]) for s in scaled]
        top = header + i * row_h
        for c, array in enumerate(cells):
            tile = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
            tile = tile.resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (c * cell, top))
        if labels is not None:
            draw.text((3, top + cell + 1), str(labels[i])[: columns * cell // 6], fill="black")
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PIL image as PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
