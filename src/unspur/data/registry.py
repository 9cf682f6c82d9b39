"""Readers found by name: ``load_dataset("waterbirds", root, target="...")``.

A reader is a function ``(root, **options) -> GroupTable`` registered with
:func:`reader`. Its keyword arguments are its options; the CLI and configs pass them as
strings or YAML values and :func:`load_dataset` checks the names and converts the types
from the function's annotations, so a typo fails with the list of valid options.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unspur.data.table import GroupTable
from unspur.errors import ConfigError, did_you_mean

Reader = Callable[..., GroupTable]
READERS: dict[str, Reader] = {}


def reader(name: str) -> Callable[[Reader], Reader]:
    def register(function: Reader) -> Reader:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = function
        return function

    return register


def reader_options(name: str) -> dict[str, inspect.Parameter]:
    """The options a reader takes (every parameter after ``root``)."""
    parameters = list(inspect.signature(get_reader(name)).parameters.values())
    return {p.name: p for p in parameters[1:] if p.kind is not p.VAR_KEYWORD}


def get_reader(name: str) -> Reader:
    _import_builtin_readers()
    if name not in READERS:
        raise ConfigError(
            f"unknown dataset {name!r}{did_you_mean(name, READERS)}; "
            f"available: {', '.join(sorted(READERS))}"
        )
    return READERS[name]


def available_datasets() -> list[str]:
    _import_builtin_readers()
    return sorted(READERS)


def _convert(value: Any, annotation: Any, key: str, dataset: str) -> Any:
    """Convert CLI strings to the annotated type; YAML values pass through when they fit."""
    if not isinstance(value, str):
        return value
    hints = [annotation] + list(typing.get_args(annotation))
    text = value.strip()
    if text.lower() in ("none", "null") and type(None) in hints:
        return None
    try:
        for hint in hints:
            if hint is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true or false")
            if hint is int:
                return int(text)
            if hint is float:
                return float(text)
            if typing.get_origin(hint) in (list, tuple):
                return [t.strip() for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ConfigError(f"dataset {dataset!r}: option {key}={value!r}: {exc}") from exc
    return text


def load_dataset(name: str, root: str | Path | None = None, **options: Any) -> GroupTable:
    """Read dataset ``name`` from ``root`` with reader ``options``; nothing is downloaded."""
    function = get_reader(name)
    accepted = reader_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"dataset {name!r} has no option(s) {unknown}"
            f"{did_you_mean(unknown[0], accepted, 'data.options.')}; its options are: "
            f"{', '.join(accepted) or '(none)'}"
        )
    hints = typing.get_type_hints(function)
    converted = {k: _convert(v, hints.get(k, str), k, name) for k, v in options.items()}
    return function(Path(root) if root is not None else None, **converted)


def _import_builtin_readers() -> None:
    # Importing the modules registers their readers.
    from unspur.data import readers  # noqa: F401
