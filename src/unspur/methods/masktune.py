"""MaskTune (Asgari et al., NeurIPS 2022): "Mitigating Spurious Correlations by
Forcing to Explore".

Mask the features the ERM model relies on most, then fine-tune the whole model for one
epoch on the masked training data only, so it has to find other evidence. Following
the official code (``aliasgharkhani/Masktune``):

- Saliency: xGradCAM (``pytorch_grad_cam.XGradCAM`` there, :func:`unspur.explain.xgradcam`
  here) of the reference ERM model on its last convolutional block, for the *predicted*
  class (the official ``heat_map_generator(images)`` passes no targets).
- Mask (``mask_heatmap_using_threshold``): the pixels whose saliency exceeds the mean +
  2 std of the image's positive saliency values are hidden, i.e. set to 0 (black in the
  raw image; here the classifier-space value of black, ``-mean/std`` under ImageNet
  normalisation). ``n_std`` changes the 2.
- Fine-tuning: one epoch (``epochs``) of cross-entropy on the masked training set, all
  parameters trainable, with the run's optimiser settings (``lr`` overrides the learning
  rate; the official code reuses the ERM optimiser without a scheduler step).

Deviations, with reasons: the official code masks with the best (validation-selected)
ERM checkpoint and fine-tunes its *last*-epoch checkpoint; both use the one reference
model here (``context.reference_model()``, shared with every other method). The masked
images are built at the classifier's input resolution from the eval view of the
training set (no augmentation during the fine-tuning epoch), so masks and pixels line
up exactly; the official code saves masked images and re-reads them with its training
transform. Masks are computed once, stored as uint8 in ``out_dir/masktune/masks.safetensors``
(keyed by the reference weights and data) and applied per batch by
:class:`MaskedObjective`. No group label is used for training; validation group labels
only select the epoch (trivial with one epoch): supervision ✓, x with
``train.selection=average``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unspur.errors import ConfigError
from unspur.explain.masks import threshold_mask
from unspur.explain.xgradcam import xgradcam
from unspur.io import atomic_write_json
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.methods.last_layer import backbone_device
from unspur.methods.mac import _loader, load_masks, mask_key, require_cam_model, save_masks
from unspur.train.features import with_transform
from unspur.train.loop import FitResult
from unspur.train.objectives import Objective


def black_value(transform: Any, channels: int = 3) -> torch.Tensor:
    """The classifier-space value of a black pixel, ``(1, C, 1, 1)``."""
    mean = getattr(transform, "mean", None)
    std = getattr(transform, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return (-mean / std).reshape(1, -1, 1, 1).float()
    return torch.zeros(1, channels, 1, 1)


def apply_mask(x: torch.Tensor, hide: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``x`` with the pixels where ``hide`` is 1 replaced by ``fill``."""
    hide = hide.to(dtype=x.dtype, device=x.device)
    if hide.ndim == 3:
        hide = hide[:, None]
    return x * (1 - hide) + hide * fill.to(dtype=x.dtype, device=x.device)


class MaskedObjective(Objective):
    """Cross-entropy on the batch with each image's stored mask applied."""

    name = "masktune"

    def __init__(self, masks: torch.Tensor, fill: torch.Tensor) -> None:
        self.masks = masks
        self.fill = fill

    def step(self, model, x, y, g, index):
        logits = model(apply_mask(x, self.masks[index.cpu()], self.fill))
        return F.cross_entropy(logits, y), logits


def masktune_masks(
    model: nn.Module, view, n_std: float, layer: str | None, batch_size: int
) -> torch.Tensor:
    """uint8 0/1 masks (1 = hidden) of every item of ``view``, in dataset order."""
    device = backbone_device(model)
    masks = None
    for x, _y, _g, index in _loader(view, batch_size):
        maps = xgradcam(model, x.to(device), None, layer).cpu()
        hide = threshold_mask(maps, n_std).to(torch.uint8)
        if masks is None:
            masks = torch.zeros((len(view), *hide.shape[1:]), dtype=torch.uint8)
        masks[index] = hide
    assert masks is not None
    return masks


@register_method
class MaskTune(Method):
    """MaskTune: one epoch of fine-tuning the ERM model on xGradCAM-masked images."""

    name = "masktune"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    uses_reference = True
    summary = "mask the ERM model's most salient pixels, fine-tune one epoch on them"
    defaults: dict[str, Any] = {
        "epochs": 1,
        "lr": None,
        "n_std": 2.0,
        "layer": None,
        "mask_batch_size": 64,
    }

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        epochs, lr, n_std = options["epochs"], options["lr"], options["n_std"]
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"masktune option epochs must be a positive integer, got {epochs!r}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0):
            raise ConfigError(f"masktune option lr must be a positive number or null, got {lr!r}")
        if isinstance(n_std, bool) or not isinstance(n_std, int | float):
            raise ConfigError(f"masktune option n_std must be a number, got {n_std!r}")
        require_cam_model(context.build_model(), options["layer"], "MaskTune")
        model = context.reference_model()
        require_cam_model(model, options["layer"], "MaskTune")
        directory = context.out_dir / "masktune"
        view = with_transform(context.train, context.eval_transform)
        settings = {"n_std": float(n_std), "layer": options["layer"], "rule": "mean+n_std*std"}
        key = mask_key(model, view, settings)
        cached = load_masks(directory / "masks.safetensors", key, len(view))
        if cached is not None:
            masks = cached[0]
        else:
            masks = masktune_masks(
                model, view, float(n_std), options["layer"], int(options["mask_batch_size"])
            )
            save_masks(directory / "masks.safetensors", masks, key, settings)
        hidden = float(masks.float().mean())
        atomic_write_json(directory / "masks.json", {**settings, "hidden_fraction": hidden})
        model.freeze_backbone(False)
        config = context.config.train
        config = replace(
            config,
            epochs=epochs,
            lr=float(lr) if lr is not None else config.lr,
            scheduler="none",
            augment=False,
        )
        objective = MaskedObjective(masks, black_value(context.eval_transform))
        result = context.fit(
            model, "masktune/finetune", train=view, train_config=config, objective=objective
        )
        return model, result
