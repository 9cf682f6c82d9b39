"""Domain models: small Stable Diffusion-shaped models trained from scratch on the user's
training images, the generative engine's embedded default.

Where no Stable Diffusion weights are available (no GPU, no download), every
generative method still runs: :func:`train_domain_model` trains, on the training split
of a :class:`~unspur.data.table.GroupTable`, exactly the components a Stable Diffusion
pipeline is made of (``CLIPTokenizer`` + ``CLIPTextModel``, ``AutoencoderKL``,
``UNet2DConditionModel``, a DDIM scheduler), only small, with captions built from the
labels (``"a photo of a {class} on {bias}"``). The result is two ordinary diffusers
pipeline directories::

    out_dir/text2image/   StableDiffusionPipeline.from_pretrained(...)
    out_dir/inpaint/      StableDiffusionInpaintPipeline.from_pretrained(...)
    out_dir/domain.json   captions, names, sizes, steps, seed, data fingerprint, losses
    out_dir/work/         per-stage checkpoints (a killed training resumes from them)

so a method calls the same ``from_pretrained`` on a domain model and on
``stabilityai/stable-diffusion-2-inpainting``. Both pipelines share the tokenizer, the
text encoder and the autoencoder (textual-inversion tokens learned on one work in the
other).

Three stages, each through :func:`unspur.generate.training.train_steps`:

1. the autoencoder (factor ``2 ** (len(vae_channels) - 1)``) for reconstruction with a
   tiny KL weight; then ``scaling_factor`` is set to 1 / std of the training latents,
   as Stable Diffusion does, so the diffusion model sees unit-variance latents;
2. the text-conditional UNet and the text encoder, jointly, from scratch: noise-
   prediction MSE on a cosine schedule with min-SNR weighting and EMA; captions drop
   out entirely (10%), or lose the class or the background (10% each), so guidance
   can also be computed against a caption with only one of the two;
3. the inpainting UNet (``in_channels = 2 * latent + 1``), initialised from stage 2
   with the extra input channels zeroed (as SD-inpainting was made from SD), trained
   with the text encoder frozen on random boxes, blobs, whole-image masks and, when the
   table has object masks, the (dilated or boxed) object masks; its extra channels are
   the downsampled mask and the masked image's latents, exactly as
   ``StableDiffusionInpaintPipeline.prepare_mask_latents`` builds them (mask 1 =
   repaint, masked image = image * (mask < 0.5), nearest-neighbour downsampling).

Training images are decoded once and held in memory as uint8 (32 px: 3 KB an image).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from unspur.data.table import GroupTable
from unspur.errors import CheckpointError, ConfigError, DataError
from unspur.generate.components import (
    ComponentSizes,
    build_text_encoder,
    build_unet,
    build_vae,
    inpaint_in_channels,
)
from unspur.generate.tokenizer import build_tokenizer
from unspur.generate.training import GenerativeTrainConfig, train_steps
from unspur.io import atomic_dir, atomic_write_json

Task = Literal["text2image", "inpaint"]

#: Named sizes. ``small`` is the benchmark size (see bench/results/generators/);
#: ``tiny`` is for tests. Both have a factor-2 autoencoder: 32 px -> 16x16x4 latents.
SIZE_PRESETS: dict[str, ComponentSizes] = {
    "tiny": ComponentSizes(
        unet_channels=(16, 32),
        attention_head_dim=2,
        text_hidden_size=16,
        text_layers=1,
        text_heads=2,
        text_intermediate_size=32,
        max_text_length=32,
        vae_channels=(16, 16),
        norm_num_groups=8,
    ),
    "small": ComponentSizes(
        unet_channels=(32, 64, 64),
        unet_layers_per_block=1,
        attention_head_dim=4,
        text_hidden_size=64,
        text_layers=2,
        text_heads=4,
        text_intermediate_size=128,
        vae_channels=(32, 64),
        vae_layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ),
}

#: Fields of :class:`DomainModelConfig` that do not change the trained model.
_NON_SEMANTIC = {"device", "save_every", "log_every"}
_PLACEHOLDERS = ("{class}", "{bias}")
_UNSUPPORTED_MODES = {"I", "I;16", "I;16B", "I;16L", "F", "CMYK", "YCbCr", "LAB", "HSV"}

DOMAIN_FILE = "domain.json"
TEXT2IMAGE = "text2image"
INPAINT = "inpaint"


@dataclass
class DomainModelConfig:
    """Settings of :func:`train_domain_model`; the defaults are the benchmark's (about
    half an hour to two hours of one CPU thread for 32 px images, see
    bench/results/generators/, whose ``recipe_domain`` asset is these defaults).

    ``caption_template`` names the class ``{class}`` and the bias attribute ``{bias}``;
    ``class_template`` / ``bias_template`` are the captions with only one of them
    (used for the separate dropouts). ``*_steps`` are optimiser steps per stage;
    ``unet_lr`` is used by stages 2 and 3.
    """

    image_size: int = 32
    sizes: str = "small"
    vae_steps: int = 500
    unet_steps: int = 2800
    inpaint_steps: int = 500
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    warmup_steps: int = 20
    kl_weight: float = 1e-6
    ema_decay: float = 0.999
    snr_gamma: float | None = 5.0
    beta_schedule: str = "squaredcos_cap_v2"
    caption_template: str = "a photo of a {class} on {bias}"
    class_template: str = "a photo of a {class}"
    bias_template: str = "a photo on {bias}"
    caption_dropout: float = 0.1
    class_dropout: float = 0.1
    bias_dropout: float = 0.1
    object_mask_prob: float = 0.5
    full_mask_prob: float = 0.1
    mixed_modes: Literal["error", "convert"] = "error"
    seed: int = 0
    device: str = "auto"
    save_every: int = 100
    log_every: int = 25

    def component_sizes(self) -> ComponentSizes:
        if self.sizes not in SIZE_PRESETS:
            raise ConfigError(
                f"domain model sizes {self.sizes!r} is unknown; choose one of "
                f"{sorted(SIZE_PRESETS)}"
            )
        sizes = replace(SIZE_PRESETS[self.sizes], image_size=self.image_size)
        factor = sizes.vae_scale_factor * 2 ** (len(sizes.unet_channels) - 1)
        if self.image_size % factor:
            raise ConfigError(
                f"image_size={self.image_size} must be a multiple of {factor} for the "
                f"{self.sizes!r} sizes (autoencoder and UNet downsampling)"
            )
        return sizes

    def validate(self) -> None:
        self.component_sizes()
        for name in ("vae_steps", "unet_steps", "inpaint_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"domain model {name} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("domain model batch_size must be >= 1")
        for placeholder in _PLACEHOLDERS:
            if placeholder not in self.caption_template:
                raise ConfigError(
                    f"caption_template {self.caption_template!r} must contain {placeholder}"
                )
        if "{class}" not in self.class_template or "{bias}" not in self.bias_template:
            raise ConfigError(
                "class_template must contain {class} and bias_template must contain {bias}"
            )
        drops = self.caption_dropout + self.class_dropout + self.bias_dropout
        if min(self.caption_dropout, self.class_dropout, self.bias_dropout) < 0 or drops > 1:
            raise ConfigError("caption/class/bias dropouts must be >= 0 and sum to <= 1")
        if not 0 <= self.object_mask_prob + self.full_mask_prob <= 1:
            raise ConfigError("object_mask_prob + full_mask_prob must lie in [0, 1]")
        if self.mixed_modes not in ("error", "convert"):
            raise ConfigError(f"mixed_modes must be 'error' or 'convert', not {self.mixed_modes!r}")

    def settings(self) -> dict[str, Any]:
        """The fields that determine the trained model (not where or how it logs)."""
        return {k: v for k, v in asdict(self).items() if k not in _NON_SEMANTIC}


# ------------------------------------------------------------------ captions
def _name_text(name: str) -> str:
    return " ".join(str(name).replace("_", " ").split())


def fill_template(template: str, class_name: str = "", bias_name: str = "") -> str:
    text = template.replace("{class}", _name_text(class_name))
    return " ".join(text.replace("{bias}", _name_text(bias_name)).split())


@dataclass(frozen=True)
class Captions:
    """The caption of every ``(y, a)`` and its class-only / bias-only / empty forms."""

    class_names: tuple[str, ...]
    attr_names: tuple[str, ...]
    template: str = DomainModelConfig.caption_template
    class_template: str = DomainModelConfig.class_template
    bias_template: str = DomainModelConfig.bias_template

    def caption(self, y: int | None, a: int | None) -> str:
        """Full caption; ``a=None`` gives the class-only form, ``y=None`` the bias-only
        form, both None the empty (unconditional) caption."""
        if y is None and a is None:
            return ""
        if a is None:
            return fill_template(self.class_template, class_name=self.class_names[y])
        if y is None:
            return fill_template(self.bias_template, bias_name=self.attr_names[a])
        return fill_template(self.template, self.class_names[y], self.attr_names[a])

    def variants(self, y: int, a: int) -> list[str]:
        """[full, class only, bias only, empty]: the order of the dropout variants."""
        return [self.caption(y, a), self.caption(y, None), self.caption(None, a), ""]

    def all_texts(self) -> list[str]:
        return [
            text
            for y in range(len(self.class_names))
            for a in range(len(self.attr_names))
            for text in self.variants(y, a)
        ]


def check_names(class_names: list[str], attr_names: list[str], tokenizer=None) -> None:
    """Refuse names a caption cannot tell apart: empty, symbol-only, or duplicated."""
    for kind, names in (("class", class_names), ("attribute", attr_names)):
        seen: dict[str, str] = {}
        for name in names:
            text = _name_text(name).lower()
            words = [w for w in text.split() if any(c.isalnum() for c in w)]
            tokens = [] if tokenizer is None else tokenizer(text)["input_ids"][1:-1]
            if not words or (tokenizer is not None and not tokens):
                raise DataError(
                    f"{kind} name {name!r} gives no word for the captions; name every "
                    f"{kind} with letters or digits (e.g. 'waterbird', 'blond hair')"
                )
            if text in seen:
                raise DataError(
                    f"{kind} names {seen[text]!r} and {name!r} give the same caption text "
                    f"{text!r}; a text-conditional model cannot tell them apart"
                )
            seen[text] = name


def caption_token_table(captions: Captions, tokenizer) -> torch.Tensor:
    """Token ids (n_classes, n_attrs, 4 variants, max_length), padded as pipelines do."""
    n_y, n_a = len(captions.class_names), len(captions.attr_names)
    texts = captions.all_texts()
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.view(n_y, n_a, 4, -1)


# ---------------------------------------------------------------- schedulers
def training_scheduler(beta_schedule: str = "squaredcos_cap_v2"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


def sampling_scheduler(beta_schedule: str = "squaredcos_cap_v2"):
    """The saved pipelines' scheduler: DDIM with the training betas."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights ``min(SNR, gamma) / SNR`` for epsilon prediction."""
    if gamma is None:
        return torch.ones(len(timesteps), device=timesteps.device)
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


# ---------------------------------------------------------------- inpaint UNet
def inpaint_unet_from(unet):
    """An inpainting UNet (``2 * latent + 1`` input channels) from a text-to-image one:
    same weights, the extra ``conv_in`` input channels (mask, masked-image latents)
    initialised to zero, so it starts out as the text-to-image model."""
    from diffusers import UNet2DConditionModel

    latent = unet.config.in_channels
    config = dict(unet.config)
    config["in_channels"] = inpaint_in_channels(latent)
    inpaint = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    old_weight = state.pop("conv_in.weight")
    weight = torch.zeros_like(inpaint.conv_in.weight)
    weight[:, :latent] = old_weight
    state["conv_in.weight"] = weight
    inpaint.load_state_dict(state, strict=True)
    return inpaint


# ---------------------------------------------------------------- masks
def random_masks(
    n: int,
    size: int,
    object_masks: torch.Tensor | None = None,
    has_object: torch.Tensor | None = None,
    object_prob: float = 0.5,
    full_prob: float = 0.1,
) -> torch.Tensor:
    """Binary masks (n, 1, size, size), 1 = repaint, drawn from the global torch RNG:
    whole image (``full_prob``), the object (``object_prob`` where ``has_object``;
    dilated by 0-3 px or its box grown by 0-3 px), else a random box or elliptic blob."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.zeros(n, 1, size, size)
    choice = torch.rand(n)
    kind = torch.rand(n)
    for i in range(n):
        if choice[i] < full_prob:
            out[i] = 1
            continue
        use_object = (
            object_masks is not None and bool(has_object[i]) and choice[i] < full_prob + object_prob
        )
        if use_object:
            obj = object_masks[i : i + 1].float()
            grow = int(torch.randint(0, 4, ()))
            if kind[i] < 0.5:
                if grow:
                    obj = F.max_pool2d(obj, 2 * grow + 1, stride=1, padding=grow)
                out[i] = obj[0]
            else:
                rows = torch.nonzero(obj[0, 0].sum(1))
                cols = torch.nonzero(obj[0, 0].sum(0))
                if len(rows):
                    r0, r1 = max(int(rows[0]) - grow, 0), int(rows[-1]) + grow + 1
                    c0, c1 = max(int(cols[0]) - grow, 0), int(cols[-1]) + grow + 1
                    out[i, :, r0:r1, c0:c1] = 1
            continue
        h, w = (torch.rand(2) * 0.5 + 0.25) * size
        cy, cx = torch.rand(2) * size
        if kind[i] < 0.5:
            box = ((yy - cy).abs() <= h / 2) & ((xx - cx).abs() <= w / 2)
            out[i, 0] = box.float()
        else:
            angle = float(torch.rand(()) * math.pi)
            u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
            v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
            out[i, 0] = ((u / (w / 2)) ** 2 + (v / (h / 2)) ** 2 <= 1).float()
    return out


# ---------------------------------------------------------------- data
@dataclass
class DomainImages:
    """The training split decoded once: uint8 pixels (n, 3, s, s), labels, object masks."""

    pixels: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor
    masks: torch.Tensor | None
    has_mask: torch.Tensor
    modes: dict[str, int] = field(default_factory=dict)

    def fingerprint(self, class_names: list[str], attr_names: list[str]) -> str:
        digest = hashlib.sha256()
        for tensor in (self.pixels, self.y, self.a, self.has_mask):
            digest.update(tensor.contiguous().numpy().tobytes())
        if self.masks is not None:
            digest.update(self.masks.contiguous().numpy().tobytes())
        digest.update(json.dumps([class_names, attr_names]).encode())
        return digest.hexdigest()[:16]


def _square(image: Image.Image, size: int, resample: int) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), resample)


def _mode_group(mode: str) -> str:
    if mode in ("L", "LA", "1"):
        return "grayscale"
    if mode == "P":
        return "palette"
    return "colour"


def load_domain_images(
    table: GroupTable, image_size: int, mixed_modes: str = "error"
) -> DomainImages:
    """Decode the training split at ``image_size`` (centre crop, RGB) with masks."""
    if "train" not in set(table.frame["split"]):
        raise DataError(
            f"{table.name} has no training images (split 'train' is empty); a domain "
            "model is trained on the training split"
        )
    train = table.split("train")
    frame = train.frame
    use_masks = train.mask_store is not None and "mask" in frame.columns
    pixels = np.empty((len(frame), image_size, image_size, 3), dtype=np.uint8)
    masks = np.zeros((len(frame), image_size, image_size), dtype=np.uint8) if use_masks else None
    has_mask = np.zeros(len(frame), dtype=bool)
    modes: dict[str, int] = {}
    first_of: dict[str, str] = {}
    for i, name in enumerate(frame["filename"]):
        image = train.store.open(name)
        if image.mode in _UNSUPPORTED_MODES:
            raise DataError(
                f"image {train.store.describe(name)} has mode {image.mode!r}, which has no "
                "faithful RGB form; convert the dataset to 8-bit RGB or grayscale images"
            )
        modes[image.mode] = modes.get(image.mode, 0) + 1
        first_of.setdefault(_mode_group(image.mode), name)
        if len(first_of) > 1 and mixed_modes == "error":
            examples = ", ".join(f"{g}: {n}" for g, n in first_of.items())
            raise DataError(
                f"{table.name}'s training images mix image modes ({examples}); a domain "
                "model learns one kind of image. Convert them to one mode, or set "
                "mixed_modes='convert' to convert every image to RGB"
            )
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
        pixels[i] = np.asarray(_square(image, image_size, Image.BICUBIC))
        if use_masks:
            mask_name = frame["mask"].iloc[i]
            if isinstance(mask_name, str) and mask_name:
                mask = train.mask_store.open(mask_name).convert("L")
                if mask.size != image.size:
                    mask = mask.resize(image.size, Image.NEAREST)
                masks[i] = (np.asarray(_square(mask, image_size, Image.NEAREST)) >= 128) * 255
                has_mask[i] = masks[i].any()
    return DomainImages(
        pixels=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
        y=torch.tensor(frame["y"].to_numpy(), dtype=torch.long),
        a=torch.tensor(frame["a"].to_numpy(), dtype=torch.long),
        masks=None if masks is None else torch.from_numpy(masks)[:, None].contiguous(),
        has_mask=torch.from_numpy(has_mask),
        modes=modes,
    )


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (.., 3, h, w) -> float in [-1, 1], as Stable Diffusion's image processor."""
    return pixels.float() / 127.5 - 1.0


class _PixelSet(Dataset):
    def __init__(self, images: DomainImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        im = self.images
        mask = im.masks[i] if im.masks is not None else torch.zeros(1, 1, 1, dtype=torch.uint8)
        return {
            "pixels": im.pixels[i],
            "y": im.y[i],
            "a": im.a[i],
            "mask": mask,
            "has_mask": im.has_mask[i],
        }


class _LatentSet(Dataset):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, images: DomainImages) -> None:
        self.mean, self.std, self.images = mean, std, images

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "mean": self.mean[i],
            "std": self.std[i],
            "y": self.images.y[i],
            "a": self.images.a[i],
        }


# ---------------------------------------------------------------- losses
def _caption_ids(tokens: torch.Tensor, y, a, probs: tuple[float, float, float]) -> torch.Tensor:
    """Draw a caption variant per sample: full, or class / bias / both dropped."""
    u = torch.rand(len(y))
    drop_all, drop_class, drop_bias = probs
    variant = torch.zeros(len(y), dtype=torch.long)
    variant[u < drop_all + drop_class + drop_bias] = 1  # class only (bias dropped)
    variant[u < drop_all + drop_class] = 2  # bias only (class dropped)
    variant[u < drop_all] = 3  # empty
    table = tokens.to(y.device)
    return table[y, a, variant.to(y.device)]


def _vae_loss(kl_weight: float):
    def loss(models, batch):
        x = to_model_range(batch["pixels"])
        posterior = models["vae"].encode(x).latent_dist
        recon = models["vae"].decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        return mse + kl_weight * posterior.kl().mean()

    return loss


def _diffusion_loss(scheduler, tokens, probs, snr_gamma, prepare):
    """Noise-prediction MSE, min-SNR weighted. ``prepare(models, batch)`` returns the
    clean latents and the extra UNet input channels (none for text-to-image; mask and
    masked-image latents for inpainting), which are stacked after the noisy latents."""

    def loss(models, batch):
        latents, inputs = prepare(models, batch)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        t = t.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, t)
        unet_input = torch.cat([noisy, *inputs], dim=1) if inputs else noisy
        ids = _caption_ids(tokens, batch["y"], batch["a"], probs)
        hidden = models["text_encoder"](ids)[0]
        pred = models["unet"](unet_input, t, encoder_hidden_states=hidden).sample
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean((1, 2, 3))
        return (per_sample * min_snr_weights(scheduler, t, snr_gamma)).mean()

    return loss


def _text_inputs(scaling: float):
    def inputs(models, batch):
        latents = batch["mean"] + batch["std"] * torch.randn_like(batch["std"])
        return latents * scaling, []

    return inputs


@torch.no_grad()
def inpaint_condition(vae, image: torch.Tensor, mask: torch.Tensor, latent_size: int):
    """The inpainting UNet's extra input channels, as ``StableDiffusionInpaintPipeline``
    builds them: the binary mask (1 = repaint) downsampled to the latents by nearest
    neighbour, and the latents (sampled, scaled) of ``image * (mask < 0.5)``.
    ``image`` is in [-1, 1]. Returns ``(small_mask, masked_latents)``."""
    masked = image * (mask < 0.5)
    small_mask = F.interpolate(mask, size=(latent_size, latent_size))
    masked_latents = vae.encode(masked).latent_dist.sample() * vae.config.scaling_factor
    return small_mask, masked_latents


def _inpaint_inputs(config: DomainModelConfig, latent_size: int):
    def inputs(models, batch):
        vae = models["vae"]
        x = to_model_range(batch["pixels"])
        has_object = batch["has_mask"].cpu()
        objects = batch["mask"].cpu().float() / 255 if has_object.any() else None
        mask = random_masks(
            len(x), x.shape[-1], objects, has_object, config.object_mask_prob, config.full_mask_prob
        ).to(x.device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        small_mask, masked_latents = inpaint_condition(vae, x, mask, latent_size)
        return latents, [small_mask, masked_latents]

    return inputs


# ---------------------------------------------------------------- the model
@dataclass
class DomainModel:
    """A trained domain model: two pipeline directories and what made them."""

    out_dir: Path
    info: dict[str, Any]

    @property
    def text2image_dir(self) -> Path:
        return self.out_dir / TEXT2IMAGE

    @property
    def inpaint_dir(self) -> Path:
        return self.out_dir / INPAINT

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def attr_names(self) -> list[str]:
        return list(self.info["attr_names"])

    @property
    def captions(self) -> Captions:
        c = self.info["captions"]
        return Captions(
            tuple(self.class_names),
            tuple(self.attr_names),
            c["template"],
            c["class_template"],
            c["bias_template"],
        )

    def caption(self, y: int | None, a: int | None = None) -> str:
        """The training caption of class ``y`` on background ``a`` (either may be None)."""
        return self.captions.caption(y, a)

    def pipeline_dir(self, task: Task = "text2image") -> Path:
        if task not in (TEXT2IMAGE, INPAINT):
            raise ConfigError(f"task must be 'text2image' or 'inpaint', not {task!r}")
        return self.out_dir / task

    def load_pipeline(self, task: Task = "text2image"):
        """``StableDiffusion(Inpaint)Pipeline.from_pretrained`` on the saved directory."""
        from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

        cls = StableDiffusionInpaintPipeline if task == INPAINT else StableDiffusionPipeline
        pipe = cls.from_pretrained(str(self.pipeline_dir(task)), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_domain_model(out_dir: str | Path) -> DomainModel:
    """A domain model trained earlier by :func:`train_domain_model` into ``out_dir``."""
    out_dir = Path(out_dir)
    path = out_dir / DOMAIN_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{out_dir} holds no finished domain model ({DOMAIN_FILE} is missing); train "
            "one with train_domain_model (a killed training resumes there)"
        )
    info = json.loads(path.read_text())
    for task in (TEXT2IMAGE, INPAINT):
        if not (out_dir / task / "model_index.json").is_file():
            raise CheckpointError(f"{out_dir / task} is missing or incomplete; retrain")
    return DomainModel(out_dir=out_dir, info=info)


def _save_pipeline(target: Path, task: Task, vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if task == INPAINT else StableDiffusionPipeline
    pipe = cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_dir(target) as scratch:
        pipe.save_pretrained(scratch)


def _changed(old: dict, new: dict) -> list[str]:
    new = json.loads(json.dumps(new))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _stage_config(config: DomainModelConfig, steps, lr, ema, stage: int):
    return GenerativeTrainConfig(
        steps=steps,
        batch_size=config.batch_size,
        learning_rate=lr,
        warmup_steps=min(config.warmup_steps, steps),
        max_grad_norm=1.0,
        ema_decay=ema,
        save_every=config.save_every,
        log_every=config.log_every,
        seed=config.seed * 10 + stage,
        device=config.device,
    )


@torch.no_grad()
def latent_statistics(vae, pixels: torch.Tensor, batch_size: int = 256, seed: int = 0):
    """Posterior means and stds of every image, and the std of sampled latents."""
    vae.eval()
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        x = to_model_range(pixels[start : start + batch_size]).to(device)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    generator = torch.Generator().manual_seed(seed)
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    return mean, std, float(sample.std())


def train_domain_model(
    table: GroupTable,
    out_dir: str | Path,
    config: DomainModelConfig | None = None,
) -> DomainModel:
    """Train (or reuse) a domain model of ``table``'s training split in ``out_dir``.

    A rerun with the same settings and data returns the finished model without
    training; a killed run resumes from the last stage checkpoint; different settings
    or data in the same ``out_dir`` are refused (use a new directory).
    """
    config = config or DomainModelConfig()
    config.validate()
    sizes = config.component_sizes()
    out_dir = Path(out_dir)
    check_names(table.class_names, table.attr_names)
    captions = Captions(
        tuple(table.class_names),
        tuple(table.attr_names),
        config.caption_template,
        config.class_template,
        config.bias_template,
    )
    images = load_domain_images(table, config.image_size, config.mixed_modes)
    settings = {
        "config": config.settings(),
        "data": images.fingerprint(table.class_names, table.attr_names),
    }

    done = out_dir / DOMAIN_FILE
    if done.is_file():
        info = json.loads(done.read_text())
        if info.get("settings") != json.loads(json.dumps(settings)):
            changed = _changed(info.get("settings", {}).get("config", {}), settings["config"])
            if info.get("settings", {}).get("data") != settings["data"]:
                changed.append("training data")
            raise CheckpointError(
                f"{out_dir} holds a domain model trained with different settings "
                f"({', '.join(changed)}); use the same settings, or a new out_dir"
            )
        return load_domain_model(out_dir)

    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = work / "settings.json"
    if started.is_file():
        previous = json.loads(started.read_text())
        if previous != json.loads(json.dumps(settings)):
            changed = _changed(previous.get("config", {}), settings["config"])
            if previous.get("data") != settings["data"]:
                changed.append("training data")
            raise CheckpointError(
                f"{work} holds an unfinished domain model training with different "
                f"settings ({', '.join(changed)}); use the same settings to resume, or a "
                "new out_dir"
            )
    else:
        atomic_write_json(started, settings)

    tokenizer = build_tokenizer(captions.all_texts(), model_max_length=sizes.max_text_length)
    check_names(table.class_names, table.attr_names, tokenizer)
    tokens = caption_token_table(captions, tokenizer)
    probs = (config.caption_dropout, config.class_dropout, config.bias_dropout)
    scheduler = training_scheduler(config.beta_schedule)
    timings: dict[str, float] = {}
    cpu_times: dict[str, float] = {}
    losses: dict[str, list] = {}

    # Each stage's modules are built under its own seed, so resuming one stage never
    # depends on how much of another stage ran in this process.
    torch.manual_seed(config.seed)
    vae = build_vae(sizes)
    clock, cpu = time.perf_counter(), time.process_time()
    result = train_steps(
        {"vae": vae},
        _vae_loss(config.kl_weight),
        _PixelSet(images),
        _stage_config(config, config.vae_steps, config.vae_lr, None, 1),
        work / "vae",
        description="domain vae",
    )
    timings["vae"], losses["vae"] = time.perf_counter() - clock, result.losses
    cpu_times["vae"] = time.process_time() - cpu
    mean, std, latent_std = latent_statistics(vae, images.pixels, seed=config.seed)
    vae.register_to_config(scaling_factor=1.0 / latent_std)
    vae.requires_grad_(False)

    torch.manual_seed(config.seed + 1)
    text_encoder = build_text_encoder(tokenizer, sizes)
    unet = build_unet(sizes, "text2image")
    clock, cpu = time.perf_counter(), time.process_time()
    result = train_steps(
        {"unet": unet, "text_encoder": text_encoder},
        _diffusion_loss(scheduler, tokens, probs, config.snr_gamma, _text_inputs(1.0 / latent_std)),
        _LatentSet(mean, std, images),
        _stage_config(config, config.unet_steps, config.unet_lr, config.ema_decay, 2),
        work / "unet",
        description="domain unet",
    )
    timings["unet"], losses["unet"] = time.perf_counter() - clock, result.losses
    cpu_times["unet"] = time.process_time() - cpu
    text_encoder.requires_grad_(False)
    sampler = sampling_scheduler(config.beta_schedule)
    _save_pipeline(out_dir / TEXT2IMAGE, TEXT2IMAGE, vae, text_encoder, tokenizer, unet, sampler)

    inpaint = inpaint_unet_from(unet)
    clock, cpu = time.perf_counter(), time.process_time()
    result = train_steps(
        {"unet": inpaint},
        _diffusion_loss(
            scheduler, tokens, probs, config.snr_gamma, _inpaint_inputs(config, sizes.latent_size)
        ),
        _PixelSet(images),
        _stage_config(config, config.inpaint_steps, config.unet_lr, config.ema_decay, 3),
        work / "inpaint",
        frozen={"vae": vae, "text_encoder": text_encoder},
        description="domain inpaint",
    )
    timings["inpaint"], losses["inpaint"] = time.perf_counter() - clock, result.losses
    cpu_times["inpaint"] = time.process_time() - cpu
    _save_pipeline(out_dir / INPAINT, INPAINT, vae, text_encoder, tokenizer, inpaint, sampler)

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    info = {
        "format": 1,
        "settings": settings,
        "class_names": list(table.class_names),
        "attr_names": list(table.attr_names),
        "captions": {
            "template": config.caption_template,
            "class_template": config.class_template,
            "bias_template": config.bias_template,
            "examples": [
                captions.caption(y, a) for y in range(table.n_classes) for a in range(table.n_attrs)
            ],
        },
        "sizes": {k: v for k, v in asdict(sizes).items() if k != "extra"},
        "parameters": {
            "vae": params(vae),
            "text_encoder": params(text_encoder),
            "unet": params(unet),
            "inpaint_unet": params(inpaint),
        },
        "scaling_factor": 1.0 / latent_std,
        "n_train_images": len(images.y),
        "n_object_masks": int(images.has_mask.sum()),
        "image_modes": images.modes,
        "data_fingerprint": settings["data"],
        "seed": config.seed,
        "steps": {
            "vae": config.vae_steps,
            "unet": config.unet_steps,
            "inpaint": config.inpaint_steps,
        },
        "seconds_this_run": timings,
        "cpu_seconds_this_run": cpu_times,
        "losses": losses,
        "sampling": {
            "scheduler": "DDIMScheduler",
            "num_inference_steps": 25,
            "guidance_scale": 4.0,
        },
    }
    info = json.loads(json.dumps(info))
    atomic_write_json(done, info)
    return DomainModel(out_dir=out_dir, info=info)
