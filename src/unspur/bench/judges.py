"""The training view of a judge of generated images (``build: judge`` with ``view: robust``).

A judge trained on sharp real images can misread the softer, grainier images a small
generator draws: the legacy ``bench/domain_model.py`` calibration found two plain judges
disagreeing by up to 30 points on the same generated images. :class:`RobustView` trains
the judge on real images that are often blurred, with noise and a brightness / contrast
jitter, so that it reads both (that script's view; the values are its choices, kept).
Evaluation stays on the plain view.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

#: Probability of a Gaussian blur and its radius range (pixels).
BLUR_P, BLUR_RADIUS = 0.7, (0.3, 1.2)
#: Contrast factor range, brightness shift range (of the [0, 1] scale), noise std range.
CONTRAST, BRIGHTNESS, NOISE_STD = (0.8, 1.2), (-0.1, 0.1), (0.0, 0.06)


class RobustView:
    """``base`` (the judge's eval transform) applied to a jittered copy of the image."""

    def __init__(self, base: Callable[[Image.Image], Any]) -> None:
        self.base = base

    def __call__(self, image: Image.Image) -> Any:
        image = image.convert("RGB")
        if random.random() < BLUR_P:
            image = image.filter(ImageFilter.GaussianBlur(random.uniform(*BLUR_RADIUS)))
        pixels = np.asarray(image, dtype=np.float32) / 255
        pixels = (pixels - 0.5) * random.uniform(*CONTRAST) + 0.5 + random.uniform(*BRIGHTNESS)
        pixels = pixels + np.random.normal(0, random.uniform(*NOISE_STD), pixels.shape)
        pixels = np.clip(pixels * 255, 0, 255).astype(np.uint8)
        return self.base(Image.fromarray(pixels))
