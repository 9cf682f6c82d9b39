"""Classifier-side image transforms, written on PIL and torch (no torchvision).

These are the classifier's view of an image only. Generators and segmenters read the raw
PIL image from the table's store, never the output of these transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from unspur.config import DataConfig, TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class _Described:
    """A readable, address-free ``repr`` (used in feature-cache keys and logs)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _rand() -> float:
    # torch's global RNG: DataLoader seeds it per worker, and the training loop seeds it.
    return float(torch.rand(()).item())


class Compose(_Described):
    """Apply PIL-to-PIL steps, then convert to a normalised tensor."""

    def __init__(
        self,
        steps: Sequence[Callable[[Image.Image], Image.Image]],
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
    ) -> None:
        self.steps = list(steps)
        self.mean = None if mean is None else torch.tensor(mean).view(3, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(3, 1, 1)

    def __repr__(self) -> str:
        stats = [None if t is None else t.flatten().tolist() for t in (self.mean, self.std)]
        return f"Compose(steps={self.steps!r}, mean={stats[0]}, std={stats[1]})"

    @property
    def fixed_steps(self) -> int:
        """How many leading steps give the same image every time (resize, centre crop):
        their output can be computed once per image and kept (``GroupDataset``'s cache)."""
        count = 0
        for step in self.steps:
            if not isinstance(step, FIXED_STEPS):
                break
            count += 1
        return count

    def prefix(self, image: Image.Image) -> Image.Image:
        """The image after the :attr:`fixed_steps` (RGB)."""
        image = image.convert("RGB")
        for step in self.steps[: self.fixed_steps]:
            image = step(image)
        return image

    def finish(self, image: Image.Image) -> torch.Tensor:
        """The rest of the transform on an image :meth:`prefix` returned."""
        for step in self.steps[self.fixed_steps :]:
            image = step(image)
        tensor = to_tensor(image)
        if self.mean is not None and self.std is not None:
            tensor = (tensor - self.mean) / self.std
        return tensor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.finish(self.prefix(image))


class Resize(_Described):
    """Resize to ``(size, size)``, or the shorter side to ``size`` with ``keep_ratio``."""

    def __init__(self, size: int, keep_ratio: bool = False) -> None:
        self.size = size
        self.keep_ratio = keep_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if not self.keep_ratio:
            target = (self.size, self.size)
        elif w <= h:
            target = (self.size, max(1, round(h * self.size / w)))
        else:
            target = (max(1, round(w * self.size / h)), self.size)
        if target == (w, h):
            return image
        return image.resize(target, Image.BILINEAR)


class CenterCrop(_Described):
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        left = max(0, round((w - self.size) / 2))
        top = max(0, round((h - self.size) / 2))
        return image.crop((left, top, left + self.size, top + self.size))


class RandomResizedCrop(_Described):
    """Crop a random area fraction in ``scale`` and aspect ratio in ``ratio``, resize.

    The same sampling rule as torchvision's, so the papers' augmentation means the same.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.7, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * (self.scale[0] + _rand() * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + _rand() * (log_ratio[1] - log_ratio[0]))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(_rand() * (width - w + 1))
                top = int(_rand() * (height - h + 1))
                return left, top, w, h
        # Fallback: the central crop with the ratio clamped to the allowed range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: Image.Image) -> Image.Image:
        left, top, w, h = self.box(*image.size)
        return image.resize(
            (self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h)
        )


class RandomHorizontalFlip(_Described):
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if _rand() < self.p:
            return image.transpose(Image.FLIP_LEFT_RIGHT)
        return image


#: Steps whose output depends on the image only (no random draw).
FIXED_STEPS = (Resize, CenterCrop)


def eval_transform(size: int, crop_ratio: float = 224 / 256, normalize: bool = True) -> Compose:
    """Resize the shorter side to ``size / crop_ratio``, centre-crop ``size`` (group_DRO)."""
    steps: list[Callable[[Image.Image], Image.Image]] = []
    if crop_ratio < 1.0:
        steps += [Resize(round(size / crop_ratio), keep_ratio=True), CenterCrop(size)]
    else:
        steps += [Resize(size)]
    stats = (IMAGENET_MEAN, IMAGENET_STD) if normalize else (None, None)
    return Compose(steps, *stats)


def train_transform(
    size: int,
    augment: bool = True,
    scale: tuple[float, float] = (0.7, 1.0),
    crop_ratio: float = 224 / 256,
    normalize: bool = True,
) -> Compose:
    """The papers' ERM augmentation: random resized crop + horizontal flip.

    Defaults follow group_DRO's Waterbirds/CelebA recipe (area scale 0.7-1.0, aspect
    3/4-4/3). Without ``augment`` this is the evaluation transform.
    """
    if not augment:
        return eval_transform(size, crop_ratio, normalize)
    stats = (IMAGENET_MEAN, IMAGENET_STD) if normalize else (None, None)
    return Compose([RandomResizedCrop(size, scale), RandomHorizontalFlip()], *stats)


def train_transform_for(data: DataConfig, train: TrainConfig) -> Compose:
    """The training transform a run's data and train settings ask for."""
    return train_transform(
        data.image_size, train.augment, tuple(train.augment_scale), data.crop_ratio, data.normalize
    )
