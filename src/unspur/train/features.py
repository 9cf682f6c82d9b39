"""Feature caching for last-layer work: run the frozen backbone once, train heads on tensors.

DFR, last-layer retraining (LLR_all / LLR_b), MaC's last-layer stage and Clustered
DreamBooth's stage 2 all train only the linear head on top of a frozen backbone. The
backbone's output for an image does not change while the head trains, so it is computed
ONCE per (model weights, dataset, transform), in eval mode (batch-norm running
statistics, no dropout) with the dataset's deterministic (eval) transform, and the head
is trained on the cached tensors through the one training loop. A last-layer method
never runs the backbone per epoch.

- :func:`extract_features` returns a :class:`FeatureSet`; with ``cache_dir`` it is also
  stored as ``features-<key>.safetensors`` (written atomically), where ``key`` hashes
  the backbone weights, the dataset (filenames, labels, a few images' pixels, the
  store) and the transform, so changing any of them computes the features anew.
- :class:`FeatureDataset` yields ``(feature, y, g, index)`` and has ``.table`` and
  ``group_counts()``, so :func:`unspur.train.loop.fit` and
  :func:`unspur.evaluate.predict.evaluate_split` work on it unchanged.
- :class:`~unspur.models.linear_head.LinearHead` is a :class:`~unspur.models.base.Classifier` whose backbone is
  the identity and whose ``head`` *is* a given ``nn.Linear`` (shared, not copied): the
  loop trains and checkpoints it like any model, and the classifier it came from sees
  the new weights without any copying back.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from unspur.data.dataset import DECODE_CACHE_MB, GroupDataset, GroupItems
from unspur.data.table import GroupTable
from unspur.errors import CheckpointError, UnspurError
from unspur.models.base import Classifier

logger = logging.getLogger(__name__)

#: Bump when the way features are computed changes, so old caches are not reused.
FEATURE_CACHE_VERSION = 1


# ----------------------------------------------------------------------- datasets
@dataclass
class FeatureSet:
    """Backbone features of every item of a dataset, in dataset order.

    ``features`` is ``(N, D)`` float32 on the CPU; ``y``, ``g``, ``a`` are ``(N,)``
    long tensors; ``table`` is the dataset's table (group names, counts); ``key`` is the
    cache key the features were computed under.
    """

    features: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    a: torch.Tensor
    table: GroupTable
    key: str = ""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def dataset(self) -> FeatureDataset:
        """This set as a torch ``Dataset`` for the training loop."""
        return FeatureDataset(self)

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(features, y, g)`` as numpy arrays (for scikit-learn)."""
        return self.features.numpy(), self.y.numpy(), self.g.numpy()


class FeatureDataset(GroupItems, Dataset):
    """Cached features as a dataset: items ``(feature, y, g, index)``.

    ``index`` is the position in this dataset (what the training loop and ``predict``
    expect). ``table`` has one row per item, so :func:`evaluate_split` can name groups,
    and :meth:`subset` keeps the two aligned.
    """

    def __init__(self, features: FeatureSet) -> None:
        self.set = features
        self.features = features.features
        self.y = features.y
        self.g = features.g
        self.a = features.a
        self.table = features.table
        if not (len(self.features) == len(self.y) == len(self.g) == len(self.table.frame)):
            raise UnspurError("FeatureDataset: features, labels and table differ in length")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        return self.features[index], int(self.y[index]), int(self.g[index]), index

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, positions: Sequence[int] | np.ndarray) -> FeatureDataset:
        """Items at ``positions`` (distinct), re-indexed from 0, with their table rows."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(np.unique(positions)) != len(positions):
            raise UnspurError(
                "FeatureDataset.subset needs distinct positions (a table lists each image "
                "once); repeat items through sample_weights instead"
            )
        index = torch.as_tensor(positions)
        return FeatureDataset(
            FeatureSet(
                self.features[index],
                self.y[index],
                self.g[index],
                self.a[index],
                self.table.subset(positions),
                self.set.key,
            )
        )


# --------------------------------------------------------------------- the probe


# ------------------------------------------------------------------- cache keys
def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the backbone's state (parameters and buffers; the head is excluded,
    since retraining it does not change the features)."""
    head_prefix = ""
    if isinstance(model, Classifier):
        head_prefix = type(model).head_name + "."
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if head_prefix and name.startswith(head_prefix):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def describe(obj: Any, depth: int = 0) -> Any:
    """A stable, process-independent description of a transform (for cache keys).

    ``repr`` is used when the class defines one; otherwise the class name and its
    attributes, recursively (the default ``repr`` holds a memory address).
    """
    if depth > 6:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj.detach().cpu().reshape(-1).tolist()[:64], "shape": list(obj.shape)}
    if isinstance(obj, np.ndarray):
        return {"array": obj.reshape(-1).tolist()[:64], "shape": list(obj.shape)}
    if isinstance(obj, list | tuple):
        return [describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1) for k, v in sorted(obj.items(), key=str)}
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if type(obj).__repr__ is not object.__repr__ and not hasattr(obj, "__dict__"):
        return repr(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if hasattr(obj, "__dict__"):
        return {"class": name, **{k: describe(v, depth + 1) for k, v in sorted(vars(obj).items())}}
    if callable(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', name)}"
    return name


def dataset_fingerprint(dataset: Any) -> dict[str, Any]:
    """Filenames, labels, store location and a few images' pixels of a dataset."""
    table: GroupTable = dataset.table
    frame = table.frame
    names = hashlib.sha256("\n".join(map(str, frame["filename"])).encode()).hexdigest()
    labels = hashlib.sha256(
        np.ascontiguousarray(frame[["y", "a"]].to_numpy(dtype=np.int64)).tobytes()
    ).hexdigest()
    store = table.store
    pixels = hashlib.sha256()
    n = len(frame)
    for i in sorted({0, n // 2, n - 1}) if n else []:
        image = dataset.raw(i) if hasattr(dataset, "raw") else None
        if image is not None:
            pixels.update(f"{image.size}{image.mode}".encode())
            pixels.update(image.tobytes())
    return {
        "table": table.name,
        "n": n,
        "filenames": names,
        "labels": labels,
        "store": f"{type(store).__qualname__}:{getattr(store, 'root', '')}",
        "pixels": pixels.hexdigest(),
    }


def feature_cache_key(model: nn.Module, dataset: Any) -> str:
    """Hash of the backbone weights, the dataset and its transform."""
    parts = {
        "version": FEATURE_CACHE_VERSION,
        "model": type(model).__qualname__,
        "weights": weights_hash(model),
        "data": dataset_fingerprint(dataset),
        "transform": describe(getattr(dataset, "transform", None)),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -------------------------------------------------------------------- extraction
def with_transform(dataset: GroupDataset, transform: Callable) -> GroupDataset:
    """The same rows read through another transform (the eval transform for features),
    with the same decoded-image budget."""
    return GroupDataset(dataset.table, transform, getattr(dataset, "cache_mb", DECODE_CACHE_MB))


@torch.no_grad()
def _compute(model: nn.Module, dataset: Any, batch_size: int, num_workers: int) -> torch.Tensor:
    if not hasattr(model, "features"):
        raise UnspurError(
            f"{type(model).__name__} has no features(x) method; last-layer methods need a "
            "unspur Classifier (backbone + linear head)"
        )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    try:
        for x, _y, _g, index in loader:
            parts.append(model.features(x.to(device)).float().cpu())
            positions.append(torch.as_tensor(index))
    finally:
        model.train(was_training)
    if not parts:
        raise UnspurError("cannot extract features from an empty dataset")
    features = torch.cat(parts)
    order = torch.argsort(torch.cat(positions), stable=True)
    return features[order].contiguous()


def extract_features(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> FeatureSet:
    """Backbone features of every item of ``dataset``, computed once in eval mode.

    ``dataset`` is read with its own transform: pass a dataset with the deterministic
    eval transform (see :func:`with_transform`); features of an augmenting dataset
    would freeze one random crop. With ``cache_dir`` the result is stored under a key
    hashing the backbone weights, the dataset and the transform, and read back on the
    next call with the same three (the model is not run then).
    """
    key = feature_cache_key(model, dataset)
    path = Path(cache_dir) / f"features-{key[:24]}.safetensors" if cache_dir is not None else None
    table = dataset.table
    y = torch.as_tensor(np.asarray(dataset.y), dtype=torch.long)
    g = torch.as_tensor(np.asarray(dataset.g), dtype=torch.long)
    a = torch.as_tensor(np.asarray(dataset.a), dtype=torch.long)
    if path is not None and path.is_file():
        cached = _read_cache(path, key, len(y))
        if cached is not None:
            logger.info("feature cache hit: %s", path)
            return FeatureSet(cached, y, g, a, table, key)
    features = _compute(model, dataset, batch_size, num_workers)
    if path is not None:
        from unspur.models.checkpoint import save_state

        save_state(path, {"features": features}, {"key": key, "n": str(len(y))})
    return FeatureSet(features, y, g, a, table, key)


def _read_cache(path: Path, key: str, n: int) -> torch.Tensor | None:
    from safetensors import safe_open

    from unspur.models.checkpoint import load_state

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("key") != key:
            return None
        features = load_state(path)["features"]
    except (CheckpointError, OSError, KeyError, RuntimeError, ValueError) as err:
        logger.warning("ignoring unreadable feature cache %s (%s)", path, err)
        return None
    if features.ndim != 2 or features.shape[0] != n:
        return None
    return features
