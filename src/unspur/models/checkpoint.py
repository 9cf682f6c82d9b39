"""Safe, atomic, strict weight IO: safetensors files and checkpoint directories.

A checkpoint directory holds ``model.safetensors`` (the state dict) and ``model.json``
(architecture, class count and build options, so :func:`load_checkpoint` rebuilds the
model without the code that made it, plus the run config and any extra metadata). Files
are written to a temporary name in the same directory and moved into place with
``os.replace``, so a crash never leaves a half-written checkpoint under the real name.
Nothing here unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``
for ``.pth`` files from elsewhere (torchvision ImageNet weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from unspur.errors import CheckpointError
from unspur.io import atomic_write_with
from unspur.models.base import Classifier
from unspur.models.shipped import is_shipped_name, shipped_hint, shipped_weights

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
CHECKPOINT_FORMAT = "unspur.checkpoint"
CHECKPOINT_VERSION = 1

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors requires it)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"cannot save {key!r}: it is a {type(value).__name__}, not a tensor"
            )
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_state(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a dict of tensors to a ``.safetensors`` file atomically; return the path.

    Use it for any tensor artefact of a run (cached features, masks, a head's weights).
    ``metadata`` is a flat str -> str mapping stored in the file header.
    """
    path = Path(path)
    plain = _plain_tensors(tensors)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    atomic_write_with(path, lambda tmp: save_file(plain, str(tmp), metadata=meta or None))
    return path


def load_state(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file written by :func:`save_state` (or anyone) to a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tensor file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or "
            "of another format - re-create it with save_state/save_checkpoint"
        ) from err


# ------------------------------------------------------------ foreign state dicts
def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file.

    ``.pth`` files are read with ``torch.load(weights_only=True)``: tensors only, no
    arbitrary code. A dict wrapping the state dict under ``state_dict``/``model`` is
    unwrapped and a DataParallel ``module.`` prefix is stripped. A directory holding a
    ``model.safetensors`` (an unspur checkpoint) is accepted too, and so is the name of
    a backbone shipped with unspur, ``unspur:<name>`` (see :mod:`unspur.models.shipped`).
    """
    if is_shipped_name(path):
        with shipped_weights(str(path)) as shipped:
            return read_state_dict(shipped)
    path = Path(path).expanduser()
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"weights file not found: {path}. Pass a local state-dict file (.pth, .pt or "
            ".safetensors) or an unspur checkpoint directory; nothing is downloaded."
        )
    if path.suffix == ".safetensors":
        state: Any = load_state(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path} holds Python objects that cannot be loaded safely "
                f"(torch.load weights_only=True refused it: {err}). Save the state dict "
                "instead (torch.save(model.state_dict(), path)) or convert it to safetensors."
            ) from err
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            raise CheckpointError(
                f"{path} is not a readable PyTorch weights file ({err}); it may be "
                "truncated or of another format"
            ) from err
    for _ in range(2):
        if isinstance(state, Mapping):
            wrapped = [k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)]
            if wrapped and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[wrapped[0]]
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict (a mapping of "
            "parameter names to tensors)"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a plain state dict: entries {bad[:5]} are not tensors"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _describe_keys(keys: set[str] | list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike[str],
    ignore_missing: Callable[[str], bool] | None = None,
    hint: str = "",
) -> None:
    """Raise a :class:`CheckpointError` naming every missing, unexpected or misshapen key.

    ``ignore_missing(key)`` may excuse missing keys (e.g. ``num_batches_tracked``, absent
    from older torchvision files). ``hint`` is appended to the message.
    """
    expected = model.state_dict()
    missing = {k for k in expected if k not in state}
    if ignore_missing is not None:
        missing = {k for k in missing if not ignore_missing(k)}
    unexpected = {k for k in state if k not in expected}
    misshapen = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or misshapen):
        return
    parts = [f"{source} does not match the {type(model).__name__} model"]
    if missing:
        parts.append(f"missing keys: {_describe_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
    if misshapen:
        parts.append(f"shape mismatch: {_describe_keys(misshapen, limit=5)}")
    message = "; ".join(parts)
    if hint:
        message += f". {hint}"
    raise CheckpointError(message)


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_backbone_weights` did."""

    path: str
    n_tensors: int
    head_loaded: bool
    message: str


def load_backbone_weights(
    model: Classifier, path: str | os.PathLike[str], hint: str = ""
) -> WeightsReport:
    """Load pretrained weights into ``model``: the backbone strictly, the head if it fits.

    Every backbone key must be present with the right shape and no unknown key may be
    in the file, else a :class:`CheckpointError` names them. The file's head (e.g. the
    1000-class ImageNet ``fc``) is loaded only when its shape equals the model's head;
    otherwise the model keeps its freshly initialised head and the report says so.
    Missing ``num_batches_tracked`` counters (old torchvision files) are tolerated.
    ``path`` may name a shipped backbone, ``unspur:<name>``; a mismatch then says which
    arch and options the model needs (instead of ``hint``). fp16 files load into the
    model's fp32 parameters.
    """
    if is_shipped_name(path):
        hint = shipped_hint(str(path))
    state = read_state_dict(path)
    prefix = model.head_name + "."
    current = model.state_dict()
    head_keys = {k for k in current if k.startswith(prefix)}
    file_head = {k: v for k, v in state.items() if k.startswith(prefix)}
    backbone = {k: v for k, v in state.items() if not k.startswith(prefix)}

    head_fits = set(file_head) == head_keys and all(
        tuple(v.shape) == tuple(current[k].shape) for k, v in file_head.items()
    )
    merged = dict(backbone)
    merged.update(file_head if head_fits else {k: current[k] for k in head_keys})
    check_state_dict(model, merged, path, ignore_missing=_is_bn_counter, hint=hint)
    for key in current:
        if key not in merged:  # excused num_batches_tracked counters
            merged[key] = current[key]
    model.load_state_dict(merged, strict=True)
    model.pretrained = str(path)

    if head_fits:
        message = f"loaded {len(state)} tensors from {path}, head included"
    elif file_head:
        shapes = {k: tuple(v.shape) for k, v in file_head.items()}
        message = (
            f"loaded the backbone from {path}; its head {shapes} does not fit this "
            f"model's {model.n_classes}-class head, which stays freshly initialised"
        )
    else:
        message = f"loaded the backbone from {path}; the file has no head, which stays fresh"
    logger.info(message)
    return WeightsReport(str(path), len(state), head_fits, message)


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(
    model: Classifier,
    directory: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` to ``directory/model.safetensors`` + ``directory/model.json``.

    ``model.json`` records the model's :attr:`~Classifier.spec` (arch, n_classes,
    options) so :func:`load_checkpoint` can rebuild it, the weights' SHA-256, where
    pretrained weights came from, the run ``config`` and ``extra`` metadata (epoch,
    selection rule, metrics...). Both must be JSON-serialisable. Both files are written
    atomically, weights first. Returns the directory.
    """
    directory = Path(directory)
    spec = model.spec if isinstance(model, Classifier) else {}
    if not spec.get("arch"):
        raise CheckpointError(
            f"cannot checkpoint a {type(model).__name__}: it has no registered arch; "
            "build models with unspur.models.build_model"
        )
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **spec,
        "pretrained": model.pretrained,
        "weights": WEIGHTS_FILE,
        "config": dict(config or {}),
        "extra": dict(extra or {}),
    }
    try:  # fail before touching any file
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"cannot write {directory / META_FILE}: config/extra must be JSON-serialisable ({err})"
        ) from err
    weights = save_state(
        directory / WEIGHTS_FILE, model.state_dict(), {"format": CHECKPOINT_FORMAT}
    )
    # The hash ties model.json to these weights: a crash between the two renames leaves
    # a pair that load_checkpoint rejects instead of silently mixing two saves.
    meta["sha256"] = _sha256(weights)
    text = json.dumps(meta, indent=2)
    atomic_write_with(
        directory / META_FILE, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8")
    )
    return directory


def read_checkpoint_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed ``model.json`` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path} is missing: a checkpoint directory holds {WEIGHTS_FILE} and "
            f"{META_FILE} as written by unspur.models.save_checkpoint"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not an unspur checkpoint description")
    if int(meta.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {meta.get('version')}, newer than this "
            f"unspur understands ({CHECKPOINT_VERSION}); upgrade unspur"
        )
    for key in ("arch", "n_classes", "options"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks the {key!r} field")
    return meta


def _verified_weights(directory: Path, meta: dict[str, Any], verify: bool) -> Path:
    weights = directory / meta.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing next to {directory / META_FILE}")
    if verify and meta.get("sha256") and _sha256(weights) != meta["sha256"]:
        raise CheckpointError(
            f"{weights} does not match the SHA-256 recorded in {directory / META_FILE}: "
            "the two files come from different saves; save the checkpoint again or pass "
            "verify=False"
        )
    return weights


def load_weights(
    model: nn.Module, directory: str | os.PathLike[str], verify: bool = True
) -> nn.Module:
    """Load a checkpoint's weights into an existing ``model``, strictly, in place.

    Used to restore the selected epoch and to resume training without rebuilding the
    model (which may be wrapped or partly frozen by the caller).
    """
    directory = Path(directory)
    weights = _verified_weights(directory, read_checkpoint_meta(directory), verify)
    state = load_state(weights)
    check_state_dict(model, state, weights)
    model.load_state_dict(state, strict=True)
    return model
