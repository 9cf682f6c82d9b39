"""Restore a saved classifier: rebuild the architecture its ``model.json`` names, then
load its weights strictly.

This sits above both :mod:`unspur.models.checkpoint` (file formats, weights loading) and
:mod:`unspur.models.factory` (architectures by name): the factory's ResNet builder loads
backbone weights through the checkpoint module, so restoring a checkpoint, which needs the
factory, cannot live in the checkpoint module without an import circle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from unspur.errors import CheckpointError, ConfigError
from unspur.models.base import Classifier
from unspur.models.checkpoint import META_FILE, load_weights, read_checkpoint_meta
from unspur.models.factory import build_model


def load_checkpoint(
    directory: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    verify: bool = True,
) -> Classifier:
    """Rebuild the model described by ``directory/model.json`` and load its weights strictly.

    Any missing, unexpected or misshapen key raises a :class:`CheckpointError` naming
    the keys and the file. With ``verify`` the weights' SHA-256 must match the one
    recorded at save time (catches a ``model.safetensors`` from another run). The
    model is returned in eval mode on ``device``.
    """
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    try:
        model = build_model(meta["arch"], int(meta["n_classes"]), **dict(meta["options"]))
    except ConfigError as err:
        raise CheckpointError(
            f"cannot rebuild the model of {directory / META_FILE}: {err}"
        ) from err
    load_weights(model, directory, verify)
    model.pretrained = meta.get("pretrained")
    return model.to(device).eval()
