"""What every masker returns: :class:`MaskResult`, the :class:`Masker` protocol, and the
small mask helpers (binarising, dilation) that maskers, segmenters and pipelines share.

A module of its own so that :mod:`unspur.generate.maskers` (the factory, which knows every
masker) and :mod:`unspur.generate.segment` (the GroundingDINO + SAM masker) both import
these types from here, and neither imports the other's module to get them: no import
cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unspur.errors import ConfigError

# Reason codes, shared by every masker (``MaskResult.reason``); ``""`` when ok.
NO_BOX = "no_box"
EMPTY_MASK = "empty_mask"
FLAT_SALIENCY = "flat_saliency"
NO_GROUND_TRUTH = "no_ground_truth"


@dataclass(frozen=True)
class MaskResult:
    """The object mask of one image and whether it can be used.

    ``mask`` is a PIL ``"L"`` image of the input image's size with values 0 or 255.
    ``ok`` is ``False`` when no object was found; ``reason`` is then one of the codes
    above (``no_box``, ``empty_mask``, ``flat_saliency``, ``no_ground_truth``) and
    ``detail`` a sentence for logs. ``boxes``/``scores``/``labels`` hold the detector's
    kept boxes (``x0, y0, x1, y1`` in image pixels), when a detector made the mask.
    """

    mask: Image.Image
    ok: bool
    reason: str = ""
    detail: str = ""
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    scores: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()

    @property
    def array(self) -> np.ndarray:
        """The mask as a boolean ``(H, W)`` array."""
        return np.asarray(self.mask) >= 128

    @property
    def area(self) -> float:
        """Fraction of the image's pixels inside the mask."""
        return float(self.array.mean()) if self.mask.width and self.mask.height else 0.0

    @classmethod
    def from_array(cls, array: np.ndarray | torch.Tensor, **info: Any) -> MaskResult:
        """A result from a boolean (or 0/1) ``(H, W)`` array; ``ok`` defaults to True.

        An all-false array is reported as ``ok=False, reason="empty_mask"`` unless the
        caller says otherwise.
        """
        return make_result(array_to_mask(array), **info)

    @classmethod
    def empty(cls, size: tuple[int, int], reason: str, detail: str = "", **info: Any) -> MaskResult:
        """An all-zero mask of ``size`` (``(width, height)``, PIL order) that is not ok."""
        return cls(Image.new("L", size, 0), ok=False, reason=reason, detail=detail, **info)


def array_to_mask(array: np.ndarray | torch.Tensor) -> Image.Image:
    """A boolean (or 0/1, or 0..255 with 128 as threshold) ``(H, W)`` array -> ``"L"`` 0/255."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise ConfigError(f"a mask must be 2-D (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        binary = array >= 128
    else:
        binary = array.astype(bool) if array.dtype == bool else array > 0.5
    return Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), mode="L")


def make_result(mask: Image.Image, ok: bool = True, **info: Any) -> MaskResult:
    """Wrap a mask; an empty mask is never ok (reason ``empty_mask``)."""
    if ok and not (np.asarray(mask) >= 128).any():
        info.setdefault("reason", EMPTY_MASK)
        info.setdefault("detail", "the mask has no pixel inside the object")
        ok = False
    return MaskResult(mask, ok=ok, **info)


def dilate(mask: Image.Image | np.ndarray, pixels: int) -> Image.Image | np.ndarray:
    """Grow a binary mask by ``pixels`` in every direction (a square structuring element).

    Inpainting masks are usually grown a little so that the object's outline (which
    SAM or a CAM places within a pixel or two) is repainted too. A pixel joins the mask
    when any pixel within Chebyshev distance ``pixels`` is in it (``cv2.dilate`` with
    an ``np.ones((2p+1, 2p+1))`` kernel). Takes and returns a PIL ``"L"`` image (0/255)
    or a boolean array; ``pixels=0`` returns a copy.
    """
    if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 0:
        raise ConfigError(f"dilation must be a whole number of pixels >= 0, got {pixels!r}")
    is_image = isinstance(mask, Image.Image)
    array = np.asarray(mask.convert("L")) >= 128 if is_image else np.asarray(mask).astype(bool)
    if array.ndim != 2:
        raise ConfigError(f"dilate expects a 2-D mask, got shape {array.shape}")
    if pixels > 0:
        t = torch.from_numpy(array.astype(np.float32))[None, None]
        t = F.max_pool2d(t, kernel_size=2 * int(pixels) + 1, stride=1, padding=int(pixels))
        array = t[0, 0].numpy() > 0.5
    else:
        array = array.copy()
    return array_to_mask(array) if is_image else array


# ------------------------------------------------------------------ protocol
@runtime_checkable
class Masker(Protocol):
    """Anything that returns one object mask per image.

    ``prompts`` name the object in each image (used by text-prompted maskers).
    ``rows`` are positions in the masker's table (ground-truth maskers) and
    ``targets`` class indices (saliency maskers explain that class); a masker that
    needs one of them and does not get it raises :class:`~unspur.errors.ConfigError`.
    """

    kind: str

    def masks(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str] | None = None,
        *,
        rows: Sequence[int] | None = None,
        targets: Sequence[int] | None = None,
    ) -> list[MaskResult]: ...
