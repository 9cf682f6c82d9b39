"""Integrated Gradients (Sundararajan et al. 2017) through Captum, batched over images.

DBB prunes a generated image by how much the *edited region* pushes the classifier
towards the new class: the attribution of the new class ``i'`` summed inside the object
mask, with the *original* image as the baseline (not a black image)::

    IG_j(x) = (x_j - x'_j) * integral_0^1 d f_{i'}(x' + a (x - x')) / d x_j  da
    rho     = sum_{j in mask} IG_j(x_new; baseline x_orig)

(DBB's Eq. 4-5.) Completeness: ``sum_j IG_j = f_{i'}(x) - f_{i'}(x')`` up to the
quadrature error of ``n_steps`` points. DBB scores the inpainting model's output as it is
(Eq. 2 keeps the unmasked region in latent space, no pixel paste-back), so the pixels
outside the mask differ slightly from the baseline (the VAE round trip) and carry
attributions of their own; ``rho`` leaves them out, and is therefore *not* the whole
change of the new class's score, only the part the masked region makes. Where the
baseline equals the input (paste-back, an option of DBB), the attribution is exactly 0
and ``rho`` over a mask that covers the edit is the full change.

``n_steps`` defaults to 32 here (our choice for speed); Captum's own default, which the
official DBB code uses, is 50 (DBB's ``ig_steps`` default).

:func:`integrated_gradients` hands a whole batch of images to one Captum call (each with
its own baseline and target); Captum expands it to ``n_steps * B`` interpolated inputs
and ``internal_batch_size`` bounds how many go through the model at once. The public
reference code loops over images one at a time (:func:`integrated_gradients_loop` here).
What batching buys depends on the hardware: on one CPU thread IG of a small CNN is
compute-bound (every interpolated input costs one forward and one backward pass either
way): the ``dbb`` suite's ``ig_throughput`` (``bench/results/dbb/``: 64 images, 32 steps,
the default ``internal_batch_size`` 512, one thread) measured the batched call at 0.63x
the loop's speed (19.5 against 31.1 images per second, the same attributions); on an
accelerator, where a 32-input call leaves the device mostly idle, the batched call is the
one that fills it.

``output`` chooses the explained function: ``"logit"`` (the model's raw output, Captum's
usual target) or ``"probability"`` (its softmax). The model is put in eval mode for the
call (BatchNorm statistics and dropout must not change along the path) and restored
after; gradients are taken with respect to the inputs only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unspur.errors import ConfigError

OUTPUTS = ("logit", "probability")
METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")


class _Explained(nn.Module):
    """The function IG integrates: the model's logits or their softmax."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.output == "probability":
            return torch.softmax(logits.float(), dim=1)
        return logits


def _targets(target: int | Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    if isinstance(target, int):
        return torch.full((n,), int(target), dtype=torch.long)
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if t.numel() != n:
        raise ConfigError(f"integrated gradients got {t.numel()} targets for {n} images")
    return t


def _check(
    n_steps: int, internal_batch_size: int | None, batch_size: int, output: str, method: str
):
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ConfigError(f"n_steps must be a positive integer, got {n_steps!r}")
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool)
        or not isinstance(internal_batch_size, int)
        or internal_batch_size < 1
    ):
        raise ConfigError(
            f"internal_batch_size must be a positive integer or None, got {internal_batch_size!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    *,
    n_steps: int = 32,
    internal_batch_size: int | None = 512,
    batch_size: int = 64,
    method: str = "gausslegendre",
    output: str = "logit",
) -> torch.Tensor:
    """IG attributions ``(B, C, H, W)`` of ``target`` for ``inputs`` against ``baselines``.

    ``inputs`` and ``baselines`` are model inputs of the same shape (DBB: the generated
    image and its original, both through the classifier's eval transform); ``target`` is
    one class for all or one per image. ``batch_size`` images go to Captum per call and
    ``internal_batch_size`` bounds the interpolated inputs per forward/backward pass
    (Captum needs it >= the images per call; smaller values are raised to that).
    Returned on the CPU in the inputs' dtype.
    """
    _check(n_steps, internal_batch_size, batch_size, output, method)
    from captum.attr import IntegratedGradients

    if inputs.shape != baselines.shape:
        raise ConfigError(
            f"inputs {tuple(inputs.shape)} and baselines {tuple(baselines.shape)} must have the same shape"
        )
    n = inputs.shape[0]
    targets = _targets(target, n)
    device = next(model.parameters()).device
    explained = _Explained(model, output)
    ig = IntegratedGradients(explained)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n, batch_size):
            x = inputs[start : start + batch_size].to(device)
            base = baselines[start : start + batch_size].to(device)
            t = targets[start : start + batch_size].to(device)
            chunk = None if internal_batch_size is None else max(internal_batch_size, len(x))
            with torch.enable_grad():
                attr = ig.attribute(
                    x, baselines=base, target=t, n_steps=n_steps, method=method,
                    internal_batch_size=chunk,
                )  # fmt: skip
            out.append(attr.detach().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(inputs.shape, dtype=inputs.dtype)
    return torch.cat(out)


def integrated_gradients_loop(
    model: nn.Module,
    inputs: torch.Tensor,
    baselines: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    *,
    n_steps: int = 32,
    method: str = "gausslegendre",
    output: str = "logit",
) -> torch.Tensor:
    """The same attributions one image per Captum call (the public reference code's
    loop); kept as the baseline of the throughput benchmark and for cross-checks."""
    targets = _targets(target, inputs.shape[0])
    parts = [
        integrated_gradients(
            model,
            inputs[i : i + 1],
            baselines[i : i + 1],
            [int(targets[i])],
            n_steps=n_steps,
            internal_batch_size=None,
            batch_size=1,
            method=method,
            output=output,
        )  # fmt: skip
        for i in range(inputs.shape[0])
    ]
    return torch.cat(parts) if parts else torch.zeros(inputs.shape, dtype=inputs.dtype)


@torch.no_grad()
def target_scores(
    model: nn.Module,
    x: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    output: str = "logit",
) -> torch.Tensor:
    """``f_target(x)`` per image (the quantity IG's completeness refers to), on the CPU."""
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        values = _Explained(model, output)(x.to(device)).cpu()
    finally:
        model.train(was_training)
    t = _targets(target, x.shape[0])
    return values.gather(1, t[:, None]).squeeze(1)


def masked_attribution_sum(attributions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DBB's ``rho``: attributions summed over channels and over the pixels of ``mask``.

    ``attributions`` ``(B, C, H, W)``; ``mask`` ``(B, H, W)`` or ``(B, 1, H, W)``, boolean
    or 0/1 (a float mask is read as ``> 0``: any pixel the region touches counts, so a
    resized mask still covers every edited pixel). Returns ``(B,)``.
    """
    if attributions.ndim != 4:
        raise ConfigError(f"attributions must be (B, C, H, W), got {tuple(attributions.shape)}")
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ConfigError(f"a 4-D mask must have one channel, got {tuple(mask.shape)}")
        mask = mask[:, 0]
    b, _, h, w = attributions.shape
    if tuple(mask.shape) != (b, h, w):
        raise ConfigError(
            f"mask {tuple(mask.shape)} does not match the attributions' (B, H, W) = {(b, h, w)}"
        )
    inside = (mask > 0).to(attributions.device, attributions.dtype)
    return (attributions.sum(1) * inside).sum((1, 2))
