"""One generation interface over diffusers: text-to-image and inpainting.

Every generative method calls the same two functions, whatever the weights are::

    generator = load_generator("stabilityai/stable-diffusion-2-inpainting", "inpaint")
    generator = load_generator("runs/domain/pipeline", "text2image")  # trained here
    images = generator.text_to_image(prompts, seeds, GenerationSettings(steps=25))
    edited = generator.inpaint(images, masks, prompts, seeds, GenerationSettings())

Whether the weights are a hub id or a local pipeline directory is configuration only:
both go through ``from_pretrained`` exactly as a user with internet would call it.

Reproducibility is per image, not per batch. Every image gets its own
``torch.Generator`` seeded with that image's seed (diffusers draws each image's
starting noise, and an ancestral scheduler's step noise, from its own generator), so
image ``i`` depends only on the weights, the settings, ``prompts[i]`` and
``seeds[i]``: never on its batch neighbours or on ``batch_size``. The generators live
on the CPU, so a seed gives the same starting noise on CPU and GPU (the images still
differ by the arithmetic, fp16 on GPU). Batched and single runs agree to about 2e-6
in float on CPU (matrix kernels sum in a batch-dependent order), which after rounding
to 8 bits is equality up to an occasional off-by-one pixel value.

Inpainting pastes the original pixels back outside the mask: the VAE round trip
changes every pixel, and methods that edit only a region (DBB) must keep the rest
exactly. Inputs of any size are resized to the generation size for the model and the
result is resized back to the input's own size before the paste, so the paste is exact
at the original resolution. The paste is binary by default: outside the mask is the
original, inside is generated, and nothing of the original leaks into the repainted
region (a soft blend would leave a ghost of the very object being replaced, and would
change pixels outside the mask). ``feather`` blends inwards only, over the outermost
pixels *inside* the mask, to hide a seam without touching anything outside.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from unspur.errors import ConfigError, DataError
from unspur.generate.hub import resolve_device, resolve_dtype
from unspur.generate.latent_blend import LATENT_BLENDS, LatentBlend
from unspur.generate.maskers import dilate
from unspur.models.hf_backbone import hub_offline

Task = Literal["text2image", "inpaint"]
TASKS: tuple[str, ...] = ("text2image", "inpaint")

# Names accepted by ``GenerationSettings.scheduler`` -> diffusers class name.
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
}
SCHEDULER_NAMES: tuple[str, ...] = ("default", *SCHEDULERS)


# from_pretrained options that also apply to reading model_index.json.
_CONFIG_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample. Defaults are Stable Diffusion's usual ones.

    ``scheduler``: ``"default"`` keeps the pipeline's own; otherwise one of
    :data:`SCHEDULERS`, built from the pipeline's scheduler config for the call only.
    ``height``/``width``: None is the model's native size
    (``unet.config.sample_size * vae_scale_factor``). ``guidance_scale`` <= 1 turns
    classifier-free guidance off. ``eta`` is DDIM's noise level (other schedulers
    ignore it). Inpainting only: ``strength`` (1.0 repaints from pure noise; lower keeps
    more of the original inside the mask and runs ``int(steps * strength)`` steps),
    ``mask_dilation`` (pixels, at the input's own resolution, square neighbourhood),
    ``paste_back`` (original pixels outside the mask), ``feather`` (pixels of
    inward blending at the mask edge; 0 = binary paste) and ``latent_blend`` (the
    original's latents outside the mask after every denoising step: ``"clean"`` = DBB's
    Eq. 2, ``"noised"`` = noised to the step's level, ``"none"`` = the pipeline's own
    behaviour; :mod:`unspur.generate.latent_blend`).
    """

    steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    scheduler: str = "default"
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    strength: float = 1.0
    mask_dilation: int = 0
    paste_back: bool = True
    feather: int = 0
    eta: float = 0.0
    latent_blend: str = "none"

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULER_NAMES:
            raise ConfigError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}"
            )
        _at_least("steps", self.steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("mask_dilation", self.mask_dilation, 0)
        _at_least("feather", self.feather, 0)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {self.strength}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.eta < 0:
            raise ConfigError(f"eta must be >= 0, got {self.eta}")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError("negative_prompt must be a string")
        if self.latent_blend not in LATENT_BLENDS:
            raise ConfigError(
                f"latent_blend must be one of {', '.join(LATENT_BLENDS)}, got {self.latent_blend!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def make_scheduler(name: str, config: Any) -> Any:
    """The scheduler called ``name`` built from another scheduler's ``config``.

    The noise schedule (betas, training steps, prediction type) carries over. PNDM gets
    ``skip_prk_steps=True`` unless the config says otherwise, as in every Stable
    Diffusion release (its Runge-Kutta warm-up fails at few steps).
    """
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {}
    if name == "pndm" and "skip_prk_steps" not in config:
        extra["skip_prk_steps"] = True
    return cls.from_config(config, **extra)


class DiffusersGenerator:
    """A loaded diffusers pipeline behind one interface (see the module docstring).

    ``pipeline`` is public so that textual-inversion and LoRA helpers can load adapters
    into it; note that :func:`load_generator` shares one object per process, so a helper
    that changes it for one method should load with ``cache=False``.
    """

    def __init__(self, pipeline: Any, task: Task, weights_id: str) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self.pipeline = pipeline
        self.task: Task = task
        self.weights_id = weights_id
        needed = {"prompt", "generator", "num_inference_steps", "guidance_scale"}
        if task == "inpaint":
            needed |= {"image", "mask_image", "strength"}
        accepted = set(inspect.signature(pipeline.__call__).parameters)
        missing = sorted(needed - accepted)
        if missing:
            raise ConfigError(
                f"{type(pipeline).__name__} from {weights_id} cannot {task}: its call takes "
                f"no {', '.join(missing)}"
            )

    def __repr__(self) -> str:
        return (
            f"DiffusersGenerator(task={self.task!r}, weights_id={self.weights_id!r}, "
            f"pipeline={type(self.pipeline).__name__}, device={self.device}, dtype={self.dtype})"
        )

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.dtype

    @property
    def vae_scale_factor(self) -> int:
        factor = getattr(self.pipeline, "vae_scale_factor", None)
        if factor is None:
            factor = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        return int(factor)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at."""
        sample = self.pipeline.unet.config.sample_size
        height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def generation_size(self, settings: GenerationSettings) -> tuple[int, int]:
        """(height, width) of the images the model generates under ``settings``."""
        native_height, native_width = self.native_size
        height = settings.height or native_height
        width = settings.width or native_width
        # Stable Diffusion pipelines check multiples of 8 themselves; say so up front.
        multiple = math.lcm(8, self.vae_scale_factor)
        if height % multiple or width % multiple:
            raise ConfigError(
                f"generation size {height}x{width} (height x width) must be a multiple of "
                f"{multiple} for this model"
            )
        return height, width

    def provenance(self, settings: GenerationSettings) -> dict[str, Any]:
        """What made an image: weights, task, pipeline, device, dtype and settings."""
        return {
            "weights": self.weights_id,
            "task": self.task,
            "pipeline": type(self.pipeline).__name__,
            "scheduler": type(self.pipeline.scheduler).__name__
            if settings.scheduler == "default"
            else SCHEDULERS[settings.scheduler],
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "settings": settings.to_dict(),
        }

    def text_to_image(
        self,
        prompts: str | Sequence[str],
        seeds: Sequence[int],
        settings: GenerationSettings | None = None,
    ) -> list[Image.Image]:
        """One image per seed; ``prompts`` is one string for all or one per seed."""
        settings = settings or GenerationSettings()
        self._require("text2image", "text_to_image")
        seeds = _seeds(seeds)
        prompts = _prompts(prompts, len(seeds))
        height, width = self.generation_size(settings)
        outputs: list[Image.Image] = []
        with self._scheduler(settings.scheduler):
            for chunk in _chunks(len(seeds), settings.batch_size):
                outputs += self._call(
                    settings,
                    [prompts[i] for i in chunk],
                    [seeds[i] for i in chunk],
                    height=height,
                    width=width,
                )
        return outputs

    def inpaint(
        self,
        images: Sequence[Image.Image],
        masks: Sequence[Image.Image],
        prompts: str | Sequence[str],
        seeds: Sequence[int],
        settings: GenerationSettings | None = None,
    ) -> list[Image.Image]:
        """Repaint the white part (> 127) of each mask (PIL 'L', same size as its image).

        Returns RGB images at each input's own size; with ``paste_back`` every pixel
        outside the (dilated) mask is the input's.
        """
        settings = settings or GenerationSettings()
        self._require("inpaint", "inpaint")
        seeds = _seeds(seeds)
        count = len(seeds)
        prompts = _prompts(prompts, count)
        if len(images) != count or len(masks) != count:
            raise DataError(
                f"inpaint needs one image, mask, prompt and seed each: got {len(images)} "
                f"images, {len(masks)} masks, {count} seeds"
            )
        if int(settings.steps * settings.strength) < 1:
            raise ConfigError(
                f"steps * strength = {settings.steps} * {settings.strength} leaves no "
                "denoising step; raise steps or strength"
            )
        height, width = self.generation_size(settings)
        originals = [_rgb(image, i) for i, image in enumerate(images)]
        regions = [
            dilate(_binary_mask(mask, originals[i].size, i), settings.mask_dilation)
            for i, mask in enumerate(masks)
        ]
        outputs: list[Image.Image] = []
        with self._scheduler(settings.scheduler):
            for chunk in _chunks(count, settings.batch_size):
                resized = [_resize(originals[i], (width, height)) for i in chunk]
                blend = {}
                if settings.latent_blend != "none":
                    chunk_seeds = [seeds[i] for i in chunk]
                    blend = LatentBlend(
                        self.pipeline, resized, chunk_seeds, settings.latent_blend
                    ).call_kwargs()
                generated = self._call(
                    settings,
                    [prompts[i] for i in chunk],
                    [seeds[i] for i in chunk],
                    height=height,
                    width=width,
                    image=resized,
                    mask_image=[_mask_at(regions[i], (width, height)) for i in chunk],
                    strength=settings.strength,
                    **blend,
                )
                for i, image in zip(chunk, generated):
                    image = _resize(image.convert("RGB"), originals[i].size)
                    if settings.paste_back:
                        image = paste_back(originals[i], image, regions[i], settings.feather)
                    outputs.append(image)
        return outputs

    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            raise ConfigError(
                f"{method} needs a {task} generator, but this one was loaded for "
                f"{self.task} from {self.weights_id}: load it with "
                f"load_generator({self.weights_id!r}, task={task!r})"
            )

    @contextmanager
    def _scheduler(self, name: str) -> Iterator[None]:
        """Swap in the named scheduler for one call; the pipeline's own comes back after."""
        if name == "default":
            yield
            return
        own = self.pipeline.scheduler
        self.pipeline.scheduler = make_scheduler(name, own.config)
        try:
            yield
        finally:
            self.pipeline.scheduler = own

    def _call(
        self,
        settings: GenerationSettings,
        prompts: list[str],
        seeds: list[int],
        **inputs: Any,
    ) -> list[Image.Image]:
        # One CPU generator per image: the noise of image i depends on seeds[i] alone.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
        result = self.pipeline(
            prompt=prompts,
            negative_prompt=negative,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            eta=settings.eta,
            generator=generators,
            output_type="pil",
            **inputs,
        )
        return list(result.images)


# ---------------------------------------------------------------------------- masks


def feather_alpha(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Float alpha in [0, 1]: exactly 0 outside ``mask``; inside it rises linearly,
    1/pixels on the mask's edge pixels, up to 1 at ``pixels`` pixels deep and beyond."""
    alpha = mask.astype(np.float32)
    if pixels <= 0:
        return alpha
    inside = torch.from_numpy(alpha)[None, None]
    total = torch.zeros_like(inside)
    for _ in range(pixels):
        total += inside
        # Erode by one pixel: a pixel stays only if its 3x3 neighbourhood is inside
        # (the image border counts as inside, so edges of the frame are not feathered).
        padded = torch.nn.functional.pad(inside, (1, 1, 1, 1), value=1.0)
        inside = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)
    return (total / pixels)[0, 0].numpy()


def paste_back(
    original: Image.Image, generated: Image.Image, mask: np.ndarray, feather: int = 0
) -> Image.Image:
    """``generated`` inside ``mask``, ``original`` outside (exactly), same size."""
    if generated.size != original.size:
        raise DataError(f"cannot paste {generated.size} onto {original.size}")
    if feather <= 0:
        return Image.composite(generated, original, Image.fromarray(mask.astype(np.uint8) * 255))
    alpha = feather_alpha(mask, feather)[..., None]
    base = np.asarray(original, dtype=np.float32)
    new = np.asarray(generated, dtype=np.float32)
    blend = base + alpha * (new - base)  # alpha 0 -> base exactly
    return Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8))


def _binary_mask(mask: Any, size: tuple[int, int], index: int) -> np.ndarray:
    if not isinstance(mask, Image.Image):
        raise DataError(f"mask {index} is a {type(mask).__name__}, not a PIL image")
    if mask.size != size:
        raise DataError(
            f"mask {index} is {mask.size[0]}x{mask.size[1]} but its image is "
            f"{size[0]}x{size[1]} (width x height); they must match"
        )
    return np.asarray(mask.convert("L")) > 127


def _mask_at(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The mask at the generation size, never smaller than the original: any output
    pixel that touches the region is repainted, so every pasted pixel was generated."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if image.size == size:
        return image
    resized = np.asarray(image.resize(size, Image.Resampling.BILINEAR)) > 0
    return Image.fromarray(resized.astype(np.uint8) * 255)


def _rgb(image: Any, index: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise DataError(f"image {index} is a {type(image).__name__}, not a PIL image")
    return image.convert("RGB")


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def _seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (int, str)):
        raise DataError("seeds must be a sequence with one integer seed per image")
    try:
        return [operator.index(seed) for seed in seeds]
    except TypeError as exc:
        raise DataError(f"seeds must be integers: {exc}") from exc


def _prompts(prompts: str | Sequence[str], count: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * count
    prompts = list(prompts)
    if len(prompts) != count:
        raise DataError(f"got {len(prompts)} prompts for {count} seeds; give one per seed")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise DataError(f"prompt {i} is a {type(prompt).__name__}, not a string")
    return prompts


def _chunks(count: int, size: int) -> Iterator[list[int]]:
    for start in range(0, count, size):
        yield list(range(start, min(start + size, count)))


# ---------------------------------------------------------------------------- loading

_CACHE: dict[tuple, DiffusersGenerator] = {}


def clear_generator_cache() -> None:
    """Forget every generator :func:`load_generator` kept (frees their memory)."""
    _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or not _HUB_ID.match(text)
    )


def resolve_weights(weights: str | os.PathLike) -> tuple[str, Path | None]:
    """(weights id, local directory or None). A local directory must hold
    ``model_index.json``; anything else that looks like a path must exist."""
    text = os.fspath(weights)
    path = Path(text).expanduser()
    if path.exists() or isinstance(weights, os.PathLike) or _looks_like_path(text):
        if not path.exists():
            raise ConfigError(f"pipeline directory {path} does not exist")
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"{path} is not a diffusers pipeline directory: it has no model_index.json "
                "(save one with pipeline.save_pretrained(directory))"
            )
        return str(path.resolve()), path.resolve()
    return text, None


def _read_index(weights_id: str, local: Path | None, kwargs: dict[str, Any]) -> dict:
    from diffusers import DiffusionPipeline

    if local is not None:
        return DiffusionPipeline.load_config(local)
    options = {key: kwargs[key] for key in _CONFIG_KWARGS if key in kwargs}
    try:
        return DiffusionPipeline.load_config(weights_id, **options)
    except OSError as exc:
        raise _hub_error(weights_id, exc) from exc


def _hub_error(weights_id: str, exc: Exception) -> ConfigError:
    here = f"there is no local directory {weights_id!r} either"
    if hub_offline():
        return ConfigError(
            f"weights {weights_id!r} are not in the local Hugging Face cache and HF_HUB_OFFLINE "
            f"is set ({here}): download them first (`hf download {weights_id}`, or "
            f"`huggingface-cli download {weights_id}` with older huggingface_hub) or pass a "
            f"local pipeline directory. ({exc})"
        )
    return ConfigError(
        f"could not load weights {weights_id!r} from the Hugging Face hub ({here}): {exc}"
    )


def load_generator(
    weights: str | os.PathLike,
    task: Task,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    *,
    safety_checker: bool = True,
    progress: bool = False,
    cache: bool = True,
    **from_pretrained_kwargs: Any,
) -> DiffusersGenerator:
    """Load a diffusers pipeline for ``task`` from a hub id or a local directory.

    ``device`` None: CUDA when available, else CPU. ``dtype`` ``"auto"``: float16 on
    CUDA, float32 on CPU. ``safety_checker=False`` drops the pipeline's safety checker,
    only where its ``model_index.json`` names one (SD-2 and domain models have none; with
    one, images it flags come back black, which would silently poison synthetic data).
    Other keyword arguments go to ``from_pretrained`` (``revision``, ``variant``, ...).

    ``task="inpaint"`` also accepts a text-to-image model: diffusers then inpaints with
    the plain UNet by re-noising the known region at every step. ``task="text2image"``
    refuses an inpainting model (its UNet needs mask channels).

    One generator per (weights, task, device, dtype, options) per process: asking again
    returns the same object (``cache=False`` loads a private copy). A local directory
    rewritten in between (``model_index.json`` newer) is loaded afresh.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    weights_id, local = resolve_weights(weights)
    stamp = (local / "model_index.json").stat().st_mtime_ns if local is not None else None
    key = (
        weights_id,
        stamp,
        task,
        str(device),
        str(torch_dtype),
        safety_checker,
        tuple(sorted((k, repr(v)) for k, v in from_pretrained_kwargs.items())),
    )
    if cache and key in _CACHE:
        generator = _CACHE[key]
        generator.pipeline.set_progress_bar_config(disable=not progress)
        return generator

    index = _read_index(weights_id, local, from_pretrained_kwargs)
    kwargs = dict(from_pretrained_kwargs, torch_dtype=torch_dtype)
    if not safety_checker and _names_component(index.get("safety_checker")):
        kwargs.setdefault("safety_checker", None)
        if "requires_safety_checker" in index:
            kwargs.setdefault("requires_safety_checker", False)
    pipeline = _from_pretrained(weights_id if local is None else str(local), task, kwargs)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=not progress)
    _check_task(pipeline, task, weights_id)
    generator = DiffusersGenerator(pipeline, task, weights_id)
    if cache:
        _CACHE[key] = generator
    return generator


def _names_component(entry: Any) -> bool:
    return isinstance(entry, (list, tuple)) and any(part is not None for part in entry)


def _from_pretrained(source: str, task: Task, kwargs: dict[str, Any]) -> Any:
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image, DiffusionPipeline

    auto = AutoPipelineForInpainting if task == "inpaint" else AutoPipelineForText2Image
    # ``torch_dtype`` works on every diffusers we support; newer ones warn that it will
    # become ``dtype``, which older ones do not know.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*torch_dtype.*deprecated", category=FutureWarning
        )
        return _load(auto, DiffusionPipeline, source, kwargs)


def _load(auto: Any, fallback: Any, source: str, kwargs: dict[str, Any]) -> Any:
    try:
        try:
            return auto.from_pretrained(source, **kwargs)
        except ValueError as exc:
            # A pipeline class AutoPipeline does not map (a custom one): load it as saved;
            # DiffusersGenerator then checks that it can do the task.
            if "can't find a pipeline linked to" not in str(exc):
                raise
            return fallback.from_pretrained(source, **kwargs)
    except OSError as exc:
        if Path(source).is_dir():
            raise ConfigError(f"could not load the pipeline in {source}: {exc}") from exc
        raise _hub_error(source, exc) from exc


def _check_task(pipeline: Any, task: Task, weights_id: str) -> None:
    unet = getattr(pipeline, "unet", None)
    vae = getattr(pipeline, "vae", None)
    if task != "text2image" or unet is None or vae is None:
        return
    latent = vae.config.latent_channels
    if unet.config.in_channels != latent:
        raise ConfigError(
            f"{weights_id} is an inpainting model (its UNet takes {unet.config.in_channels} "
            f"channels, not {latent}): load it with task='inpaint'"
        )
