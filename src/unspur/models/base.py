"""The classifier contract every unspur model follows: a backbone plus one linear head.

Most methods in the field work on the split between the two: DFR, MaC and Clustered
DreamBooth retrain only the last layer on frozen features, JTT and LfF read per-sample
losses of the whole model, xGradCAM needs the last convolutional block. So every model
exposes ``features(x) -> (B, D)``, a linear ``head`` (D -> n_classes), ``cam_layer``,
and enough of its own description (:attr:`Classifier.spec`) to be rebuilt from a
checkpoint without the code that built it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from unspur.errors import ConfigError


class Classifier(nn.Module):
    """A backbone ``features`` followed by a linear ``head``; ``forward = head(features)``.

    Subclasses implement :meth:`features`, create the head as ``nn.Linear(D, n_classes)``
    under the attribute named by :attr:`head_name` (``"head"`` by default; ResNet uses
    ``"fc"`` so that its state dict keys match torchvision's) and set :attr:`arch`,
    :attr:`options` and :attr:`cam_layer_name`.
    """

    #: Attribute under which the linear head is registered (its state dict prefix);
    #: ``model.head`` always reaches it.
    head_name: str = "head"
    head: nn.Linear
    #: Registry name of the architecture (see :func:`unspur.models.build_model`).
    arch: str = ""
    #: Dotted module path of the last convolutional block ("" when there is none).
    cam_layer_name: str = ""

    def __init__(self) -> None:
        super().__init__()
        #: Keyword options that rebuild this architecture (JSON-serialisable).
        self.options: dict[str, Any] = {}
        #: Where pretrained weights came from, recorded for provenance only.
        self.pretrained: str | None = None
        self._backbone_frozen = False

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate representation, shape ``(B, feature_dim)``."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return logits ``head(features(x))``, shape ``(B, n_classes)``.

        With ``return_features`` also the features, as ``(logits, features)``: losses on
        the representation (SupCon) go through ``forward`` so that distributed wrappers
        (DDP) see the call.
        """
        features = self.features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    # --------------------------------------------------------------------- head
    # ``head`` is an alias of the module registered under ``head_name``. nn.Module
    # routes attribute access to submodules through __getattr__/__setattr__ (a property
    # setter would be bypassed), so the alias is resolved there.
    def __getattr__(self, name: str) -> Any:
        if name == "head" and type(self).head_name != "head":
            name = type(self).head_name
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "head" and type(self).head_name != "head":
            name = type(self).head_name
        super().__setattr__(name, value)

    @property
    def feature_dim(self) -> int:
        """Width D of :meth:`features` (the head's input size)."""
        return int(self.head.in_features)

    @property
    def n_classes(self) -> int:
        """Number of classes the head predicts."""
        return int(self.head.out_features)

    def reset_head(self, n_classes: int | None = None) -> nn.Linear:
        """Replace the head by a freshly initialised ``nn.Linear`` and return it.

        With ``n_classes`` the head changes size (fine-tuning a pretrained backbone on a
        new label set); without it, the same size is re-drawn (last-layer retraining
        from scratch, as DFR does). The new head is trainable, on the old head's device
        and dtype.
        """
        old = self.head
        n = self.n_classes if n_classes is None else int(n_classes)
        if n < 1:
            raise ConfigError(f"n_classes must be at least 1, got {n}")
        new = nn.Linear(old.in_features, n, bias=old.bias is not None)
        new.to(device=old.weight.device, dtype=old.weight.dtype)
        new.train(self.training)
        self.head = new
        return new

    # ---------------------------------------------------------------- freezing
    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the head only."""
        return self.head.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of everything but the head."""
        head_ids = {id(p) for p in self.head.parameters()}
        return (p for p in self.parameters() if id(p) not in head_ids)

    def backbone_modules(self) -> Iterator[nn.Module]:
        """Direct children that belong to the backbone (all but the head)."""
        return (m for name, m in self.named_children() if name != self.head_name)

    @property
    def backbone_frozen(self) -> bool:
        """Whether :meth:`freeze_backbone` is in effect."""
        return self._backbone_frozen

    def freeze_backbone(self, frozen: bool = True) -> Classifier:
        """Freeze (or unfreeze) everything but the head, for last-layer retraining.

        Frozen backbone parameters get ``requires_grad=False`` and the backbone stays in
        eval mode even under ``model.train()``, so batch-norm statistics and dropout do
        not change the features while the head trains (the DFR / MaC setting). Returns
        the model for chaining.
        """
        self._backbone_frozen = bool(frozen)
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        for p in self.head_parameters():
            p.requires_grad_(True)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> Classifier:
        """Set train/eval mode; a frozen backbone always stays in eval mode."""
        super().train(mode)
        if self._backbone_frozen:
            for m in self.backbone_modules():
                m.eval()
        return self

    # --------------------------------------------------------------- saliency
    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional block, the layer xGradCAM reads activations from."""
        if not self.cam_layer_name:
            raise ConfigError(
                f"architecture {self.arch or type(self).__name__!r} has no convolutional "
                "layer for xGradCAM; use a convolutional model (resnet18, resnet50, "
                "small_cnn) for saliency-based methods"
            )
        return self.get_submodule(self.cam_layer_name)

    # ------------------------------------------------------------ description
    @property
    def spec(self) -> dict[str, Any]:
        """``{"arch", "n_classes", "options"}``: what :func:`build_model` needs to rebuild."""
        return {"arch": self.arch, "n_classes": self.n_classes, "options": dict(self.options)}

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, feature_dim={self.feature_dim}, n_classes={self.n_classes}"
