"""Any transformers vision backbone (ViT, DINOv2, HF ResNet, ConvNeXt, Swin, CLIP vision...).

``HFBackbone.from_pretrained(name_or_path, n_classes)`` loads ``AutoModel`` weights from a
local directory (``save_pretrained`` output) or a hub id, and adds a linear head on the
pooled features. For a multimodal checkpoint (CLIP, SigLIP) only the vision tower is
kept. The model's :attr:`~HFBackbone.spec` embeds the transformers config, so a
checkpoint rebuilds offline with ``AutoModel.from_config`` and never touches the hub.

Pooling (``pooling=``): ``"auto"`` uses ``pooler_output`` when the model has one (HF
ResNet's ``(B, C, 1, 1)`` is flattened) and the mean of ``last_hidden_state`` otherwise;
``"pooler"``, ``"cls"`` (first token) and ``"mean"`` force one. When a checkpoint lacks
the pooler's weights (a ViT saved from ``ViTForImageClassification``: transformers would
initialise a random dense+tanh pooler), ``"auto"`` switches to the CLS token for
ViT-style models and to the mean otherwise, instead of reading random features.

transformers is imported lazily so that ``import unspur.models`` stays fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unspur.errors import CheckpointError, ConfigError
from unspur.models.base import Classifier

POOLINGS = ("auto", "pooler", "cls", "mean")
#: Model types whose first token is a trained CLS token (used when the pooler is missing).
CLS_TOKEN_MODEL_TYPES = frozenset(
    {
        "vit",
        "deit",
        "vit_msn",
        "vit_mae",
        "dinov2",
        "dinov2_with_registers",
        "beit",
        "data2vec-vision",
        "clip_vision_model",
        "dinov3_vit",
    }
)
_CAM_PATHS = ("encoder.stages", "encoder.layer", "encoder.layers", "stages", "layers")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set now (read at call time)."""
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _json_config(config: Any) -> dict[str, Any]:
    """A transformers config as a plain JSON-serialisable dict (with ``model_type``)."""
    return json.loads(config.to_json_string(use_diff=False))


def _vision_tower(model: nn.Module) -> nn.Module:
    """The vision part of a multimodal model (CLIP, SigLIP); the model itself otherwise."""
    from transformers import AutoModel, PreTrainedModel

    config = getattr(model, "config", None)
    tower = getattr(model, "vision_model", None)
    if tower is None or getattr(config, "vision_config", None) is None:
        return model
    if isinstance(tower, PreTrainedModel):
        return tower
    # Older layouts keep a bare transformer here: wrap it in its own vision model class.
    wrapped = AutoModel.from_config(config.vision_config, dtype=torch.float32)
    target = getattr(wrapped, "vision_model", wrapped)
    target.load_state_dict(tower.state_dict(), strict=True)
    return wrapped


class HFBackbone(Classifier):
    """A transformers ``AutoModel`` backbone plus a linear head on its pooled output.

    Build with :meth:`from_pretrained` (weights) or :meth:`from_config` (random init,
    or rebuilding a checkpoint). ``image_mean``/``image_std`` hold the normalisation the
    checkpoint's ``preprocessor_config.json`` asks for, when a local one was found.
    """

    arch = "hf"

    def __init__(self, backbone: nn.Module, n_classes: int, pooling: str = "auto") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        config = backbone.config
        self.options = {"config": _json_config(config), "pooling": pooling}
        self.image_mean: list[float] | None = None
        self.image_std: list[float] | None = None
        # One dummy forward gives the true width whatever the pooling (configs disagree
        # on where it lives: hidden_size, hidden_sizes[-1], hidden_dim...).
        self.head = nn.Linear(self._probe_feature_dim(), n_classes)
        self.cam_layer_name = self._find_cam_layer()

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | Any, n_classes: int, pooling: str = "auto"
    ) -> HFBackbone:
        """Randomly initialised backbone from a transformers config (object or dict)."""
        from transformers import AutoConfig, AutoModel

        if isinstance(config, Mapping):
            values = dict(config)
            model_type = values.pop("model_type", None)
            if not model_type:
                raise ConfigError("an hf model config needs a 'model_type' field (e.g. 'vit')")
            try:
                config = AutoConfig.for_model(model_type, **values)
            except (ValueError, KeyError) as err:
                raise ConfigError(
                    f"transformers does not know model_type {model_type!r} ({err}); "
                    "upgrade transformers or check the config"
                ) from err
        model = AutoModel.from_config(config, dtype=torch.float32)
        return cls(_vision_tower(model), n_classes, pooling)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], n_classes: int, pooling: str = "auto"
    ) -> HFBackbone:
        """Load ``AutoModel`` weights from a local directory or a hub id (float32).

        Raises a :class:`CheckpointError` when the directory does not exist or cannot be
        read, or the hub cannot be reached (offline): then pass a local directory.
        """
        from transformers import AutoModel

        name = str(name_or_path)
        path = Path(name).expanduser()
        is_local = path.exists()
        if is_local:
            if not path.is_dir() or not (path / "config.json").is_file():
                raise CheckpointError(
                    f"{path} is not a transformers model directory: it needs a config.json "
                    "and the weights, as written by model.save_pretrained(directory)"
                )
            name = str(path)
        elif name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
            raise CheckpointError(
                f"model directory not found: {path}. Pass an existing directory written by "
                "save_pretrained (config.json + weights) or a hub id such as 'google/vit-base-patch16-224'"
            )
        offline = hub_offline()
        try:
            model, info = AutoModel.from_pretrained(
                name,
                local_files_only=is_local or offline,
                dtype=torch.float32,
                output_loading_info=True,
            )
        except (OSError, ValueError, KeyError) as err:
            where = "local directory" if is_local else "hub id"
            advice = (
                "Check that the directory holds config.json and the weights (save_pretrained output)."
                if is_local
                else "Without network access (or with HF_HUB_OFFLINE=1"
                + (", which is set" if offline else "")
                + ") pass a local directory holding config.json and the weights, e.g. one "
                "written by model.save_pretrained(directory) on a machine with access."
            )
            raise CheckpointError(
                f"could not load transformers model from {where} {name!r}: {err}. {advice}"
            ) from err
        missing = set(info.get("missing_keys", ())) if isinstance(info, dict) else set()
        if pooling == "auto" and any("pooler" in k for k in missing):
            pooling = "cls" if model.config.model_type in CLS_TOKEN_MODEL_TYPES else "mean"
        out = cls(_vision_tower(model), n_classes, pooling)
        out.pretrained = name
        if is_local:
            out._read_preprocessor(path)
        return out

    def _read_preprocessor(self, directory: Path) -> None:
        file = directory / "preprocessor_config.json"
        if not file.is_file():
            return
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        mean, std = values.get("image_mean"), values.get("image_std")
        if isinstance(mean, list) and isinstance(std, list):
            self.image_mean = [float(v) for v in mean]
            self.image_std = [float(v) for v in std]

    # ---------------------------------------------------------------- internals
    def _probe_feature_dim(self) -> int:
        """Run one dummy image through the backbone to read the feature width."""
        config = self.backbone.config
        size = getattr(config, "image_size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        channels = int(getattr(config, "num_channels", 3))
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            dim = self._pool(
                self.backbone(pixel_values=torch.zeros(1, channels, size, size))
            ).shape[1]
        self.backbone.train(was_training)
        return int(dim)

    def _find_cam_layer(self) -> str:
        for dotted in _CAM_PATHS:
            try:
                blocks = self.backbone.get_submodule(dotted)
            except AttributeError:
                continue
            if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
                return f"backbone.{dotted}.{len(blocks) - 1}"
        return ""

    def _pool(self, out: Any) -> torch.Tensor:
        pooled = getattr(out, "pooler_output", None)
        hidden = getattr(out, "last_hidden_state", None)
        if isinstance(out, tuple):
            hidden = out[0]
            pooled = out[1] if len(out) > 1 else None
        mode = self.pooling
        if mode == "auto":
            mode = "pooler" if pooled is not None else "mean"
        if mode == "pooler":
            if pooled is None:
                raise ConfigError(
                    f"{type(self.backbone).__name__} has no pooler output; use pooling='mean' or 'cls'"
                )
            return torch.flatten(pooled, 1)
        if hidden is None:
            raise ConfigError(f"{type(self.backbone).__name__} returns no last_hidden_state")
        if mode == "cls":
            if hidden.dim() != 3:
                raise ConfigError(
                    f"pooling='cls' needs token outputs (B, T, D); {type(self.backbone).__name__} "
                    f"returns {tuple(hidden.shape)}: use 'mean' or 'pooler'"
                )
            return hidden[:, 0]
        if hidden.dim() == 4:  # convolutional feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        return hidden.mean(dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone output, shape ``(B, feature_dim)``."""
        return self._pool(self.backbone(pixel_values=x))
