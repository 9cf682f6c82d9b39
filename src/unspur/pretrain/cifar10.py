"""Supervised CIFAR-10 pretraining of a narrow torchvision-layout ResNet (the shipped backbone).

Why CIFAR-10: it is the only general-purpose labelled image set available offline, and it
is disjoint from the benchmarks unspur ships (the synthetic shapes, Colored MNIST,
UTKFace, Waterbirds, CelebA, SpuCo). One exception: Corrupted CIFAR-10 (LfF) is built
from these same training images with the CIFAR-10 class as its target, so a backbone
trained here must not be used on it (the card says so).

Why supervised: the issue allows self-supervised pretraining only if it transfers better;
within the 30 CPU-minute budget a contrastive method gets a few epochs at most, and we
did not measure it (our choice, recorded in bench/results/pretrained_backbone.md).

The recipe (all our choices, sized to about 30 CPU-minutes on one core; measured on a
shared 2-core machine, where one thread per process used 3-4x less CPU time per image
than two because OpenMP threads spin while waiting for a busy core):

- ResNet-18 with torchvision's keys, CIFAR stem (``small_images``: 3x3 conv1, no
  max-pool) for 32 px inputs, ``width`` 16 (stages 16/32/64/128 channels, 0.7 M
  parameters, about 1.4 MB in fp16).
- Inputs as unspur's classifier transforms give them: RGB in [0, 1], ImageNet mean/std
  normalisation (``data.normalize: true``), 32 px.
- Augmentation: random crop with 4 px zero padding and horizontal flip (the standard
  CIFAR augmentation of He et al., 2016, Sec. 4.2).
- SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 128, label smoothing 0.1; the
  learning rate rises linearly from 0.1 x peak to the peak (0.1) over the first 15% of
  steps and falls linearly to zero (a one-cycle schedule, for short budgets).
- channels-last memory layout (measured 1.4x faster on CPU than contiguous).

The weights are written in fp16 when that changes the test accuracy by at most
``fp16_tolerance`` (both accuracies are on the card), else in fp32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from unspur.data.readers.corrupted_cifar10 import load_cifar10
from unspur.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from unspur.errors import ConfigError, DataError
from unspur.models.checkpoint import save_state
from unspur.models.factory import build_model
from unspur.models.resnet import ResNet
from unspur.pretrain.provenance import cpu_seconds, git_commit

CARD_FORMAT = "unspur.pretrained-card"


@dataclass(frozen=True)
class CifarRecipe:
    """Settings of one CIFAR-10 pretraining recipe (see the module docstring for why)."""

    name: str
    arch: str = "resnet18"
    options: dict[str, Any] = field(default_factory=lambda: {"small_images": True, "width": 16})
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.15
    crop_padding: int = 4
    seed: int = 0
    threads: int = 1
    fp16_tolerance: float = 0.002  # test accuracy the fp16 rounding may cost (our choice)


#: Recipes by shipped name (``unspur pretrain NAME``).
RECIPES: dict[str, CifarRecipe] = {"cifar10-resnet18": CifarRecipe("cifar10-resnet18")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cifar10_root(data_dir: str | os.PathLike[str]) -> Path:
    """The CIFAR-10 folder or archive under ``data_dir`` (``data_dir/cifar10`` if present)."""
    base = Path(data_dir).expanduser()
    if not base.exists():
        raise DataError(
            f"--data-dir {base} does not exist; pass the folder holding cifar10/ "
            "(e.g. ../shared/data) or the CIFAR-10 folder/archive itself"
        )
    return base / "cifar10" if (base / "cifar10").is_dir() else base


def data_checksums(root: Path, layout: str) -> dict[str, str]:
    """SHA-256 of the CIFAR-10 files read: the archive, or every file under the folders.

    Keys are paths relative to ``root`` (no machine paths on the card).
    """
    if layout.startswith("archive "):
        archive = Path(layout[len("archive ") :])
        return {archive.name: _sha256(archive)}
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): _sha256(p) for p in files}


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> float (B, 3, 32, 32), ImageNet mean/std, channels-last."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random ``h x w`` crop of the ``padding``-padded batch and a horizontal flip, per image.

    The padding is zero after normalisation, i.e. the ImageNet mean colour (torchvision's
    ``RandomCrop(padding=4)`` pads black before normalising; our choice, as it keeps the
    padded border neutral).
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).tolist()
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).tolist()
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    out[flip] = out[flip].flip(3)
    return out.contiguous(memory_format=torch.channels_last)


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """One-cycle factor: 0.1 -> 1 linearly over the warm-up, then linearly to 0."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 images, in batches of 500."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), 500):
        x = _normalise(images[start : start + 500])
        correct += int((model(x).argmax(1) == labels[start : start + 500]).sum())
    return correct / max(1, len(labels))


#: The code a recipe's weights depend on (for the card's "+local-changes" flag).
_RECIPE_CODE = ("src/unspur/pretrain/cifar10.py", "src/unspur/models", "src/unspur/data")


def train_cifar10_backbone(
    data_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    name: str = "cifar10-resnet18",
    epochs: int | None = None,
    limit: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    command: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train recipe ``name`` on CIFAR-10 under ``data_dir``; write ``out/NAME.safetensors``
    and its card ``out/NAME.json``; return the card.

    ``limit`` reads only the first ``limit`` images per class of each split (tests and
    smoke runs; the card records it). ``epochs``, ``threads`` and ``seed`` override the
    recipe. ``command`` is recorded on the card as the command that made the weights.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown pretraining recipe {name!r}; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    overrides = {"epochs": epochs, "threads": threads, "seed": seed}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if recipe.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {recipe.epochs}")
    if recipe.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {recipe.threads}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1 image per class, got {limit}")
    out = Path(out)
    wall0, cpu0, load0 = time.perf_counter(), cpu_seconds(), os.getloadavg()
    commit = git_commit(_RECIPE_CODE)  # the code that runs, before anything can change it
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)

    root = cifar10_root(data_dir)
    parts, classes, layout = load_cifar10(root, limit)
    checksums = data_checksums(root, layout)
    train_x = torch.from_numpy(parts["train"][0])
    train_y = torch.from_numpy(parts["train"][1]).long()
    test_x = torch.from_numpy(parts["test"][0])
    test_y = torch.from_numpy(parts["test"][1]).long()
    log(
        f"CIFAR-10 from {layout.split(' ')[0]}: {len(train_y)} train, {len(test_y)} test images "
        f"({time.perf_counter() - wall0:.0f} s to read)"
    )

    model = build_model(recipe.arch, len(classes), **recipe.options)
    assert isinstance(model, ResNet)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=True,
    )
    steps_per_epoch = math.ceil(len(train_y) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(recipe.seed)
    step = 0
    history = []
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        seen = correct = 0
        loss_sum = 0.0
        for start in range(0, len(order), recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            x = augment(_normalise(train_x[index]), recipe.crop_padding, generator)
            y = train_y[index]
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * lr_factor(step, total, recipe.warmup_fraction)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 4),
            "train_accuracy": round(correct / seen, 4),
            "wall_seconds": round(time.perf_counter() - wall0, 1),
            "cpu_seconds": round(cpu_seconds() - cpu0, 1),
        }
        history.append(row)
        log(
            f"epoch {row['epoch']}/{recipe.epochs}: loss {row['train_loss']:.3f}, train acc "
            f"{row['train_accuracy']:.3f}, {row['wall_seconds']:.0f} s wall, "
            f"{row['cpu_seconds']:.0f} s CPU"
        )

    model = model.to(memory_format=torch.contiguous_format)
    acc32 = accuracy(model, test_x, test_y)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    acc16 = accuracy(model, test_x, test_y)
    use_half = acc32 - acc16 <= recipe.fp16_tolerance
    wall, cpu, load1 = time.perf_counter() - wall0, cpu_seconds() - cpu0, os.getloadavg()
    log(f"test accuracy {acc32:.4f} (fp32), {acc16:.4f} (fp16 weights)")

    weights_name = f"{name}.safetensors"
    weights = save_state(
        out / weights_name, half if use_half else state, {"format": CARD_FORMAT, "name": name}
    )
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "name": name,
        "load_as": f"unspur:{name}",
        "arch": recipe.arch,
        "options": dict(recipe.options),
        "n_classes": len(classes),
        "classes": list(classes),
        "weights": weights_name,
        "weights_sha256": _sha256(weights),
        "dtype": "float16" if use_half else "float32",
        "input": {
            "size": 32,
            "channels": "RGB",
            "normalize": "ImageNet mean/std (unspur data.normalize: true)",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "recipe": {
            "command": " ".join(command) if command else f"unspur pretrain {name}",
            **{k: v for k, v in asdict(recipe).items() if k != "name"},
        },
        "data": {
            "dataset": "CIFAR-10",
            "layout": layout.split(" ")[0],
            "sha256": checksums,
            "n_train": len(train_y),
            "n_test": len(test_y),
            "limit_per_class": limit,
        },
        "results": {
            "test_accuracy": round(acc16 if use_half else acc32, 4),
            "test_accuracy_fp32": round(acc32, 4),
            "test_accuracy_fp16": round(acc16, 4),
            "history": history,
        },
        "cost": {
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "threads": recipe.threads,
            "cpu_count": os.cpu_count(),
            "load_average_start": [round(v, 2) for v in load0],
            "load_average_end": [round(v, 2) for v in load1],
            "machine": platform.machine(),
            "python": sys.version.split()[0],
        },
        "torch_version": torch.__version__,
        "git_commit": commit,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_for": [
            "corrupted_cifar10: it is built from these CIFAR-10 training images with the "
            "CIFAR-10 class as target, so this backbone has seen its labels"
        ],
        "terms": "CIFAR-10 (Krizhevsky, 2009); no UTKFace or other restricted data used",
    }
    text = json.dumps(card, indent=2) + "\n"
    (out / f"{name}.json").write_text(text, encoding="utf-8")
    log(f"wrote {weights} and {out / (name + '.json')}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    return card
