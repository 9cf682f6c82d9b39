"""Generators shipped inside the package, named like shipped backbones: ``unspur:<name>``.

A shipped generator is a finished domain-model directory (:mod:`unspur.generate.domain`:
``text2image/`` and ``inpaint/`` diffusers pipelines, ``domain.json``) under
``unspur/generate/weights/<name>/``, with ``card.json`` beside them: its recipe, the
data draw it was trained on, the labels it saw, cost, versions and the SHA-256 of every
file. Method options that take a generator (DBB, FFR, Clustered DreamBooth:
``generator: unspur:synthetic-domain``) resolve the name here, in
:mod:`unspur.generate.engine`, to that directory and then treat it like any trained
domain-model directory, so nothing is downloaded and no data directory is needed.
Regenerate with ``python -m unspur.pretrain.synthetic_domain``.

The ``unspur:`` prefix is the one :mod:`unspur.models.shipped` uses for backbones; the
two name spaces are separate folders (a generator name is looked up here only).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from unspur.errors import CheckpointError, ConfigError
from unspur.models.shipped import PREFIX, is_shipped_name

WEIGHTS_DIR = "weights"
CARD_FILE = "card.json"

__all__ = [
    "PREFIX",
    "is_shipped_name",
    "shipped_generator_card",
    "shipped_generator_dir",
    "shipped_generator_names",
    "verify_shipped_generator",
]


def _weights_dir() -> Path | None:
    """The package folder of the shipped generators, as a real path (None if absent).

    Wheels and editable installs unpack package data onto the file system; a zipped
    install has no real folder, and diffusers needs one, so it counts as absent.
    """
    folder = resources.files("unspur.generate").joinpath(WEIGHTS_DIR)
    if not isinstance(folder, Path) or not folder.is_dir():
        return None
    return folder


def shipped_generator_names() -> list[str]:
    """The shipped generators, as ``unspur:<name>`` strings, sorted."""
    folder = _weights_dir()
    if folder is None:
        return []
    return sorted(PREFIX + p.name for p in folder.iterdir() if (p / CARD_FILE).is_file())


def shipped_generator_dir(spec: str) -> Path:
    """The domain-model directory of the shipped generator ``spec`` (``unspur:<name>``);
    an unknown name raises a :class:`ConfigError` listing the shipped ones."""
    name = spec.strip()[len(PREFIX) :].strip()
    known = shipped_generator_names()
    if PREFIX + name not in known:
        listed = ", ".join(known) if known else "none (this install has no generator weights)"
        raise ConfigError(
            f"generator {spec!r} is not a generator shipped with unspur; shipped generators: "
            f"{listed}. Use one of those, 'domain' (train one on the run's images), a "
            "domain-model directory, or a diffusers pipeline (hub id or directory)"
        )
    return _weights_dir() / name  # type: ignore[operator]


def shipped_generator_card(spec: str) -> dict[str, Any]:
    """The card (provenance record) of a shipped generator, parsed."""
    path = shipped_generator_dir(spec) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"the card of {spec} is unreadable ({err}); reinstall unspur"
        ) from err
    if not isinstance(card, dict):
        raise CheckpointError(f"the card of {spec} is not a JSON object; reinstall unspur")
    return card


def verify_shipped_generator(spec: str) -> Path:
    """The directory of ``spec`` after checking every file against its card's SHA-256
    (a damaged or partial install is reported instead of loading wrong weights)."""
    folder = shipped_generator_dir(spec)
    card = shipped_generator_card(spec)
    for relative, expected in card.get("files", {}).items():
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(
                f"{spec}: {relative} is missing from the installed package; reinstall unspur"
            )
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise CheckpointError(
                f"{spec}: {relative} does not match the SHA-256 on its card; the installed "
                "file is damaged, reinstall unspur"
            )
    return folder
