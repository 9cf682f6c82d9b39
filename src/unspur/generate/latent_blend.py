"""Keep the unmasked region in latent space while an inpainting pipeline denoises.

DBB's Eq. 2 writes the noisy latent of an inpainting step as
``z_t = (1 - M) * z_0 + M * (sqrt(alpha_t) z_0 + sqrt(1 - alpha_t) eps)``: only the masked
region is noised and denoised, the unmasked region *is* the original's latent ``z_0``
throughout, so the output keeps it (up to the VAE's decoding). A diffusers inpainting
pipeline does that only for a 4-channel UNet, and with ``z_0`` noised to the next
step's level (Blended Latent Diffusion); a 9-channel inpainting UNet (SD-2-inpainting,
our domain models) gets the masked image as extra input channels and no blend at all,
so whether the background survives is up to how well the model learned to read those
channels. :class:`LatentBlend` is a ``callback_on_step_end`` that applies the blend
after every denoising step, to either kind of UNet:

- ``"clean"``: Eq. 2 as written, the unmasked latents are ``z_0``;
- ``"noised"``: ``z_0`` noised to the next step's timestep with the image's own starting
  noise (the same draw diffusers uses for a 4-channel UNet), ``z_0`` after the last step;
- ``"none"`` (no callback): the pipeline's own behaviour.

``z_0`` is the VAE posterior's mean of the image as the pipeline preprocesses it (our
choice: the kept region then does not depend on a random draw; diffusers samples it).
The first UNet call still sees the pipeline's starting latents (the callback runs after
a step); from then on every step starts from the blended latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

#: Values of ``GenerationSettings.latent_blend``.
LATENT_BLENDS: tuple[str, ...] = ("none", "clean", "noised")


class LatentBlend:
    """``callback_on_step_end`` for one pipeline call: after every step, the latents
    outside the pipeline's own latent mask become the original's (see the module
    docstring). Build one per call (it holds that call's images and seeds)."""

    #: The pipeline tensors the callback reads.
    tensor_inputs: list[str] = ["latents", "mask"]

    def __init__(
        self, pipeline: Any, images: Sequence[Image.Image], seeds: Sequence[int], mode: str
    ) -> None:
        if mode not in LATENT_BLENDS[1:]:
            raise ValueError(f"latent blend {mode!r} is not one of {LATENT_BLENDS[1:]}")
        self.mode = mode
        vae = pipeline.vae
        height, width = images[0].height, images[0].width
        pixels = pipeline.image_processor.preprocess(list(images), height=height, width=width)
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            self.z0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        shape = (1, *self.z0.shape[1:])
        # The pipeline draws each image's starting noise first from its own generator.
        self.noise = torch.cat(
            [_starting_noise(shape, int(seed), self.z0.dtype) for seed in seeds]
        ).to(self.z0.device)

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline call's arguments that install this callback."""
        return {
            "callback_on_step_end": self,
            "callback_on_step_end_tensor_inputs": self.tensor_inputs,
        }

    def __call__(self, pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        latents = tensors["latents"]
        mask = tensors["mask"][-len(latents) :]  # doubled for classifier-free guidance
        keep = self.z0
        timesteps = pipeline.scheduler.timesteps
        if self.mode == "noised" and step < len(timesteps) - 1:
            upcoming = timesteps[step + 1 : step + 2]
            keep = pipeline.scheduler.add_noise(self.z0, self.noise, upcoming)
        mask = mask.to(latents.dtype)
        return {"latents": (1 - mask) * keep.to(latents.dtype) + mask * latents}


def _starting_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The first draw of a CPU generator seeded with ``seed``, as the pipeline makes it."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
