"""Text-prompted segmentation: GroundingDINO boxes for a prompt, SAM masks of the boxes.

This is the job LangSAM (luca-medeiros/lang-segment-anything) does in the DBB paper
("Leveraging Text-to-Image Generation for Handling Spurious Correlation"): the object
named by the class prompt ("bird") is found by GroundingDINO, and SAM turns each found
box into a mask. Both models run through transformers
(``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor``, ``SamModel`` +
``SamProcessor``) and load with ``from_pretrained`` from a hub id or a local directory.

Choices, with the reason for each:

- Thresholds are LangSAM's defaults: ``box_threshold=0.3`` keeps a box when its best
  token score (sigmoid) exceeds it; ``text_threshold=0.25`` only decides which prompt
  words label a kept box (``MaskResult.labels``), it drops no box, exactly as in
  LangSAM / GroundingDINO's ``predict``.
- Default models: :data:`DEFAULT_DETECTOR` ``IDEA-Research/grounding-dino-base`` and
  :data:`DEFAULT_SEGMENTER` ``facebook/sam-vit-huge``, the transformers ports of the
  checkpoints LangSAM loads (GroundingDINO Swin-B, SAM ViT-H), which is what the DBB
  paper used (section 4.1, footnote 1: LangSAM). :data:`LIGHT_DETECTOR`
  ``IDEA-Research/grounding-dino-tiny`` and :data:`LIGHT_SEGMENTER`
  ``facebook/sam-vit-base`` are a lighter pair (our choice when memory is short; pass
  them as ``detector`` / ``segmenter``).
- SAM runs with ``multimask_output=False`` (one mask per box, as LangSAM). Which boxes
  make the object mask (``box_selection``): ``best`` (default) the mask of the
  highest-scoring box; ``first`` the first box in the detector's output order (what the
  official DBB ``generate.py`` does: it takes LangSAM's first mask); ``union`` the union
  of the masks of every kept box. The paper does not say which of several boxes it uses;
  ``best`` is our choice (the detector's most confident box, independent of the query
  order the first box depends on).
- No dilation here: a mask is SAM's mask as it is (grow it in the caller only when a
  config asks, e.g. DBB's ``mask_dilation``).
- No box above the threshold -> an empty mask with ``ok=False, reason="no_box"``; boxes
  whose masks are all empty -> ``reason="empty_mask"``. Never a full mask: the caller
  prunes the sample and records the reason.
- Prompts are lower-cased and end with ``"."`` (GroundingDINO's phrase separator; it
  also stops the processor from merging a batch of dot-free prompts into one caption).
- Each model is loaded once per process: :func:`load_detector` / :func:`load_sam` keep
  a module-level cache keyed by (model, device, dtype). fp16 on CUDA, fp32 on CPU.
- Images are fed as given (the raw, un-normalised PIL image from the table's store;
  the classifier's transforms are never applied here), in batches of ``batch_size``.

:func:`load_pretrained` and :func:`cached_model` are shared with
:mod:`unspur.generate.clip_score`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unspur.errors import ConfigError, UnspurError
from unspur.generate.hub import placement
from unspur.generate.mask_result import EMPTY_MASK, NO_BOX, MaskResult, array_to_mask

#: The checkpoints LangSAM used (GroundingDINO Swin-B, SAM ViT-H), as transformers ports:
#: the DBB paper's masker (section 4.1, footnote 1), hence the defaults.
LANGSAM_DETECTOR = "IDEA-Research/grounding-dino-base"
LANGSAM_SEGMENTER = "facebook/sam-vit-huge"
DEFAULT_DETECTOR = LANGSAM_DETECTOR
DEFAULT_SEGMENTER = LANGSAM_SEGMENTER
#: A lighter pair (our choice when GPU memory is short).
LIGHT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
LIGHT_SEGMENTER = "facebook/sam-vit-base"
#: Which detected boxes make the object mask (see the module docstring).
BOX_SELECTIONS = ("best", "first", "union")
BOX_THRESHOLD = 0.3
TEXT_THRESHOLD = 0.25

# ------------------------------------------------------------ loading, cache
_MODELS: dict[tuple[str, str, str, str], Any] = {}


def clear_model_cache() -> None:
    """Forget every model loaded by this module and :mod:`clip_score` (frees memory)."""
    _MODELS.clear()


def source_name(name: str | Path) -> tuple[str, bool]:
    """``(name, is_local)`` for a hub id or a local model directory.

    A local directory must hold ``config.json`` (the ``save_pretrained`` output); a path
    that does not exist and does not look like a hub id (``owner/name``) is an error.
    """
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"{path} is a file; pass the model directory written by save_pretrained"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model directory {path} lacks config.json; it must be the output of "
                "model.save_pretrained(directory) (config.json and the weights) plus "
                "processor.save_pretrained(directory)"
            )
        return str(path.resolve()), True
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or not text:
        raise ConfigError(
            f"model directory {path} does not exist; pass an existing directory written by "
            "save_pretrained, or a hub id such as 'facebook/sam-vit-base'"
        )
    return text, False


def load_pretrained(
    loader: Callable[..., Any], name: str, is_local: bool, what: str, **kwargs: Any
) -> Any:
    """``loader(name, **kwargs)`` (a ``from_pretrained``) with errors the user can act on."""
    from unspur.models.hf_backbone import hub_offline

    offline = hub_offline()
    try:
        return loader(name, local_files_only=is_local or offline, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        if is_local:
            advice = (
                f"check that {name} holds the {what}'s files as written by save_pretrained "
                "(config.json, weights, and the processor's configs)"
            )
        else:
            advice = (
                "without network access (or with HF_HUB_OFFLINE=1"
                + (", which is set" if offline else "")
                + ") pass a local directory holding the model and processor saved with "
                "save_pretrained on a machine with access"
            )
        raise UnspurError(f"could not load the {what} from {name!r}: {err}. Fix: {advice}") from err


def cached_model(
    kind: str,
    name: str | Path,
    device: torch.device | str | None,
    dtype: torch.dtype | str | None,
    build: Callable[[str, bool, torch.device, torch.dtype], Any],
) -> Any:
    """Load once per process: ``build(name, is_local, device, dtype)`` for a new
    (kind, name, device, dtype), the cached object otherwise."""
    resolved, is_local = source_name(name)
    device, dtype = placement(device, dtype)
    key = (kind, resolved, str(device), str(dtype))
    if key not in _MODELS:
        _MODELS[key] = build(resolved, is_local, device, dtype)
    return _MODELS[key]


def load_detector(
    name: str | Path = DEFAULT_DETECTOR,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """GroundingDINO ``(model, processor)`` in eval mode, loaded once per process."""

    def build(source: str, is_local: bool, dev: torch.device, dt: torch.dtype) -> tuple[Any, Any]:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        processor = load_pretrained(
            AutoProcessor.from_pretrained, source, is_local, "detector processor"
        )
        model = load_pretrained(
            AutoModelForZeroShotObjectDetection.from_pretrained,
            source,
            is_local,
            "detector",
            dtype=dt,
        )
        return model.to(dev).eval(), processor

    return cached_model("detector", name, device, dtype, build)


def load_sam(
    name: str | Path = DEFAULT_SEGMENTER,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """SAM ``(model, processor)`` in eval mode, loaded once per process."""

    def build(source: str, is_local: bool, dev: torch.device, dt: torch.dtype) -> tuple[Any, Any]:
        from transformers import SamModel, SamProcessor

        processor = load_pretrained(SamProcessor.from_pretrained, source, is_local, "SAM processor")
        model = load_pretrained(SamModel.from_pretrained, source, is_local, "SAM model", dtype=dt)
        return model.to(dev).eval(), processor

    return cached_model("sam", name, device, dtype, build)


def _to_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move a processor's output to ``device``; floating tensors (pixels) to ``dtype``."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def normalize_prompt(prompt: str) -> str:
    """Lower-case, stripped, ending with ``"."`` (GroundingDINO's caption format)."""
    if not isinstance(prompt, str) or not prompt.strip(" ."):
        raise ConfigError(f"a segmentation prompt must name the object, got {prompt!r}")
    text = prompt.strip().lower()
    return text if text.endswith(".") else text + "."


def select_boxes(boxes: np.ndarray, scores: np.ndarray, selection: str) -> np.ndarray:
    """The boxes whose SAM masks make the object mask: ``best`` the highest-scoring one
    (the first of equal scores), ``first`` the first in the detector's order (the
    official DBB code), ``union`` all of them. ``boxes`` is ``(n, 4)``, ``n >= 1``."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if selection == "union":
        return boxes
    if selection == "first":
        return boxes[:1]
    if selection == "best":
        return boxes[int(np.argmax(np.asarray(scores, dtype=np.float64)))][None]
    raise ConfigError(f"box_selection must be one of {BOX_SELECTIONS}, got {selection!r}")


# -------------------------------------------------------------- the masker
class TextPromptMasker:
    """GroundingDINO + SAM (LangSAM) as a :class:`~unspur.generate.maskers.Masker`.

    ``detector``/``segmenter`` are hub ids or local directories holding the model and
    its processor. See the module docstring for the thresholds and what happens when
    nothing is found.
    """

    kind = "text_prompt"

    def __init__(
        self,
        detector: str | Path = DEFAULT_DETECTOR,
        segmenter: str | Path = DEFAULT_SEGMENTER,
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
        batch_size: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        box_selection: str = "best",
    ) -> None:
        if box_selection not in BOX_SELECTIONS:
            raise ConfigError(
                f"box_selection must be one of {BOX_SELECTIONS}, got {box_selection!r}"
            )
        self.box_selection = box_selection
        for label, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{label} must lie in [0, 1] (a sigmoid score), got {value}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.batch_size = int(batch_size)
        self.device, self.dtype = placement(device, dtype)
        self.detector_model, self.detector_processor = load_detector(
            detector, self.device, self.dtype
        )
        self.sam_model, self.sam_processor = load_sam(segmenter, self.device, self.dtype)

    # ------------------------------------------------------------ the stages
    @torch.no_grad()
    def detect(
        self, images: Sequence[Image.Image], prompts: Sequence[str]
    ) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Boxes (``(n, 4)`` ``x0, y0, x1, y1`` pixels), scores and labels per image."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            texts = [normalize_prompt(p) for p in prompts[start : start + self.batch_size]]
            inputs = self.detector_processor(
                images=batch, text=texts, padding=True, return_tensors="pt"
            )
            outputs = self.detector_model(**_to_device(inputs, self.device, self.dtype))
            # Post-process in float32 on the CPU (fp16 sigmoid scores are too coarse
            # near the threshold).
            outputs.logits = outputs.logits.float().cpu()
            outputs.pred_boxes = outputs.pred_boxes.float().cpu()
            results = self.detector_processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"],
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=[im.size[::-1] for im in batch],
            )
            for result in results:
                out.append(
                    (
                        result["boxes"].detach().float().cpu().numpy().reshape(-1, 4),
                        result["scores"].detach().float().cpu().numpy().reshape(-1),
                        [str(t) for t in result["text_labels"]],
                    )
                )
        return out

    @torch.no_grad()
    def segment(
        self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """Union of SAM's masks of each image's boxes: boolean ``(H, W)`` per image.

        Every image needs at least one box. Within a batch, images with fewer boxes
        repeat their first box (SAM needs a rectangular box tensor; a repeated box adds
        the same mask again, which leaves the union unchanged).
        """
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            batch_boxes = [
                np.asarray(b, dtype=np.float32).reshape(-1, 4)
                for b in boxes[start : start + self.batch_size]
            ]
            if any(len(b) == 0 for b in batch_boxes):
                raise ConfigError("segment() needs at least one box per image")
            most = max(len(b) for b in batch_boxes)
            padded = [
                np.concatenate([b, np.repeat(b[:1], most - len(b), axis=0)]).tolist()
                for b in batch_boxes
            ]
            inputs = self.sam_processor(images=batch, input_boxes=padded, return_tensors="pt")
            outputs = self.sam_model(
                **_to_device(
                    {k: inputs[k] for k in ("pixel_values", "input_boxes")}, self.device, self.dtype
                ),
                multimask_output=False,
            )
            masks = self.sam_processor.image_processor.post_process_masks(
                outputs.pred_masks.float().cpu(),
                inputs["original_sizes"].cpu(),
                inputs["reshaped_input_sizes"].cpu(),
            )
            for mask in masks:  # (boxes, 1, H, W) boolean
                out.append(mask.reshape(-1, *mask.shape[-2:]).any(0).numpy())
        return out

    # --------------------------------------------------------------- masker
    def masks(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str] | None = None,
        *,
        rows: Sequence[int] | None = None,
        targets: Sequence[int] | None = None,
    ) -> list[MaskResult]:
        """The object mask of each image, the object named by its prompt."""
        del rows, targets
        if prompts is None:
            raise ConfigError("TextPromptMasker needs prompts= (the object to find in each image)")
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ConfigError(
                f"got {len(images)} images but {len(prompts)} prompts; give one per image"
            )
        detections = self.detect(images, prompts)
        found = [i for i, (b, _, _) in enumerate(detections) if len(b)]
        chosen = [select_boxes(*detections[i][:2], self.box_selection) for i in found]
        unions = self.segment([images[i] for i in found], chosen)
        union_of = dict(zip(found, unions))
        results = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            boxes, scores, labels = detections[i]
            info = {
                "boxes": tuple(tuple(float(v) for v in box) for box in boxes),
                "scores": tuple(float(s) for s in scores),
                "labels": tuple(labels),
            }
            if i not in union_of:
                results.append(
                    MaskResult.empty(
                        image.size,
                        NO_BOX,
                        f"no box scored above box_threshold={self.box_threshold} for "
                        f"prompt {normalize_prompt(prompt)!r}",
                    )
                )
            elif not union_of[i].any():
                results.append(
                    MaskResult.empty(
                        image.size,
                        EMPTY_MASK,
                        f"SAM's mask(s) of the {self.box_selection} box(es) found for "
                        f"{normalize_prompt(prompt)!r} are all empty",
                        **info,
                    )
                )
            else:
                results.append(MaskResult(array_to_mask(union_of[i]), ok=True, **info))
        return results
