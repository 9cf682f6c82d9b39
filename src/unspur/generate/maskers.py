"""One interface for "give me the object mask of these images", three sources of masks.

Generative methods need the object (core) mask of an image: DBB inpaints inside it and
prunes with Integrated Gradients inside it, DiffInject's local edit is confined to it.
Where the mask comes from is a choice the method should not care about:

- :class:`~unspur.generate.segment.TextPromptMasker`: GroundingDINO boxes for a text
  prompt, SAM masks of the boxes (what LangSAM does, DBB's choice);
- :class:`SaliencyMasker`: the classifier's own xGradCAM map, top-K pixels (MaC's mask,
  no text and no extra model needed);
- :class:`GroundTruthMasker`: the dataset's own masks (the synthetic benchmark has
  exact ones), for upper-bound runs and for testing the rest.

Every masker returns one :class:`MaskResult` per image: a PIL ``"L"`` mask (0 or 255)
of the *image's* size, and ``ok``/``reason``. A masker never guesses: when it cannot
find the object (no box above the detector threshold, an all-zero saliency map, a row
without a ground-truth mask) the mask is empty, ``ok`` is ``False`` and ``reason`` says
why, so the caller can prune the sample and record the reason in the table (the
``kept``/``reason`` provenance columns). An empty mask is never silently replaced by a
full one (that would let an inpainter repaint the whole image).

:func:`build_masker` builds one by name from config options.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from unspur.errors import ConfigError, DataError

# The shared types live in mask_result (re-exported here, where callers have always
# imported them from); segment imports them from there too, so the factory below can
# import the text-prompt masker at the top without an import cycle.
from unspur.generate.mask_result import (
    EMPTY_MASK,
    FLAT_SALIENCY,
    NO_BOX,
    NO_GROUND_TRUTH,
    Masker,
    MaskResult,
    array_to_mask,
    dilate,
    make_result,
)
from unspur.generate.segment import TextPromptMasker

__all__ = [
    "EMPTY_MASK", "FLAT_SALIENCY", "NO_BOX", "NO_GROUND_TRUTH", "MASKER_ALIASES",
    "MASKER_KINDS", "GroundTruthMasker", "Masker", "MaskResult", "SaliencyMasker",
    "TextPromptMasker", "array_to_mask", "build_masker", "dilate", "make_result",
    "masker_class",
]  # fmt: skip


def _check_lengths(images: Sequence[Any], name: str, values: Sequence[Any] | None) -> None:
    if values is not None and len(values) != len(images):
        raise ConfigError(f"got {len(images)} images but {len(values)} {name}; give one per image")


# ------------------------------------------------------------------ saliency
class SaliencyMasker:
    """Top-K pixels of the classifier's xGradCAM map (MaC's core mask), per image.

    The saliency comes from :func:`unspur.explain.xgradcam.xgradcam` and the binary
    mask from :func:`unspur.explain.masks.top_k_mask` (exactly ``K`` pixels, ties broken
    by a fixed random order); nothing is re-implemented here. Each image is resized to
    ``image_size`` (a plain resize, no crop, so the map covers the whole image) and
    normalised with ``mean``/``std`` (ImageNet's by default, ``None`` for none) for the
    classifier; the CAM is upsampled straight to the image's own size, where the top
    ``top_k`` pixels (a count, or a fraction of the image's pixels; default the MaC
    paper's 29.9%) form the mask.

    ``targets`` passed to :meth:`masks` choose the explained class (MaC and DBB use the
    image's label); without them the predicted class is explained. A CAM that is flat
    (all zero after the ReLU, which happens when no channel supports the class) gives
    ``ok=False, reason="flat_saliency"``: top-K of a flat map would be random pixels.
    """

    kind = "saliency"

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        top_k: int | float | str | None = None,
        layer: nn.Module | str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        normalize: bool = True,
        seed: int | None = None,
        batch_size: int = 32,
        device: torch.device | str | None = None,
    ) -> None:
        from unspur.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, Resize
        from unspur.explain.masks import TIE_SEED

        if not isinstance(model, nn.Module):
            raise ConfigError("SaliencyMasker needs the classifier (a torch module) as model=")
        if int(image_size) < 1:
            raise ConfigError(f"image_size must be a positive pixel count, got {image_size!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.image_size = int(image_size)
        self.top_k = top_k
        self.layer = layer
        self.seed = TIE_SEED if seed is None else int(seed)
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else None
        if normalize:
            mean = IMAGENET_MEAN if mean is None else mean
            std = IMAGENET_STD if std is None else std
        else:
            mean = std = None
        self.transform = Compose([Resize(self.image_size)], mean, std)

    def masks(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str] | None = None,
        *,
        rows: Sequence[int] | None = None,
        targets: Sequence[int] | None = None,
    ) -> list[MaskResult]:
        """One top-K mask per image; ``prompts`` and ``rows`` are not used."""
        from unspur.explain.masks import resolve_top_k, top_k_mask
        from unspur.explain.xgradcam import xgradcam

        del prompts, rows
        _check_lengths(images, "targets", targets)
        device = self.device or next(self.model.parameters()).device
        out: list[MaskResult | None] = [None] * len(images)
        # One xGradCAM call per image size, so the CAM is upsampled once, straight to
        # the size of the images it explains.
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for (width, height), members in by_size.items():
            k = resolve_top_k(self.top_k, height, width)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                x = torch.stack([self.transform(images[i]) for i in chunk]).to(device)
                y = None
                if targets is not None:
                    y = torch.as_tensor([int(targets[i]) for i in chunk], device=device)
                maps = xgradcam(self.model, x, y, self.layer, size=(height, width)).cpu()
                chosen = top_k_mask(maps, k, seed=self.seed)
                flat = maps.reshape(len(chunk), -1)
                spread = flat.max(1).values - flat.min(1).values
                for j, i in enumerate(chunk):
                    if not float(spread[j]) > 0:
                        out[i] = MaskResult.empty(
                            (width, height),
                            FLAT_SALIENCY,
                            "the xGradCAM map is constant (no evidence for the class), "
                            "so its top-K pixels would be arbitrary",
                        )
                    else:
                        out[i] = make_result(array_to_mask(chosen[j]))
        return [r for r in out if r is not None]


# -------------------------------------------------------------- ground truth
class GroundTruthMasker:
    """The dataset's own object masks (``GroupTable.mask_store`` + the ``mask`` column).

    ``rows`` passed to :meth:`masks` are positions in ``table.frame``. A mask is
    resized (nearest) to its image's size when the two differ, and binarised at 128.
    A row whose ``mask`` cell is empty gives ``ok=False, reason="no_ground_truth"``;
    an all-zero mask gives ``reason="empty_mask"``. The synthetic benchmark
    (:func:`unspur.data.readers.synthetic.read_synthetic`) has exact masks.
    """

    kind = "ground_truth"

    def __init__(self, table: Any) -> None:
        if getattr(table, "mask_store", None) is None or "mask" not in table.frame.columns:
            raise ConfigError(
                f"{getattr(table, 'name', 'the dataset')} has no ground-truth masks (it needs "
                "a 'mask' column and a mask store); use masker kind 'text_prompt' or "
                "'saliency' instead"
            )
        self.table = table

    def masks(
        self,
        images: Sequence[Image.Image] | None = None,
        prompts: Sequence[str] | None = None,
        *,
        rows: Sequence[int] | None = None,
        targets: Sequence[int] | None = None,
    ) -> list[MaskResult]:
        """The masks of ``rows``; with ``images``, each at its image's size."""
        del prompts, targets
        if rows is None:
            raise ConfigError(
                "GroundTruthMasker.masks needs rows= (positions of the images in the table)"
            )
        if images is not None:
            _check_lengths(images, "rows", rows)
        frame = self.table.frame
        out = []
        for n, row in enumerate(rows):
            row = int(row)
            if not 0 <= row < len(frame):
                raise DataError(
                    f"row {row} is outside {self.table.name}'s table of {len(frame)} rows"
                )
            size = images[n].size if images is not None else None
            name = frame["mask"].iloc[row]
            if not isinstance(name, str) or not name:
                size = size or self.table.store.open(frame["filename"].iloc[row]).size
                out.append(
                    MaskResult.empty(
                        size, NO_GROUND_TRUTH, f"row {row} has no entry in the 'mask' column"
                    )
                )
                continue
            mask = self.table.mask_store.open(name).convert("L")
            if size is not None and mask.size != size:
                mask = mask.resize(size, Image.NEAREST)
            out.append(make_result(array_to_mask(np.asarray(mask))))
        return out


# ------------------------------------------------------------------- factory
MASKER_KINDS = ("text_prompt", "saliency", "ground_truth")
#: Other names accepted by :func:`build_masker` (the tools the papers name).
MASKER_ALIASES = {"langsam": "text_prompt", "xgradcam": "saliency"}


def masker_class(kind: str) -> type:
    """The class behind a masker name (imports the segmenter only when asked for)."""
    name = MASKER_ALIASES.get(str(kind).strip().lower(), str(kind).strip().lower())
    if name == "text_prompt":
        return TextPromptMasker
    if name == "saliency":
        return SaliencyMasker
    if name == "ground_truth":
        return GroundTruthMasker
    known = ", ".join(MASKER_KINDS)
    aliases = ", ".join(f"{a} (= {k})" for a, k in MASKER_ALIASES.items())
    raise ConfigError(f"unknown masker kind {kind!r}; choose one of: {known} (aliases: {aliases})")


def build_masker(kind: str, **options: Any) -> Masker:
    """A masker by name: ``text_prompt`` (alias ``langsam``), ``saliency`` (alias
    ``xgradcam``) or ``ground_truth``; ``options`` go to its constructor.

    Unknown kinds and unknown or missing options raise :class:`ConfigError` naming the
    accepted ones.
    """
    cls = masker_class(kind)
    parameters = inspect.signature(cls.__init__).parameters
    accepted = [p for p in parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"masker {kind!r} does not take option(s) {unknown}; it accepts {accepted}"
        )
    missing = [
        p.name
        for p in parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in options
    ]
    if missing:
        raise ConfigError(f"masker {kind!r} needs option(s) {missing}")
    return cls(**options)
