"""Backbones shipped inside the package, loaded by name: ``model.pretrained: unspur:<name>``.

Each shipped backbone is a pair under ``unspur/models/weights/``: ``<name>.safetensors``
(the state dict, torchvision key layout) and ``<name>.json`` (its card: recipe command,
data checksum, test accuracy, cost, build options). A ``unspur:<name>`` source resolves
to that file and then loads exactly like a user's ImageNet file
(:func:`unspur.models.checkpoint.load_backbone_weights`), so nothing here is downloaded
and no data directory is needed. Regenerate them with ``unspur pretrain <name>``.

This module imports nothing from the rest of :mod:`unspur.models`, so the checkpoint
reader can use it without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from unspur.errors import CheckpointError

PREFIX = "unspur:"
WEIGHTS_DIR = "weights"


def _weights_dir() -> Any:
    """The package folder holding the shipped files (a Traversable)."""
    return resources.files("unspur.models").joinpath(WEIGHTS_DIR)


def is_shipped_name(source: object) -> bool:
    """Whether ``source`` names a shipped backbone (``unspur:<name>``), not a file path."""
    return isinstance(source, str) and source.strip().lower().startswith(PREFIX)


def shipped_names() -> list[str]:
    """The shipped backbones, as ``unspur:<name>`` strings, sorted."""
    folder = _weights_dir()
    if not folder.is_dir():
        return []
    return sorted(
        PREFIX + entry.name[: -len(".json")]
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    )


def _bare_name(source: str) -> str:
    name = source.strip()[len(PREFIX) :].strip()
    known = shipped_names()
    if PREFIX + name not in known:
        listed = ", ".join(known) if known else "none (this install has no weights folder)"
        raise CheckpointError(
            f"unknown shipped backbone {source!r} in model.pretrained; shipped: {listed}. "
            "Use one of those names, or a local weights file path (.pth / .safetensors)"
        )
    return name


def shipped_card(source: str) -> dict[str, Any]:
    """The card (``<name>.json``) of a shipped backbone, parsed."""
    name = _bare_name(source)
    entry = _weights_dir().joinpath(f"{name}.json")
    try:
        card = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"the card of {PREFIX}{name} is unreadable ({err}); reinstall unspur"
        ) from err
    if not isinstance(card, dict):
        raise CheckpointError(f"the card of {PREFIX}{name} is not a JSON object; reinstall unspur")
    return card


@contextmanager
def shipped_weights(source: str) -> Iterator[Path]:
    """A real path to the weights of ``source`` while the context is open.

    The file's SHA-256 is checked against its card, so a damaged install is reported
    instead of loading wrong weights.
    """
    card = shipped_card(source)
    name = _bare_name(source)
    entry = _weights_dir().joinpath(str(card.get("weights", f"{name}.safetensors")))
    with resources.as_file(entry) as path:
        if not path.is_file():
            raise CheckpointError(
                f"{PREFIX}{name}: its weights file {entry.name} is missing from the "
                "installed package; reinstall unspur"
            )
        expected = card.get("weights_sha256")
        if expected:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != expected:
                raise CheckpointError(
                    f"{PREFIX}{name}: {entry.name} does not match the SHA-256 on its card; "
                    "the installed file is damaged, reinstall unspur"
                )
        yield path


def not_for_reason(source: str, dataset: str) -> str | None:
    """Why the shipped backbone ``source`` must not be used on ``dataset``, or None.

    A card's ``not_for`` entries read ``"<dataset name>: <reason>"``; e.g. the CIFAR-10
    backbone has seen the labels of Corrupted CIFAR-10's images, so fine-tuning it there
    would leak the benchmark's training labels into a "pretrained" start.
    """
    for entry in shipped_card(source).get("not_for") or []:
        name, _, reason = str(entry).partition(":")
        if name.strip().lower() == dataset.strip().lower():
            return reason.strip() or "its card lists this dataset under not_for"
    return None


def shipped_hint(source: str) -> str:
    """What a model must be built as to take the shipped backbone (for mismatch errors)."""
    try:
        card = shipped_card(source)
    except CheckpointError:
        return ""
    options = json.dumps(card.get("options", {}))
    return (
        f"{source} is a {card.get('arch')} built with options {options}: set "
        f"model.arch: {card.get('arch')} and model.options: {options}"
    )
