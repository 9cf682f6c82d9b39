"""xGradCAM (Fu et al. 2020, "Axiom-based Grad-CAM"), written on plain torch hooks.

For a layer with activations ``A`` of shape ``(B, C, h, w)`` and a target score ``S``
(the logit of the target class), xGradCAM weighs every channel by

    w_c = sum_{ij} (dS/dA_cij * A_cij) / (sum_{ij} A_cij + eps)

and the map is ``ReLU(sum_c w_c A_c)``, bilinearly upsampled to the image size. This is
exactly what ``pytorch_grad_cam.XGradCAM`` computes (MaC and MaskTune both use that
package; ``eps = 1e-7`` as there); the package's per-image min-max scaling is left to
:func:`normalize_maps`, because top-K masks and MaskTune's mean+2std threshold do not
depend on it and the mask-quality table wants the raw maps too.

Choices where the papers are silent:

- The layer defaults to the classifier's :attr:`~unspur.models.base.Classifier.cam_layer`
  (the last convolutional block, as both papers do with ResNet's ``layer4``).
- The target class defaults to the *predicted* class (``pytorch_grad_cam``'s default
  when no targets are given, which MaskTune's code relies on); MaC passes the true
  label of each training image (``targets=y``), since the mask should locate the evidence
  for the class the image is trained on.
- The model runs in eval mode (batch-norm running statistics), also for a model that is
  being trained; its mode is restored afterwards. Gradients flow to the layer's
  activations even when every parameter is frozen (the activation is made a leaf that
  requires grad), and no parameter gradient is accumulated.
- Upsampling is ``F.interpolate(mode="bilinear", align_corners=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unspur.errors import ConfigError

EPS = 1e-7


def resolve_layer(model: nn.Module, layer: nn.Module | str | None = None) -> nn.Module:
    """The module xGradCAM reads: ``layer`` (a module or dotted name) or ``model.cam_layer``."""
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str) and layer:
        try:
            return model.get_submodule(layer)
        except AttributeError as err:
            raise ConfigError(
                f"model {type(model).__name__} has no submodule {layer!r} for xGradCAM"
            ) from err
    if hasattr(type(model), "cam_layer"):
        return model.cam_layer  # raises ConfigError for models without a conv layer
    raise ConfigError(
        f"{type(model).__name__} declares no cam_layer; pass the layer for xGradCAM by name"
    )


def xgradcam(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor | None = None,
    layer: nn.Module | str | None = None,
    eps: float = EPS,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """xGradCAM maps of a batch: ``(B, H, W)``, non-negative, at the image size.

    ``targets`` are class indices (``None``: the predicted class). ``size`` overrides
    the output size (default: ``x``'s spatial size).
    """
    if x.ndim != 4:
        raise ConfigError(f"xgradcam expects images (B, C, H, W), got shape {tuple(x.shape)}")
    module = resolve_layer(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ConfigError(
                f"xGradCAM layer {type(_module).__name__} must output (B, C, h, w) feature "
                "maps; choose a convolutional layer"
            )
        act = output if output.requires_grad else output.detach().requires_grad_(True)
        store["act"] = act
        return act

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            if isinstance(logits, tuple):
                logits = logits[0]
            if "act" not in store:
                raise ConfigError("the xGradCAM layer was not run by the model's forward")
            if targets is None:
                targets = logits.argmax(1)
            targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
            score = logits.gather(1, targets[:, None]).sum()
            act = store["act"]
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(was_training)
    return cam_from(act.detach(), grad.detach(), size or tuple(x.shape[-2:]), eps)


def cam_from(
    act: torch.Tensor, grad: torch.Tensor, size: tuple[int, int], eps: float = EPS
) -> torch.Tensor:
    """The xGradCAM formula on given activations and gradients ``(B, C, h, w)``."""
    act, grad = act.float(), grad.float()
    weights = (grad * act).sum(dim=(2, 3)) / (act.sum(dim=(2, 3)) + eps)
    cam = F.relu((weights[:, :, None, None] * act).sum(1, keepdim=True))
    if tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
        cam = cam.clamp_min(0)  # bilinear weights are non-negative; guards rounding
    return cam[:, 0]


def normalize_maps(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1] (``pytorch_grad_cam``'s ``scale_cam_image``)."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(1, keepdim=True).values
    high = (flat - low).max(1, keepdim=True).values
    return ((flat - low) / (high + eps)).reshape(maps.shape)


def saliency_batches(
    model: nn.Module,
    loader,
    layer: nn.Module | str | None = None,
    use_labels: bool = True,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """xGradCAM of every item a loader yields ``(x, y, g, index)``: ``(maps, index)``.

    Maps are float32 on the CPU in loader order; ``use_labels`` targets the true class,
    otherwise the predicted one.
    """
    if device is None:
        device = next(model.parameters()).device
    maps, positions = [], []
    for x, y, _g, index in loader:
        x = x.to(device)
        targets = y.to(device) if use_labels else None
        maps.append(xgradcam(model, x, targets, layer).cpu())
        positions.append(torch.as_tensor(index))
    if not maps:
        raise ConfigError("cannot compute saliency of an empty dataset")
    return torch.cat(maps), torch.cat(positions)
