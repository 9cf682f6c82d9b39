"""Textual inversion: learn one new token's embedding from a few images (Gal et al. 2022).

DBB learns one token per class (``<class-0>``, ``<class-1>``, ...) from the class's images
and then asks an inpainting model to draw "a photo of a <class-1> bird" into the object
mask of a class-0 image. A token is a row of the text encoder's input-embedding matrix,
so it only means something to the text encoder it was trained on: train it on a model
with the text encoder of the model that will use it. DBB trains on the text-to-image
model of the inpainting model's family (the official README command: SD-2 base for SD-2
inpainting; both use the same 1024-d OpenCLIP text encoder, while an SD-1.5 token is
768-d and cannot go into SD-2) and loads the token into the inpainting pipeline.
:func:`load_embedding` checks the dimension before loading. Text-to-image and inpainting
UNets both train here (see below).

How the token is trained
    The objective is the usual noise-prediction MSE: encode an image with the frozen VAE,
    noise it at a random timestep, and let the frozen UNet predict the noise conditioned
    on the frozen text encoder's reading of a random template ("a photo of a {}") filled
    with the placeholder. The only trained parameter is one vector, the placeholder's
    embedding. It lives in a module of its own: the caller's tokenizer and text encoder
    are never resized; during training a forward hook on the encoder's input-embedding
    layer substitutes the vector wherever the placeholder's id appears. So every other
    row of the embedding matrix stays bit-for-bit identical *by construction* (the
    diffusers example instead trains the whole matrix and copies the other rows back
    after each step; masking the gradient would not suffice with AdamW's decoupled
    weight decay). Checkpoints for resume hold that one vector and the optimiser state,
    not the text encoder.

Inpainting models (UNet with ``2 * latent_channels + 1`` input channels) are trained as
they are used: the UNet gets the noisy latents, the downsampled mask and the latents of
the masked image. With ``masks`` (for DBB: the object masks, white = region to fill) the
token learns to fill the object's region; without, each sample gets a random rectangle,
or with probability ``full_mask_probability`` the whole image (the text-to-image case of
an inpainting model).

Defaults and where they come from: diffusers' ``examples/textual_inversion`` README
command (``--learning_rate 5e-4 --scale_lr`` with batch 1 x 4 accumulated, constant
schedule, no warm-up, 3000 steps): ``scale_lr`` multiplies the rate by the batch size as
``--scale_lr`` does, so the default batch of 4 trains at 2e-3 like the README on one GPU
(pass ``scale_lr=False`` for a plain 5e-4; the script's own argparse defaults are 1e-4,
unscaled, with 500 warm-up steps). From the script: AdamW with weight decay 1e-2, no
gradient clipping, random horizontal flips (p 0.5), an initialiser token for the starting
vector. The authors' code (``rinongal/textual_inversion``, SD config) uses a base rate of
5e-3 scaled by batch size x GPUs and up to 6100 steps. The DBB paper uses "the
Huggingface implementation" (its section 8.1) and the official DBB README runs it with
exactly the README values above (SD-2 base, 512 px, batch 1 x 4 accumulation, 3000 steps,
5e-4 with ``--scale_lr``, constant, no warm-up) and templates with the class name after
the token ("a photo of a {} animal"); its dataset draws no flips (DBB passes
``flip_probability=0``).

On disk (``out_dir``): ``learned_embeds.safetensors`` holding ``{placeholder: tensor[dim]}``
(diffusers' file name and key layout, so ``pipeline.load_textual_inversion(out_dir)`` reads
it too) with the training settings in the file's metadata; ``settings.json`` and
``checkpoint/`` (kept, for resuming or extending). A rerun with the same settings returns
the existing file without training; more ``steps`` continue from the checkpoint; any
other change of settings in the same ``out_dir`` is refused (:class:`CheckpointError`
naming the changed settings). The pipeline ends up on the training device.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from unspur.errors import CheckpointError, ConfigError
from unspur.generate.training import GenerativeTrainConfig, train_steps
from unspur.io import atomic_write_json, atomic_write_with

#: Prompt templates for an object token; ``{}`` is replaced by the placeholder.
IMAGENET_TEMPLATES_SMALL: tuple[str, ...] = (
    "a photo of a {}",
    "a photo of the {}",
    "a photo of one {}",
    "a photo of my {}",
    "a good photo of a {}",
    "a good photo of the {}",
    "a close-up photo of a {}",
    "a close-up photo of the {}",
    "a cropped photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a photo of a small {}",
    "a photo of the large {}",
    "a photo of a clean {}",
    "a photo of the dirty {}",
    "a photo of a nice {}",
    "a photo of the weird {}",
    "a rendering of a {}",
    "a rendition of the {}",
)

EMBEDDING_FILE = "learned_embeds.safetensors"
SETTINGS_FILE = "settings.json"
_METADATA_KEY = "unspur_settings"


# --------------------------------------------------------------------------------------
# Helpers shared with the DreamBooth trainer.


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that personalisation needs."""

    tokenizer: Any
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module
    scheduler: Any
    pipeline: Any = None
    name_or_path: str = ""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def is_inpainting(self) -> bool:
        return int(self.unet.config.in_channels) == 2 * self.latent_channels + 1

    @property
    def native_resolution(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[-1])


def resolve_components(pipeline_or_components: Any) -> Components:
    """A diffusers pipeline, a ``DiffusersGenerator`` (``.pipeline``) or a mapping such as
    ``pipeline.components``, as :class:`Components`."""
    source = pipeline_or_components
    if (
        not isinstance(source, Mapping)
        and not hasattr(source, "unet")
        and hasattr(source, "pipeline")
    ):
        source = source.pipeline
    pipeline = None if isinstance(source, Mapping) else source
    get = source.get if isinstance(source, Mapping) else (lambda key: getattr(source, key, None))
    parts = {key: get(key) for key in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")}
    missing = [key for key, value in parts.items() if value is None]
    if missing:
        raise ConfigError(
            f"personalisation needs a Stable Diffusion pipeline; {type(source).__name__} has no "
            f"{', '.join(missing)}"
        )
    name = getattr(getattr(pipeline, "config", None), "_name_or_path", "") if pipeline else ""
    return Components(**parts, pipeline=pipeline, name_or_path=str(name or ""))


def image_tensor(
    image: Image.Image, resolution: int, resample: int = Image.BICUBIC
) -> torch.Tensor:
    """RGB image -> shorter side resized to ``resolution``, centre-cropped, in [-1, 1], CHW."""
    image = _square(image.convert("RGB"), resolution, resample)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def mask_tensor(mask: Image.Image, resolution: int) -> torch.Tensor:
    """Mask image -> {0, 1} tensor of shape (1, resolution, resolution); 1 = region to fill."""
    mask = _square(mask.convert("L"), resolution, Image.NEAREST)
    array = (np.asarray(mask, dtype=np.float32) >= 127.5).astype(np.float32)
    return torch.from_numpy(array)[None]


def _square(image: Image.Image, resolution: int, resample: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, resample=resample)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def tensors_digest(tensors: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_signature(parts: Components) -> dict[str, Any]:
    """A cheap identity of the base model, so an ``out_dir`` is never reused across models.

    Hashes the first 65,536 values (as float16) of each network's first parameter: the
    same weights in fp32 or fp16 agree. The text encoder's token-embedding matrix is
    skipped, so loading a token (which appends a row to it) does not change the identity.
    """
    digest = hashlib.sha256()
    tokens = parts.text_encoder.get_input_embeddings().weight
    for module in (parts.unet, parts.vae, parts.text_encoder):
        first = next(p for p in module.parameters() if p is not tokens)
        first = first.detach().reshape(-1)[:65536]
        digest.update(first.to("cpu", torch.float16).numpy().tobytes())
    return {
        "name_or_path": parts.name_or_path,
        "unet_in_channels": int(parts.unet.config.in_channels),
        "text_dim": parts.embedding_dim,
        "weights": digest.hexdigest()[:16],
    }


def training_scheduler(scheduler: Any):
    """The DDPM noise schedule matching the pipeline's sampler (betas, prediction type)."""
    from diffusers import DDPMScheduler
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # a DDIM config carries keys DDPM ignores
    try:
        return DDPMScheduler.from_config(scheduler.config)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def encode_latents(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents, sampled from the VAE posterior."""
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def denoising_losses(
    predict,
    parts: Components,
    noise_scheduler: Any,
    pixels: torch.Tensor,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample noise-prediction MSE (mean over channels and pixels).

    ``predict(unet_input, timesteps)`` runs the UNet with its conditioning. For inpainting
    UNets ``masks`` (B, 1, H, W; 1 = fill) is required and the input is the noisy latents,
    the downsampled mask and the masked image's latents, stacked as the diffusers
    inpainting pipeline stacks them. Noise and timesteps come from the global RNG, which
    :func:`train_steps` reseeds every step.
    """
    latents = encode_latents(parts.vae, pixels)
    noise = torch.randn_like(latents)
    count = int(noise_scheduler.config.num_train_timesteps)
    timesteps = torch.randint(0, count, (latents.shape[0],), device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if parts.is_inpainting:
        if masks is None:
            raise ConfigError("an inpainting UNet needs masks to train")
        masked = encode_latents(parts.vae, pixels * (masks < 0.5))
        small = F.interpolate(masks.to(latents.dtype), size=latents.shape[-2:])
        noisy = torch.cat([noisy, small, masked], dim=1)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ConfigError(
            f"unknown prediction_type {prediction_type!r} in the pipeline's scheduler"
        )
    prediction = predict(noisy, timesteps)
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def check_settings(
    record: Mapping[str, Any] | None, settings: Mapping[str, Any], where: Path
) -> bool:
    """True when ``record`` (settings read back from disk) equals ``settings`` except for
    ``steps`` (a run may be extended, or resumed); False when there is no record; a
    :class:`CheckpointError` naming what changed otherwise."""
    if record is None:
        return False
    expected = _flat(json.loads(json.dumps(settings)))
    found = _flat(record)
    keys = (set(expected) | set(found)) - {"steps"}
    changed = sorted(k for k in keys if found.get(k) != expected.get(k))
    if not changed:
        return True
    raise CheckpointError(
        f"{where} was made with different settings ({', '.join(changed)}); use the same "
        "settings to reuse or resume it, or a new output directory"
    )


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_finished(record: Mapping[str, Any] | None, settings: Mapping[str, Any], where: Path) -> bool:
    """Whether a final artefact's ``record`` is for exactly these settings and steps."""
    return check_settings(record, settings, where) and record.get("steps") == settings.get("steps")


def check_resumed(resumed_from: int, steps: int, out_dir: Path) -> None:
    if resumed_from > steps:
        raise CheckpointError(
            f"{out_dir / 'checkpoint'} has trained {resumed_from} steps, more than the {steps} "
            "asked for; ask for at least as many steps or use a new output directory"
        )


def claim_out_dir(out_dir: Path, settings: Mapping[str, Any]) -> None:
    """Bind ``out_dir`` to ``settings`` (``settings.json``) so a partial run of other
    settings is never resumed."""
    file = out_dir / SETTINGS_FILE
    record = json.loads(file.read_text()) if file.exists() else None
    if not check_settings(record, settings, file):
        atomic_write_json(file, dict(settings))


# --------------------------------------------------------------------------------------
# Textual inversion.


class _TokenVector(nn.Module):
    """The one trained parameter: the placeholder's input embedding."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.vector = nn.Parameter(initial.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.vector


class _ImageSet(Dataset):
    def __init__(self, pixels: list[torch.Tensor], masks: list[torch.Tensor] | None) -> None:
        self.pixels, self.masks = pixels, masks

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"pixels": self.pixels[index]}
        if self.masks is not None:
            item["mask"] = self.masks[index]
        return item


@contextlib.contextmanager
def _substitute_token(embedding: nn.Module, token_id: int, state: dict) -> Iterator[None]:
    """While active, the embedding layer returns ``state["vector"]`` for ``token_id``.

    The id may lie beyond the matrix (the caller's encoder is not resized): the pre-hook
    looks it up as id 0 and the hook overwrites those positions.
    """

    def before(module, args):
        ids = args[0]
        state["where"] = ids == token_id
        return (ids.masked_fill(state["where"], 0), *args[1:])

    def after(module, args, output):
        where = state.pop("where")
        vector = state.get("vector")
        if vector is None:
            return output
        return torch.where(where.unsqueeze(-1), vector.to(output.dtype), output)

    handles = [embedding.register_forward_pre_hook(before), embedding.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        state.clear()


def random_masks(count: int, size: int, full_probability: float, device) -> torch.Tensor:
    """Random rectangles covering 25-75% of each side, or the whole image with
    probability ``full_probability``; drawn from the global RNG."""
    masks = torch.zeros(count, 1, size, size, device=device)
    full = torch.rand(count) < full_probability
    low, high = max(1, size // 4), max(2, (3 * size) // 4 + 1)
    for i in range(count):
        if full[i]:
            masks[i] = 1.0
            continue
        h, w = torch.randint(low, high, (2,)).tolist()
        top = int(torch.randint(0, size - h + 1, ()))
        left = int(torch.randint(0, size - w + 1, ()))
        masks[i, :, top : top + h, left : left + w] = 1.0
    return masks


def _single_token_id(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(
            f"the {what} {text!r} is {len(ids)} tokens for this tokenizer; it must be exactly one"
        )
    return int(ids[0])


def _read_metadata(file: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    if not file.exists():
        return None
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from error
    text = metadata.get(_METADATA_KEY)
    return json.loads(text) if text else {}


def train_textual_inversion(
    pipeline_or_components: Any,
    images: Sequence[Image.Image],
    out_dir: str | Path,
    *,
    placeholder_token: str = "<class-0>",
    initializer_token: str = "bird",
    templates: Sequence[str] = IMAGENET_TEMPLATES_SMALL,
    steps: int = 3000,
    learning_rate: float = 5e-4,
    scale_lr: bool = True,
    batch_size: int = 4,
    seed: int = 0,
    resolution: int | None = None,
    masks: Sequence[Image.Image] | None = None,
    full_mask_probability: float = 0.25,
    flip_probability: float = 0.5,
    weight_decay: float = 1e-2,
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    save_every: int = 500,
    device: str = "auto",
    mixed_precision: str = "no",
) -> Path:
    """Learn ``placeholder_token``'s embedding from ``images``; returns the embedding file.

    The pipeline is left as it was (no token added); load the result with
    :func:`load_embedding`. ``initializer_token`` (one token; use the class name) gives
    the starting vector. The optimiser's rate is ``learning_rate * batch_size`` when
    ``scale_lr`` (diffusers' ``--scale_lr``), else ``learning_rate``. ``resolution``
    defaults to the model's native size (512 for SD-2). ``masks`` only matter for
    inpainting models (see the module notes).
    """
    parts = resolve_components(pipeline_or_components)
    out_dir = Path(out_dir)
    file = out_dir / EMBEDDING_FILE
    if not images:
        raise ConfigError("textual inversion needs at least one image")
    if masks is not None and len(masks) != len(images):
        raise ConfigError(f"got {len(masks)} masks for {len(images)} images")
    templates = list(templates)
    if not templates or any("{}" not in template for template in templates):
        raise ConfigError("every template must contain '{}' where the placeholder goes")
    resolution = int(resolution or parts.native_resolution)
    if resolution % parts.vae_scale_factor:
        raise ConfigError(
            f"resolution {resolution} is not a multiple of the VAE's factor "
            f"{parts.vae_scale_factor}"
        )

    pixels = [image_tensor(image, resolution) for image in images]
    mask_tensors = [mask_tensor(mask, resolution) for mask in masks] if masks is not None else None
    config = GenerativeTrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate * (batch_size if scale_lr else 1),
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        max_grad_norm=max_grad_norm,
        save_every=save_every,
        seed=seed,
        device=device,
        mixed_precision=mixed_precision,
    )
    settings = {
        "kind": "textual_inversion",
        "placeholder_token": placeholder_token,
        "initializer_token": initializer_token,
        "templates": templates,
        "images": tensors_digest(pixels),
        "masks": tensors_digest(mask_tensors) if mask_tensors is not None else None,
        "resolution": resolution,
        "full_mask_probability": full_mask_probability if parts.is_inpainting else None,
        "flip_probability": flip_probability,
        "model": model_signature(parts),
        "steps": steps,
        "train": config.fingerprint(),
    }
    if is_finished(_read_metadata(file), settings, file):
        return file

    tokenizer = parts.tokenizer
    if placeholder_token in tokenizer.get_vocab():
        raise ConfigError(
            f"{placeholder_token!r} is already in the tokenizer; choose another placeholder or "
            "train on a pipeline that does not have it loaded"
        )
    if len(tokenizer.encode(placeholder_token, add_special_tokens=False)) == 1:
        raise ConfigError(
            f"{placeholder_token!r} is already a word of the tokenizer; adding it would change "
            "what every prompt with that word means: use a new string such as '<class-0>'"
        )
    embedding = parts.text_encoder.get_input_embeddings()
    initializer_id = _single_token_id(tokenizer, initializer_token, "initializer token")
    # A private copy of the tokenizer holds the placeholder; the caller's is untouched.
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(placeholder_token)
    placeholder_id = int(tokenizer.convert_tokens_to_ids(placeholder_token))
    prompts = [template.format(placeholder_token) for template in templates]
    template_ids = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    for prompt, ids in zip(prompts, template_ids):
        if not bool((ids == placeholder_id).any()):
            raise ConfigError(
                f"the template {prompt!r} is longer than the tokenizer's "
                f"{tokenizer.model_max_length} tokens; the placeholder is cut off"
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out_dir, settings)
    token = _TokenVector(embedding.weight[initializer_id])
    noise_scheduler = training_scheduler(parts.scheduler)
    state: dict[str, Any] = {}
    inpainting = parts.is_inpainting

    def loss_fn(models: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        state["vector"] = models["token"]()
        images_ = batch["pixels"]
        count, device_ = images_.shape[0], images_.device
        choice = torch.randint(len(templates), (count,))
        ids = template_ids[choice].to(device_)
        hidden = models["text_encoder"](ids)[0]
        flip = (torch.rand(count) < flip_probability).to(device_)[:, None, None, None]
        images_ = torch.where(flip, images_.flip(-1), images_)
        masks_ = None
        if inpainting:
            if "mask" in batch:
                masks_ = torch.where(flip, batch["mask"].flip(-1), batch["mask"])
            else:
                masks_ = random_masks(count, resolution, full_mask_probability, device_)

        def predict(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return models["unet"](sample, timesteps, hidden.to(sample.dtype)).sample

        return denoising_losses(predict, parts, noise_scheduler, images_, masks_).mean()

    with _substitute_token(embedding, placeholder_id, state):
        result = train_steps(
            {"token": token},
            loss_fn,
            _ImageSet(pixels, mask_tensors),
            config,
            out_dir,
            frozen={"text_encoder": parts.text_encoder, "unet": parts.unet, "vae": parts.vae},
            description=f"textual inversion {placeholder_token}",
        )

    check_resumed(result.resumed_from, steps, out_dir)
    vector = token.vector.detach().to("cpu", torch.float32).contiguous()
    _write_embedding(file, placeholder_token, vector, settings)
    return file


def _write_embedding(file: Path, token: str, vector: torch.Tensor, settings: Mapping) -> None:
    from safetensors.torch import save_file

    metadata = {_METADATA_KEY: json.dumps(settings)}
    atomic_write_with(file, lambda tmp: save_file({token: vector}, str(tmp), metadata=metadata))


# --------------------------------------------------------------------------------------
# Loading.


def _embedding_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (EMBEDDING_FILE, "learned_embeds.bin"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no {EMBEDDING_FILE}; was textual inversion run there?")
    if not path.is_file():
        raise CheckpointError(f"textual-inversion embedding {path} does not exist")
    return path


def read_embedding(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """``(token, tensor)`` of an embedding file: diffusers' one-key layout (safetensors or
    a ``weights_only`` torch file) or Automatic1111's ``string_to_param``."""
    file = _embedding_file(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as error:
            raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from error
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{file} could not be read safely: {error}") from error
    if isinstance(state, torch.Tensor):
        return None, state
    if isinstance(state, Mapping) and "string_to_param" in state:
        return state.get("name"), state["string_to_param"]["*"]
    if isinstance(state, Mapping) and len(state) == 1:
        ((token, tensor),) = state.items()
        if isinstance(tensor, torch.Tensor):
            return str(token), tensor
    raise CheckpointError(
        f"{file} is not a textual-inversion embedding (expected one tensor named by its token)"
    )


def load_embedding(pipeline: Any, path: str | Path, token: str | None = None) -> str:
    """Add a learned token to ``pipeline`` through diffusers' ``load_textual_inversion``.

    Checks first that the file's embedding dimension equals the text encoder's (raising a
    :class:`CheckpointError` that names the file and both dimensions), so a token trained
    on another text encoder (SD-1.5's 768-d in SD-2's 1024-d) fails clearly. Loading the
    same token with the same vector again is a no-op; returns the token.
    """
    parts = resolve_components(pipeline)
    file = _embedding_file(path)
    stored_token, tensor = read_embedding(file)
    token = token or stored_token
    if not token:
        raise CheckpointError(f"{file} does not name its token; pass token=...")
    expected = parts.embedding_dim
    if tensor.ndim not in (1, 2) or tensor.shape[-1] != expected:
        raise CheckpointError(
            f"{file}: the embedding of {token!r} is {tensor.shape[-1]}-d but this pipeline's text "
            f"encoder takes {expected}-d token embeddings; a textual-inversion token only fits the "
            "text encoder it was trained on (e.g. a 768-d SD-1.5 token cannot go into 1024-d "
            "SD-2): train it on this model"
        )
    if token in parts.tokenizer.get_vocab():
        token_id = parts.tokenizer.convert_tokens_to_ids(token)
        row = parts.text_encoder.get_input_embeddings().weight[token_id].detach().cpu()
        first = tensor.reshape(-1, expected)[0].to(row.dtype)
        if torch.equal(row, first):
            return token
        raise CheckpointError(
            f"{token!r} is already in the pipeline's tokenizer with another embedding; "
            f"load {file} under another token name (token=...)"
        )
    if parts.pipeline is None or not hasattr(parts.pipeline, "load_textual_inversion"):
        raise ConfigError("load_embedding needs a diffusers pipeline (load_textual_inversion)")
    parts.pipeline.load_textual_inversion(str(file), token=token)
    return token
