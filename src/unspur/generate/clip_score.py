"""CLIP scores for generated images: text agreement, closeness to the real group, filtering.

Clustered DreamBooth ("Harnessing Diffusion-Generated Synthetic Images for Fair Image
Classification") keeps a generated image of a group when it both shows the group's
label and looks like the group's real images. Its filter score is

    score = alpha * CLIP-label + (1 - alpha) * CLIP-centroid

where CLIP-label is the cosine similarity of the image's CLIP embedding to the text of
its group label (the prompt) and CLIP-centroid the cosine similarity to the centroid of
the CLIP embeddings of the real images of the group (or of the cluster the generator
was fine-tuned on); the top 75% of the images by score are kept
(:func:`keep_top_fraction`). The same CLIP embeddings serve the k-means clustering of a
group's real images.

Choices, with the reason for each:

- The model defaults to :data:`DEFAULT_CLIP` ``openai/clip-vit-large-patch14`` (CLIP
  ViT-L/14): the CLIP of Stable Diffusion 1.x's text encoder, the usual backbone for
  CLIP scores of SD images, and the strongest of OpenAI's CLIPs at 224 px. The papers'
  text available here does not name the variant, so this is our choice, not a quote;
  any ``CLIPModel`` checkpoint (hub id or local directory) can be passed.
- Scores are plain cosine similarities in [-1, 1] (not CLIPScore's ``2.5 * max(cos,
  0)``), so the two terms of the filter score are on the same scale and ``alpha``
  weighs them as written.
- Embeddings are the projected ``pooler_output`` (the joint image-text space),
  L2-normalised, float32 on the CPU. The centroid is the normalised mean of the
  normalised embeddings (the direction of the group; cosine similarity ignores its
  length).
- :data:`DEFAULT_ALPHA` is 0.5 (equal weight); the paper ablates ``alpha``, so set it
  per dataset in the method's config.
- The model is loaded once per process (the cache of :mod:`unspur.generate.segment`,
  keyed by model, device and dtype), fp16 on CUDA, fp32 on CPU; images go in as raw
  PIL images (CLIP's own processor resizes and normalises them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unspur.errors import ConfigError
from unspur.generate.hub import placement
from unspur.generate.segment import cached_model, load_pretrained

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_ALPHA = 0.5
#: Clustered DreamBooth keeps the top 75% of generated images by filter score.
KEEP_FRACTION = 0.75


def load_clip(
    name: str | Path = DEFAULT_CLIP,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[Any, Any]:
    """CLIP ``(model, processor)`` in eval mode, loaded once per process."""

    def build(source: str, is_local: bool, dev: torch.device, dt: torch.dtype) -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        processor = load_pretrained(
            CLIPProcessor.from_pretrained, source, is_local, "CLIP processor"
        )
        model = load_pretrained(CLIPModel.from_pretrained, source, is_local, "CLIP model", dtype=dt)
        return model.to(dev).eval(), processor

    return cached_model("clip", name, device, dtype, build)


def features(output: Any) -> torch.Tensor:
    """The embedding tensor of ``get_image_features``/``get_text_features``.

    transformers 4 returns the projected tensor; transformers 5 returns an output object
    whose ``pooler_output`` holds the projection.
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ConfigError(f"cannot find CLIP embeddings in a {type(output).__name__}")


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def group_centroid(embeddings: torch.Tensor) -> torch.Tensor:
    """The unit-length mean direction of a set of embeddings ``(N, D)`` -> ``(D,)``."""
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ConfigError("a centroid needs a non-empty (N, D) set of embeddings")
    return normalize(normalize(embeddings).mean(0))


def cosine_to(embeddings: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``embeddings`` ``(N, D)`` to ``centroid`` ``(D,)``."""
    if centroid.ndim != 1 or embeddings.shape[-1] != centroid.shape[0]:
        raise ConfigError(
            f"centroid of size {tuple(centroid.shape)} does not match embeddings of size "
            f"{embeddings.shape[-1]}; compute both with the same CLIP model"
        )
    return normalize(embeddings) @ normalize(centroid)


def filter_score(
    label_similarity: torch.Tensor | np.ndarray,
    centroid_similarity: torch.Tensor | np.ndarray,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """Clustered DreamBooth's ``alpha * CLIP-label + (1 - alpha) * CLIP-centroid``."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    label = torch.as_tensor(label_similarity, dtype=torch.float32)
    centroid = torch.as_tensor(centroid_similarity, dtype=torch.float32)
    if label.shape != centroid.shape:
        raise ConfigError(
            f"label and centroid similarities differ in shape: {label.shape} vs {centroid.shape}"
        )
    return float(alpha) * label + (1.0 - float(alpha)) * centroid


def keep_top_fraction(
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    fraction: float = KEEP_FRACTION,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask keeping the ``ceil(fraction * n)`` highest scores (per group).

    ``ceil`` so that at least the stated share is kept and a non-empty set always
    keeps one image (8 images at 0.75 keep 6; 10 keep 8). Ties are broken by position
    (earlier first); NaN scores rank below every number. With ``groups`` (one key per
    score) the fraction applies within each group, so a small group is not wiped out by
    a large one.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"the kept fraction must lie in (0, 1], got {fraction}")
    values = torch.as_tensor(scores).detach().cpu().double().numpy().reshape(-1)
    keys = np.zeros(len(values), dtype=np.int64) if groups is None else np.asarray(groups)
    if len(keys) != len(values):
        raise ConfigError(f"got {len(values)} scores but {len(keys)} group keys")
    ranked = np.where(np.isnan(values), -np.inf, values)
    keep = np.zeros(len(values), dtype=bool)
    for key in dict.fromkeys(keys.tolist()):
        members = np.flatnonzero(keys == key)
        count = math.ceil(float(fraction) * len(members) - 1e-9)
        order = members[np.argsort(-ranked[members], kind="stable")]
        keep[order[:count]] = True
    return keep


class ClipScorer:
    """CLIP embeddings and the scores built on them, for one CLIP checkpoint.

    ``model`` is a hub id or a local directory holding a ``CLIPModel`` and its
    ``CLIPProcessor`` (``save_pretrained`` output). Images and texts are embedded in
    batches of ``batch_size``.
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_CLIP,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype = placement(device, dtype)
        self.batch_size = int(batch_size)
        self.model, self.processor = load_clip(model, self.device, self.dtype)

    # ------------------------------------------------------------ embeddings
    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length CLIP image embeddings ``(N, D)``, float32 on the CPU."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            output = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            out.append(normalize(features(output)).cpu())
        if not out:
            raise ConfigError("no images to embed")
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings ``(N, D)``; texts longer than the model's
        context (77 tokens for CLIP) are truncated."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor(
                text=list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                return_tensors="pt",
            )
            output = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            out.append(normalize(features(output)).cpu())
        if not out:
            raise ConfigError("no texts to embed")
        return torch.cat(out)

    # ---------------------------------------------------------------- scores
    def text_similarity(
        self, images: Sequence[Image.Image], texts: str | Sequence[str]
    ) -> torch.Tensor:
        """Cosine similarity of image ``i`` and text ``i`` ``(N,)``; one string is
        compared with every image."""
        return self._label_similarity(self.image_embeddings(images), texts)

    def _label_similarity(
        self, embeddings: torch.Tensor, texts: str | Sequence[str]
    ) -> torch.Tensor:
        if isinstance(texts, str):
            return embeddings @ self.text_embeddings([texts])[0]
        if len(texts) != len(embeddings):
            raise ConfigError(
                f"got {len(embeddings)} images but {len(texts)} texts; give one text per "
                "image, or one string for all"
            )
        unique = list(dict.fromkeys(texts))
        table = self.text_embeddings(unique)
        index = torch.as_tensor([unique.index(t) for t in texts])
        return (embeddings * table[index]).sum(-1)

    def centroid(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The group centroid ``(D,)`` of a set of (real) images."""
        return group_centroid(self.image_embeddings(images))

    def centroid_similarity(
        self, images: Sequence[Image.Image], centroid: torch.Tensor
    ) -> torch.Tensor:
        """Cosine similarity of each image to a centroid ``(N,)``."""
        return cosine_to(self.image_embeddings(images), centroid)

    def filter_scores(
        self,
        images: Sequence[Image.Image],
        texts: str | Sequence[str],
        centroid: torch.Tensor,
        alpha: float = DEFAULT_ALPHA,
    ) -> torch.Tensor:
        """Clustered DreamBooth's filter score of each image (one embedding pass)."""
        embeddings = self.image_embeddings(images)
        return filter_score(
            self._label_similarity(embeddings, texts), cosine_to(embeddings, centroid), alpha
        )


def build_tiny_clip(directory: Path, words: list[str]) -> Path:
    """A randomly initialised 32-wide CLIP (32 px images) and its offline tokenizer, saved.

    For runs and tests without CLIP weights: its embeddings carry no meaning, but every
    code path of a real CLIP (processor, both towers, projection) runs. Reused when
    ``directory`` already holds one.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from unspur.generate.tokenizer import build_tokenizer
    from unspur.io import atomic_dir

    if (directory / "config.json").is_file():
        return directory
    tokenizer = build_tokenizer(words)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4}  # fmt: skip
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    with atomic_dir(directory) as scratch:
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)
    return directory
