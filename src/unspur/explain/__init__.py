"""Saliency and masks: xGradCAM, saliency -> binary masks, mask quality, figures.

Integrated Gradients (Captum) can feed the same mask functions: they take any
``(B, H, W)`` saliency map.
"""

from unspur.explain.masks import (
    PAPER_FRACTION,
    elbow_index,
    image_mask_stats,
    mask_quality,
    resolve_top_k,
    threshold_mask,
    top_k_mask,
)
from unspur.explain.xgradcam import normalize_maps, xgradcam

__all__ = [
    "PAPER_FRACTION",
    "elbow_index",
    "image_mask_stats",
    "mask_quality",
    "normalize_maps",
    "resolve_top_k",
    "threshold_mask",
    "top_k_mask",
    "xgradcam",
]
