"""The method registry and what every method declares.

A method is found by name, declares its supervision (which group labels it uses) and
its hyperparameters with the paper's defaults, and trains a model through the one
training loop. The supervision is recorded with every result (the papers' x / ✓ / ✓✓).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from unspur.config import RunConfig
from unspur.data.dataset import GroupDataset
from unspur.errors import ConfigError
from unspur.train.loop import FitResult


@dataclass(frozen=True)
class Supervision:
    """Which group labels a method reads: on the training set, on validation."""

    train_group_labels: bool
    val_group_labels: bool
    # True when validation labels serve model selection only, so selecting by average
    # accuracy instead removes every use of group labels.
    val_labels_only_for_selection: bool = True

    def given_selection(self, selection: str) -> Supervision:
        """The supervision actually used once the selection rule is known."""
        if self.val_labels_only_for_selection and selection != "worst_group":
            return Supervision(self.train_group_labels, False, True)
        return self

    @property
    def symbol(self) -> str:
        """The papers' notation: x none, ✓ validation only, ✓✓ train and validation."""
        if self.train_group_labels:
            return "✓✓"
        return "✓" if self.val_group_labels else "x"


@dataclass
class RunContext:
    """Everything a method needs: data, a model factory, the config and its directory."""

    config: RunConfig
    train: GroupDataset
    val: GroupDataset | None
    out_dir: Path
    build_model: Callable[[], nn.Module]
    train_group_counts: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)


class Method:
    """Subclasses set ``name``, ``supervision``, ``defaults`` and implement ``run``."""

    name: ClassVar[str]
    supervision: ClassVar[Supervision]
    defaults: ClassVar[dict[str, Any]] = {}
    summary: ClassVar[str] = ""

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        raise NotImplementedError

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            raise ConfigError(
                f"method {cls.name!r} has no option(s) {unknown}; its options are: "
                f"{', '.join(sorted(cls.defaults)) or '(none)'}"
            )
        return {**cls.defaults, **options}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _import_builtin_methods()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def available_methods() -> dict[str, type[Method]]:
    _import_builtin_methods()
    return dict(sorted(METHODS.items()))


def _import_builtin_methods() -> None:
    import importlib
    import pkgutil

    import unspur.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base":
            importlib.import_module(f"unspur.methods.{module.name}")
