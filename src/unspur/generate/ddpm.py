"""Pixel-space DDPMs: P2-weighted training, DDIM sampling and DDIM inversion.

The domain model of DiffInject is a DDPM (ADM in the paper, Sec. 3) trained on the
general dataset of the task's domain (MNIST, CIFAR-10, FFHQ, AFHQ; not the biased split)
with the P2 weighting of Choi et al. 2022 ("Perception Prioritized Training of Diffusion
Models"; paper Eq. 5-6), then used with deterministic DDIM inversion and DDIM reverse steps in which the U-Net
bottleneck ("h-space", :mod:`unspur.generate.hspace`) is edited. This module holds the
parts that are not about h-space:

* :func:`p2_weights` and :func:`train_ddpm` -- epsilon-prediction training through the
  one generative loop, :func:`unspur.generate.training.train_steps`;
* :func:`build_ddpm_unet` -- an unconditional or class-conditional ``UNet2DModel``,
  optionally with the skip connections of its lowest decoder levels cut
  (:func:`remove_skips`) so that the decoder has to read h;
* :func:`save_ddpm` / :func:`load_ddpm` -- one directory in the ``DDPMPipeline`` layout
  (``model_index.json``, ``unet/``, ``scheduler/``), so ``DDPMPipeline.from_pretrained``
  reads what is saved here and hub checkpoints such as ``google/ddpm-celebahq-256``
  load here;
* :func:`ddim_timesteps`, :func:`ddim_sample`, :func:`ddim_invert` -- DDIM on a fixed
  grid of timesteps, written out here (not ``DDIMScheduler.step``) so that the reverse
  and the inverse step are exact mirrors of each other and the h-space code can change
  what goes into each step.

Images are tensors in ``[-1, 1]``, shape ``(B, C, H, W)``.

DDIM grid. ``steps`` timesteps ``round(linspace(0, T - 1, steps))`` (the grid of the
Asyrp / DiffusionCLIP code, which h-space editing comes from: it starts at ``T - 1``,
pure noise, and ends at 0). Sampling evaluates the U-Net once per grid point, from
``T - 1`` down to 0, and the last step lands on the clean image (``alpha_bar = 1``).
Inversion evaluates it once per grid point going up: from the clean image (treated as
``alpha_bar = 1``) to 0, then from each grid point to the next with the noise predicted
at the lower one (the usual DDIM-inversion approximation). Nothing is clipped by
default: clipping the predicted ``x_0`` breaks the inverse.

Seeds. ``ddim_sample`` takes one seed per image; image ``i``'s starting noise and every
noise it draws in stochastic (``eta > 0``) steps come from a generator seeded with
``seeds[i]`` on the CPU, so an image depends on its seed only, not on the batch it was
drawn in or the device.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from unspur.errors import CheckpointError, ConfigError, DataError, UnspurError
from unspur.generate.training import (
    GenerativeTrainConfig,
    GenerativeTrainResult,
    train_steps,
)
from unspur.io import atomic_dir, atomic_write_json

#: The model of the P2 paper's 64x64 experiments is ADM (Dhariwal & Nichol 2021) at its
#: 64x64 defaults in the P2 code (``guided_diffusion/script_util.py``:
#: ``num_channels=128``, ``channel_mult=(1, 2, 3, 4)``, ``num_res_blocks=2``, attention at
#: 16 and 8 px, scale-shift norm). The P2 README's released models are 256x256 (a
#: "lightweight" 93M ADM: 128 channels, mult (1, 1, 2, 2, 4, 4), one res block, attention
#: at 16 px, 64 channels per head). DiffInject does not restate its U-Net; this preset
#: is the closest ``UNet2DModel`` to ADM-64 (about 92 M parameters here; diffusers has
#: no learned-sigma head, see train_ddpm).
ADM_64 = {
    "block_out_channels": (128, 256, 384, 512),
    "layers_per_block": 2,
    "attention_resolutions": (16, 8),
    "attention_head_dim": 64,
}

#: The P2 README's training command: ``--lr 2e-5 --batch_size 8`` with EMA 0.9999 (the
#: guided-diffusion default ``ema_rate``). Pass as ``GenerativeTrainConfig(**P2_TRAINING)``.
P2_TRAINING = {"learning_rate": 2e-5, "batch_size": 8, "ema_decay": 0.9999}


# --------------------------------------------------------------------------- P2 weights


def p2_weights(scheduler: Any, gamma: float = 1.0, k: float = 1.0) -> torch.Tensor:
    """The P2 weight of every training timestep: ``1 / (k + SNR(t)) ** gamma``.

    ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)``. ``gamma = 0`` gives ones (the plain
    epsilon loss, "L_simple"); ``gamma > 0`` down-weights the low-noise steps whose SNR
    is high, so the weights grow with ``t``. The paper used ``gamma`` in {0.5, 1} with
    ``k = 1`` (README of jychoi118/P2-weighting); 1 and 1 are the defaults here. As in
    the reference code the weights are not normalised: with ``gamma = 1, k = 1`` they run
    from about 1e-4 at ``t = 0`` to about 1 at ``t = T - 1``, so the weighted loss is
    smaller than L_simple and a learning rate tuned for one is not tuned for the other.
    Returned as float32, shape ``(T,)``, on the CPU.
    """
    if gamma < 0 or k < 0:
        raise ConfigError(f"P2 needs gamma >= 0 and k >= 0, got gamma={gamma}, k={k}")
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1.0 - alpha_bar)
    return (1.0 / (k + snr) ** gamma).float()


# --------------------------------------------------------------------------- the model


def _attention_levels(image_size: int, levels: int, resolutions: Sequence[int]) -> list[bool]:
    return [image_size // 2**i in set(resolutions) for i in range(levels)]


def build_ddpm_unet(
    image_size: int,
    channels: int = 3,
    num_classes: int | None = None,
    *,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_resolutions: Sequence[int] | None = None,
    attention_head_dim: int = 8,
    norm_num_groups: int | None = None,
    dropout: float = 0.0,
    num_train_timesteps: int = 1000,
    no_skip_below: int = 0,
) -> Any:
    """A ``UNet2DModel`` for ``image_size`` px images with ``channels`` channels.

    ``num_classes`` makes it class-conditional (an embedding of ``num_classes`` rows
    added to the timestep embedding, diffusers' ``num_class_embeds``); then every call
    needs ``class_labels``. Level ``i`` works at ``image_size / 2**i`` px; a level has
    self-attention when that size is in ``attention_resolutions`` (default: the lowest
    level only). The middle block (self-attention between two res blocks) is always
    there: it is h-space.

    The default, (32, 64, 64) channels with one res block per level and attention at
    the lowest level only, is a CPU-sized model (1.2 M parameters, h of shape
    ``(64, size/4, size/4)``). ``**ADM_64`` gives the P2 paper's 64 px layout (92 M).
    Res blocks use scale-shift normalisation of the timestep, as ADM does.
    ``no_skip_below`` > 0 cuts the skip connections into that many of the lowest
    decoder levels (:func:`remove_skips`; our choice, to make the decoder read h).
    """
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    if levels < 1 or image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"image_size {image_size} must be divisible by 2**(levels - 1) = {2 ** (levels - 1)}"
        )
    if attention_resolutions is None:
        attention_resolutions = (image_size // 2 ** (levels - 1),)
    attention = _attention_levels(image_size, levels, attention_resolutions)
    if norm_num_groups is None:
        norm_num_groups = min(32, math.gcd(*block_out_channels))
    if any(c % norm_num_groups for c in block_out_channels):
        raise ConfigError(
            f"norm_num_groups={norm_num_groups} must divide every block_out_channels "
            f"{tuple(block_out_channels)}"
        )
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        resnet_time_scale_shift="scale_shift",
        dropout=dropout,
        num_class_embeds=num_classes,
        num_train_timesteps=num_train_timesteps,
    )
    if no_skip_below:
        remove_skips(unet, no_skip_below)
    return unet


def build_ddpm_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> Any:
    """The DDPM noise schedule: ``linear`` (betas 1e-4 .. 0.02, DDPM and P2's choice),
    ``scaled_linear`` or ``squaredcos_cap_v2`` (cosine); epsilon prediction."""
    from diffusers import DDPMScheduler

    known = ("linear", "scaled_linear", "squaredcos_cap_v2")
    if beta_schedule not in known:
        raise ConfigError(f"beta_schedule must be one of {known}, got {beta_schedule!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
    )


# --------------------------------------------------------------------------- training


def _to_unit_range(image, size: int) -> torch.Tensor:
    from unspur.data.transforms import CenterCrop, Resize, to_tensor

    image = CenterCrop(size)(Resize(size, keep_ratio=True)(image.convert("RGB")))
    return to_tensor(image) * 2.0 - 1.0


class DiffusionImages(Dataset):
    """Training items ``{"x": image in [-1, 1], "y": class}`` for :func:`train_ddpm`.

    ``source`` is one of:

    * a tensor ``(N, C, H, W)`` already in ``[-1, 1]`` (``labels`` optional);
    * a dataset with ``raw(i)`` (a :class:`~unspur.data.dataset.GroupDataset`): the raw
      PIL image is resized (shorter side) and centre-cropped to ``image_size`` and scaled
      to ``[-1, 1]``, never the classifier's normalised tensor; labels from ``.y``;
    * any other dataset whose items are ``x`` or ``(x, y, ...)`` with ``x`` in ``[-1, 1]``.
    """

    def __init__(
        self,
        source: Any,
        image_size: int | None = None,
        labels: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        self.source = source
        self.image_size = image_size
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if isinstance(source, torch.Tensor):
            if source.ndim != 4:
                raise DataError(f"images must be (N, C, H, W), got shape {tuple(source.shape)}")
            low, high = float(source.min()), float(source.max())
            if low < -1.001 or high > 1.001:
                raise DataError(
                    f"images must be scaled to [-1, 1] (found values in [{low:.3g}, {high:.3g}]);"
                    " use x * 2 - 1 for images in [0, 1]"
                )
        elif hasattr(source, "raw"):
            if image_size is None:
                raise DataError("image_size is needed to resize a dataset's raw images")
            if self.labels is None and hasattr(source, "y"):
                self.labels = torch.as_tensor(source.y, dtype=torch.long)
        if self.labels is not None and len(self.labels) != len(source):
            raise DataError(f"{len(self.labels)} labels for {len(source)} images")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        y = None
        if isinstance(self.source, torch.Tensor):
            x = self.source[index]
        elif hasattr(self.source, "raw"):
            x = _to_unit_range(self.source.raw(index), self.image_size)
        else:
            item = self.source[index]
            if isinstance(item, (tuple, list)):
                x = item[0]
                y = item[1] if len(item) > 1 else None
            else:
                x = item
        if self.labels is not None:
            y = self.labels[index]
        out = {"x": torch.as_tensor(x, dtype=torch.float32)}
        if y is not None:
            out["y"] = torch.as_tensor(y, dtype=torch.long)
        return out


def ddpm_loss(
    unet: Any,
    scheduler: Any,
    x0: torch.Tensor,
    weights: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    random_flip: bool = False,
) -> torch.Tensor:
    """P2-weighted epsilon loss of one batch: ``mean_b(lambda_t * mean_pixels((eps - eps_hat)^2))``.

    Timesteps, noise and flips come from the global torch RNG (``train_steps`` seeds it
    every step). The per-image squared error is averaged over pixels and channels, then
    weighted, then averaged over the batch, as in the P2 code (``mean_flat(weight * ...)``).
    """
    batch = x0.shape[0]
    if random_flip:
        flip = torch.rand(batch) < 0.5
        x0 = torch.where(flip.to(x0.device).view(-1, 1, 1, 1), x0.flip(-1), x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
    noise = torch.randn(x0.shape).to(device=x0.device, dtype=x0.dtype)
    t = t.to(x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    eps = unet(noisy, t, class_labels=class_labels).sample
    per_image = (eps.float() - noise.float()).pow(2).mean(dim=tuple(range(1, eps.ndim)))
    return (weights.to(x0.device)[t] * per_image).mean()


@contextlib.contextmanager
def skip_dropout(unet: Any, p: float, levels: Sequence[int] | None = None) -> Iterator[None]:
    """Training-time dropout of a U-Net's skip connections, per image.

    Inside the block, every U-Net call draws one Bernoulli(``p``) per image (global torch
    RNG) and zeroes, for the dropped images, every skip tensor that enters the decoder
    levels ``levels`` (indices of ``unet.up_blocks``, 0 = the lowest level next to the
    middle block; default: all). A decoder trained so must rebuild the image from the
    bottleneck h when the skips are gone, which is meant to make h carry the content
    (the lever of DiffInject's h-space injection; measure it with
    :func:`~unspur.generate.hspace.h_share`). Our choice, not in the DiffInject or P2
    papers. Outside the block (sampling, inversion) the U-Net is unchanged.
    """
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"skip_dropout must be in [0, 1], got {p}")
    blocks = list(unet.up_blocks)
    chosen = range(len(blocks)) if levels is None else [int(i) for i in levels]
    if any(not 0 <= i < len(blocks) for i in chosen):
        raise ConfigError(f"skip_dropout levels must be in 0..{len(blocks) - 1}, got {levels}")
    if p == 0:
        yield
        return
    keep: dict[str, torch.Tensor] = {}

    def draw(module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        kept = (torch.rand(sample.shape[0]) >= p).to(device=sample.device, dtype=sample.dtype)
        keep["mask"] = kept.view(-1, 1, 1, 1)

    def drop(module, args, kwargs):
        return _map_skips(args, kwargs, lambda r: r * keep["mask"])

    handles = [unet.register_forward_pre_hook(draw, with_kwargs=True)]
    handles += [blocks[i].register_forward_pre_hook(drop, with_kwargs=True) for i in chosen]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _map_skips(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``fn`` to every skip tensor of one up-block call (a forward pre-hook's
    ``(args, kwargs)``); diffusers passes them as ``res_hidden_states_tuple``."""
    if "res_hidden_states_tuple" in kwargs:
        kwargs["res_hidden_states_tuple"] = tuple(fn(r) for r in kwargs["res_hidden_states_tuple"])
    else:
        args = (args[0], tuple(fn(r) for r in args[1]), *args[2:])
    return args, kwargs


#: The ``unet.config`` entry that records :func:`remove_skips` (a private key, so
#: diffusers saves it in ``config.json`` and restores it on load without a warning);
#: :func:`load_ddpm` re-applies the cut.
NO_SKIP_KEY = "_unspur_no_skip_below"


def _cut_skips(module, args, kwargs):
    return _map_skips(args, kwargs, torch.zeros_like)


def remove_skips(unet: Any, no_skip_below: int) -> Any:
    """Cut the skip connections into the lowest ``no_skip_below`` decoder levels, for good.

    The up blocks ``unet.up_blocks[:no_skip_below]`` (index 0 = the lowest level, next to
    the middle block) receive zeros in place of the encoder's skip tensors, so what they
    compute depends on the input only through the middle block's output h: the coarse
    half of the decoder has to read h, which is what DiffInject's h-space injection
    needs (measured with :func:`~unspur.generate.hspace.h_share`). Our choice, not in
    the DiffInject, Asyrp or P2 papers (their ADM keeps every skip); measured by the
    DiffInject suite (``bench/results/diffinject/``: h_share 0.53 at t = 500 with the
    cut, 0.08 without, and DiffInject's accuracy with each DDPM).

    Zeros rather than narrower convolutions keep diffusers' ``UNet2DModel`` and its
    weight layout (the weights that would read the skips receive zeros and no
    gradient). The cut is a forward pre-hook, recorded in ``unet.config`` under
    :data:`NO_SKIP_KEY`: :func:`save_ddpm` writes it and :func:`load_ddpm` restores it
    (``DDPMPipeline.from_pretrained`` alone would load the model without the cut).
    ``no_skip_below = 0`` restores every skip. Returns ``unet`` (changed in place).
    """
    blocks = list(unet.up_blocks)
    if not 0 <= int(no_skip_below) <= len(blocks):
        raise ConfigError(
            f"no_skip_below must be in 0..{len(blocks)} (the U-Net's decoder levels), "
            f"got {no_skip_below}"
        )
    for handle in getattr(unet, "_unspur_skip_cuts", []):
        handle.remove()
    unet._unspur_skip_cuts = [
        block.register_forward_pre_hook(_cut_skips, with_kwargs=True)
        for block in blocks[: int(no_skip_below)]
    ]
    unet.register_to_config(**{NO_SKIP_KEY: int(no_skip_below)})
    return unet


def skips_removed_below(unet: Any) -> int:
    """How many of the lowest decoder levels have no skip connections (see
    :func:`remove_skips`); 0 for a plain U-Net."""
    return int(unet.config.get(NO_SKIP_KEY, 0) or 0)


@dataclass
class TrainedDDPM:
    """What :func:`train_ddpm` returns: the trained U-Net, its noise schedule, the loop's
    result (losses) and the directory :func:`load_ddpm` reads."""

    unet: Any
    scheduler: Any
    result: GenerativeTrainResult
    model_dir: Path


def _is_conditional(unet: Any) -> bool:
    return getattr(unet.config, "num_class_embeds", None) is not None or (
        getattr(unet.config, "class_embed_type", None) is not None
    )


def train_ddpm(
    unet: Any,
    data: Any,
    config: GenerativeTrainConfig,
    out_dir: str | Path,
    *,
    p2_gamma: float = 1.0,
    p2_k: float = 1.0,
    conditional: bool | None = None,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    labels: torch.Tensor | Sequence[int] | None = None,
    random_flip: bool = False,
    skip_dropout_p: float = 0.0,
    skip_dropout_levels: Sequence[int] | None = None,
) -> TrainedDDPM:
    """Train ``unet`` in place as an epsilon-prediction DDPM with P2 weighting.

    ``data``: see :class:`DiffusionImages` (a tensor in ``[-1, 1]``, a GroupDataset, or a
    dataset of ``(x, y)``). ``conditional`` (default: whether the U-Net has a class
    embedding) feeds the labels as ``class_labels``. ``random_flip`` flips half the images
    horizontally (ADM/P2 train with flips; off by default because a flip can change a
    class in some benchmarks). Every other setting (steps, batch, learning rate, EMA,
    checkpoints, resume) is ``config``'s; :data:`P2_TRAINING` holds the paper's.

    Differences from the P2 code: the variance is fixed, not learned (P2 trains ADM's
    learned-sigma head with the hybrid VLB loss); DDIM, which is all DiffInject uses,
    never reads it. The P2 weight multiplies the epsilon MSE only, unnormalised.

    ``skip_dropout_p`` > 0 trains with :func:`skip_dropout` on the up blocks
    ``skip_dropout_levels`` (our choice, to make the decoder read h); the saved model is
    a plain ``UNet2DModel``.

    Writes ``out_dir/checkpoint`` (resumable) and, at the end, ``out_dir/ddpm`` (the
    model in the DDPMPipeline layout, see :func:`save_ddpm`).
    """
    out_dir = Path(out_dir)
    has_classes = _is_conditional(unet)
    if conditional is None:
        conditional = has_classes
    if conditional and not has_classes:
        raise ConfigError("conditional=True needs a U-Net built with num_classes")
    if has_classes and not conditional:
        raise ConfigError("this U-Net has a class embedding: train it with conditional=True")
    dataset = DiffusionImages(data, image_size=_sample_size(unet)[0], labels=labels)
    scheduler = build_ddpm_scheduler(num_train_timesteps, beta_schedule)
    weights = p2_weights(scheduler, p2_gamma, p2_k)

    settings = {
        "p2_gamma": p2_gamma,
        "p2_k": p2_k,
        "conditional": bool(conditional),
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule,
        "random_flip": random_flip,
    }
    if skips_removed_below(unet):
        settings["no_skip_below"] = skips_removed_below(unet)
    if skip_dropout_p:
        settings["skip_dropout_p"] = float(skip_dropout_p)
        settings["skip_dropout_levels"] = (
            None if skip_dropout_levels is None else list(skip_dropout_levels)
        )
    settings_file = out_dir / "ddpm_settings.json"
    if settings_file.exists() and (out_dir / "checkpoint" / "state.json").exists():
        before = json.loads(settings_file.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise CheckpointError(
                f"{out_dir} holds a DDPM trained with different settings ({', '.join(changed)});"
                " use the same settings to resume, or a new output directory"
            )
    atomic_write_json(settings_file, settings)

    def loss_fn(models, batch):
        y = batch.get("y") if conditional else None
        if conditional and y is None:
            raise DataError("conditional training needs class labels; the data has none")
        return ddpm_loss(models["unet"], scheduler, batch["x"], weights, y, random_flip)

    with skip_dropout(unet, float(skip_dropout_p), skip_dropout_levels):
        result = train_steps({"unet": unet}, loss_fn, dataset, config, out_dir, description="ddpm")
    model_dir = out_dir / "ddpm"
    save_ddpm(model_dir, unet, scheduler)
    return TrainedDDPM(unet=unet, scheduler=scheduler, result=result, model_dir=model_dir)


# --------------------------------------------------------------------------- save / load


def save_ddpm(directory: str | Path, unet: Any, scheduler: Any) -> Path:
    """Write ``unet`` and ``scheduler`` as a ``DDPMPipeline`` directory, atomically.

    ``model_index.json`` + ``unet/`` (config and safetensors weights) + ``scheduler/``;
    ``DDPMPipeline.from_pretrained(directory)`` and :func:`load_ddpm` both read it.
    """
    from diffusers import DDPMPipeline

    directory = Path(directory)
    with atomic_dir(directory) as scratch:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(
            scratch, safe_serialization=True
        )
    return directory


def _load_unet(source: str, subfolder: str | None, **kwargs) -> Any:
    from diffusers import UNet2DModel

    unet, info = UNet2DModel.from_pretrained(
        source, subfolder=subfolder, output_loading_info=True, **kwargs
    )
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad or info.get("error_msgs"):
        raise CheckpointError(f"{source} does not match its U-Net config: {bad or info}")
    return unet


def load_ddpm(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load ``(unet, scheduler)`` from a local directory or a hub id.

    Reads the DDPMPipeline layout (``unet/`` and ``scheduler/`` subfolders, what
    :func:`save_ddpm` writes and ``google/ddpm-*`` repositories hold) or a flat directory
    (``config.json`` + weights + ``scheduler_config.json`` side by side). The scheduler
    comes back as a ``DDPMScheduler`` whatever class saved it (only its noise schedule
    is used); a directory without one gets the default linear 1000-step schedule. The
    U-Net is loaded strictly (missing or unexpected weights raise) and in eval mode.
    """
    from diffusers import DDPMScheduler

    source = str(source)
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    local = Path(source)
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file; load_ddpm needs a model directory")
        if (local / "unet" / "config.json").exists():
            unet = _load_unet(source, "unet", **kwargs)
        elif (local / "config.json").exists():
            unet = _load_unet(source, None, **kwargs)
        else:
            raise CheckpointError(
                f"{local} has neither unet/config.json (DDPMPipeline layout) nor config.json "
                "(a flat U-Net directory)"
            )
        if (local / "scheduler" / "scheduler_config.json").exists():
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        elif (local / "scheduler_config.json").exists():
            scheduler = DDPMScheduler.from_pretrained(source)
        else:
            scheduler = build_ddpm_scheduler(unet.config.get("num_train_timesteps") or 1000)
    else:
        try:
            unet = _load_unet(source, "unet", **kwargs)
            layout = "scheduler"
        except (OSError, ValueError):
            try:
                unet = _load_unet(source, None, **kwargs)
                layout = None
            except (OSError, ValueError) as error:
                raise CheckpointError(
                    f"cannot load a DDPM from {source!r}: not a local directory, and the hub "
                    f"gave no U-Net under unet/ or at the top level ({error}). Offline, "
                    "download it first or pass a local directory."
                ) from error
        try:
            scheduler = DDPMScheduler.from_pretrained(source, subfolder=layout)
        except OSError:
            scheduler = DDPMScheduler.from_pretrained(source)
    if skips_removed_below(unet):
        remove_skips(unet, skips_removed_below(unet))
    if device is not None:
        unet.to(device)
    unet.eval()
    return unet, scheduler


# --------------------------------------------------------------------------- DDIM


def ddim_timesteps(scheduler: Any, steps: int) -> list[int]:
    """The ascending DDIM grid: ``round(linspace(0, T - 1, steps))``, unique ints."""
    total = int(scheduler.config.num_train_timesteps)
    if not 1 <= steps <= total:
        raise ConfigError(f"DDIM steps must be in 1..{total}, got {steps}")
    if steps == 1:
        return [total - 1]
    return [round(i * (total - 1) / (steps - 1)) for i in range(steps)]


def _sample_size(unet: Any) -> tuple[int, int]:
    size = unet.config.sample_size
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _unet_device_dtype(unet: Any) -> tuple[torch.device, torch.dtype]:
    parameter = next(unet.parameters())
    return parameter.device, parameter.dtype


def _labels(class_labels: Any, batch: int, device: torch.device, unet: Any) -> Any:
    conditional = _is_conditional(unet)
    if class_labels is None:
        if conditional:
            raise UnspurError("this U-Net is class-conditional: pass class_labels")
        return None
    if not conditional:
        raise UnspurError("class_labels given, but this U-Net has no class embedding")
    labels = torch.as_tensor(class_labels, dtype=torch.long)
    if labels.ndim == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise UnspurError(f"need one class label per image ({batch}), got {tuple(labels.shape)}")
    return labels.to(device)


class _Schedule:
    """``alpha_bar`` by timestep, with ``alpha_bar(-1) = 1`` (the clean image)."""

    def __init__(self, scheduler: Any) -> None:
        self.alpha_bar = scheduler.alphas_cumprod.double().tolist()
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"unsupported prediction_type {self.prediction_type!r}")

    def __call__(self, t: int) -> float:
        return 1.0 if t < 0 else self.alpha_bar[t]

    def eps(self, output: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        """The model output as predicted noise."""
        if self.prediction_type == "epsilon":
            return output
        a = self(t)
        if self.prediction_type == "v_prediction":
            return math.sqrt(a) * output + math.sqrt(1 - a) * x
        return (x - math.sqrt(a) * output) / math.sqrt(1 - a)


def unet_eps(
    unet: Any,
    x: torch.Tensor,
    t: int,
    schedule: _Schedule,
    class_labels: torch.Tensor | None,
) -> torch.Tensor:
    """One U-Net call at integer timestep ``t``, as float32 predicted noise."""
    _, dtype = _unet_device_dtype(unet)
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    output = unet(x.to(dtype), timesteps, class_labels=class_labels).sample.float()
    return schedule.eps(output, x, t)


def _predict_x0(x, eps, a_t, clip):
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    return x0, eps


def ddim_step(
    x: torch.Tensor,
    eps_x0: torch.Tensor,
    a_t: float,
    a_prev: float,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    eps_direction: torch.Tensor | None = None,
    clip: bool = False,
) -> torch.Tensor:
    """One generalised DDIM step from ``alpha_bar = a_t`` down to ``a_prev``.

    ``x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise`` with
    ``x0`` predicted from ``eps_x0`` and ``sigma = eta * sqrt((1 - a_prev) / (1 - a_t))
    * sqrt(1 - a_t / a_prev)`` (DDIM eq. 16; ``eta = 1`` is DDPM's posterior on this
    grid). ``eps_direction`` (default ``eps_x0``) is the noise used in the direction
    term: a different one gives Asyrp's asymmetric reverse process.
    """
    x0, eps = _predict_x0(x, eps_x0, a_t, clip)
    if eps_direction is not None:
        eps = eps_direction
    sigma = 0.0
    if eta > 0 and a_prev < 1.0:
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    out = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise UnspurError("a stochastic DDIM step (eta > 0) needs noise")
        out = out + sigma * noise
    return out


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def per_image_noise(
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Stack one standard-normal tensor of ``shape`` per generator (drawn on the CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


EtaSchedule = float | Callable[[int], float]


def _eta(eta: EtaSchedule, t: int) -> float:
    return float(eta(t)) if callable(eta) else float(eta)


def boost_eta(t_boost: int) -> Callable[[int], float]:
    """Asyrp's "quality boosting": stochastic (``eta = 1``) steps at ``t < t_boost``,
    deterministic ones above (``eta=1.0 if t < t_addnoise else 0.0`` in its code)."""
    return lambda t: 1.0 if t < t_boost else 0.0


def ddim_reverse(
    unet: Any,
    scheduler: Any,
    x: torch.Tensor,
    timesteps: Sequence[int],
    *,
    eps_fn: Callable[[torch.Tensor, int], Any] | None = None,
    class_labels: Any = None,
    eta: EtaSchedule = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    clip_sample: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The DDIM reverse loop over ``timesteps`` (ascending grid), from ``x`` at the top.

    ``eps_fn(x, t)`` replaces the plain U-Net call; it returns the predicted noise, or a
    pair ``(eps_for_x0, eps_for_direction)``. ``callback(t, x)`` sees ``x`` after each
    step (``t`` = the timestep just evaluated). Used by :func:`ddim_sample` and the
    h-space editing code.
    """
    schedule = _Schedule(scheduler)
    device, _ = _unet_device_dtype(unet)
    x = x.to(device=device, dtype=torch.float32)
    labels = _labels(class_labels, x.shape[0], device, unet)
    if generators is not None and len(generators) != x.shape[0]:
        raise UnspurError(f"{len(generators)} generators for {x.shape[0]} images")
    grid = list(timesteps)
    with torch.no_grad():
        for i in range(len(grid) - 1, -1, -1):
            t = grid[i]
            a_t, a_prev = schedule(t), schedule(grid[i - 1] if i > 0 else -1)
            if eps_fn is None:
                out = unet_eps(unet, x, t, schedule, labels)
            else:
                out = eps_fn(x, t)
            eps_x0, eps_dir = out if isinstance(out, tuple) else (out, None)
            step_eta = _eta(eta, t)
            noise = None
            if step_eta > 0 and a_prev < 1.0:
                if generators is None:
                    raise UnspurError(
                        "stochastic steps (eta > 0) need one seed per image: pass seeds"
                    )
                noise = per_image_noise(generators, x.shape[1:], device)
            x = ddim_step(
                x,
                eps_x0,
                a_t,
                a_prev,
                eta=step_eta,
                noise=noise,
                eps_direction=eps_dir,
                clip=clip_sample,
            )
            if callback is not None:
                callback(t, x)
    return x


def _start_noise(unet, noise, shape, seeds):
    generators = None if seeds is None else image_generators(seeds)
    if noise is None:
        if seeds is None:
            raise UnspurError("pass the starting noise or one seed per image")
        if shape is None:
            height, width = _sample_size(unet)
            shape = (unet.config.in_channels, height, width)
        noise = per_image_noise(generators, shape)
    elif seeds is not None and len(seeds) != noise.shape[0]:
        raise UnspurError(f"{len(seeds)} seeds for {noise.shape[0]} images")
    return noise, generators


def ddim_sample(
    unet: Any,
    scheduler: Any,
    noise: torch.Tensor | None = None,
    *,
    seeds: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    steps: int = 40,
    eta: EtaSchedule = 0.0,
    class_labels: Any = None,
    clip_sample: bool = False,
) -> torch.Tensor:
    """Generate images with DDIM; returns float32 ``(B, C, H, W)`` in about ``[-1, 1]``.

    Start from ``noise`` (``x_T``, e.g. from :func:`ddim_invert`) or draw it per image
    from ``seeds`` (shape ``(C, H, W)`` from the U-Net config unless ``shape`` is given).
    ``eta`` is a number or a function of the timestep (:func:`boost_eta`); stochastic
    steps draw from the per-image generators, so they need ``seeds`` too. ``steps=40``
    follows the Asyrp code (``n_inv_step = n_test_step = 40``). Not clipped by default.
    """
    x, generators = _start_noise(unet, noise, shape, seeds)
    return ddim_reverse(
        unet,
        scheduler,
        x,
        ddim_timesteps(scheduler, steps),
        class_labels=class_labels,
        eta=eta,
        generators=generators,
        clip_sample=clip_sample,
    )


def ddim_invert(
    unet: Any,
    scheduler: Any,
    images: torch.Tensor,
    *,
    steps: int = 40,
    class_labels: Any = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion: the ``x_T`` that ``ddim_sample(x_T, steps=steps)``
    maps back to about ``images`` (``[-1, 1]``). Same grid as the sampler, walked up.

    ``timesteps`` (ascending) replaces the grid ``ddim_timesteps(scheduler, steps)``,
    e.g. InjectFusion's :func:`~unspur.generate.hspace.official_timesteps`. The U-Net
    is called at every grid point but the last (at the lower end of each step, as in
    the InjectFusion / DiffInject code, whose ``h_dic`` keys are those timesteps)."""
    schedule = _Schedule(scheduler)
    device, _ = _unet_device_dtype(unet)
    x = images.to(device=device, dtype=torch.float32)
    labels = _labels(class_labels, x.shape[0], device, unet)
    grid = list(timesteps) if timesteps is not None else ddim_timesteps(scheduler, steps)
    if not grid or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ConfigError(f"DDIM inversion needs an ascending grid, got {grid[:5]}...")
    with torch.no_grad():
        for i, t in enumerate(grid):
            a_from = schedule(grid[i - 1] if i > 0 else -1)
            a_to = schedule(t)
            eps = unet_eps(unet, x, grid[i - 1] if i > 0 else grid[0], schedule, labels)
            x0 = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
            x = math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps
            if callback is not None:
                callback(t, x)
    return x
