"""The method registry and what every method declares.

A method is found by name, declares its supervision (which group labels it uses) and
its hyperparameters with the paper's defaults, and trains a model through the one
training loop. The supervision is recorded with every result (the papers' x / ✓ / ✓✓).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from unspur.config import RunConfig, TrainConfig
from unspur.data.dataset import GroupDataset
from unspur.errors import ConfigError, did_you_mean
from unspur.train.loop import FitResult, fit
from unspur.train.objectives import Objective


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
    eval_transform: Callable[[Any], torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)

    def fit(
        self,
        model: nn.Module,
        stage: str,
        *,
        train: Dataset | None = None,
        train_config: TrainConfig | None = None,
        objective: Objective | None = None,
        sample_weights: np.ndarray | torch.Tensor | None = None,
        parameters: Iterable[nn.Parameter] | None = None,
        val_group_labels: bool = True,
        val: Dataset | None | str = "default",
    ) -> FitResult:
        """Run the one training loop for a stage of a method, in ``out_dir/stage``.

        Defaults: the run's training set, validation set, train config and seed. A
        finished stage is not retrained: the loop resumes after its last epoch and
        reloads the selected weights.
        """
        return fit(
            model,
            train if train is not None else self.train,
            self.val if isinstance(val, str) else val,
            train_config or self.config.train,
            self.out_dir / stage,
            seed=self.config.seed,
            objective=objective,
            sample_weights=sample_weights,
            parameters=parameters,
            val_group_labels=val_group_labels,
            train_group_counts=self.train_group_counts,
            description=stage,
        )

    def reference_model(self) -> nn.Module:
        """The ERM model that group inference, DFR and last-layer retraining start from.

        ``method.reference`` names a saved model directory to reuse; otherwise ERM is
        trained once in ``out_dir/erm`` with the run's train config (and reused by every
        later stage or rerun).
        """
        if self.config.method.reference:
            from unspur.models.restore import load_checkpoint

            return load_checkpoint(self.config.method.reference)
        model = self.build_model()
        self.fit(model, "erm")
        return model


class Method:
    """Subclasses set ``name``, ``supervision``, ``defaults`` and implement ``run``."""

    name: ClassVar[str]
    supervision: ClassVar[Supervision]
    defaults: ClassVar[dict[str, Any]] = {}
    summary: ClassVar[str] = ""
    # Option overrides that make a tiny debug run fast (used by the registry-wide test).
    debug_options: ClassVar[dict[str, Any]] = {}
    # True when the method starts from the reference ERM model (``reference_model()``),
    # so a comparison can hand it the ERM run's model instead of training ERM again.
    uses_reference: ClassVar[bool] = False
    # The option that sets the method's own selection rule, for a method that ignores
    # ``train.selection`` (DiffInject's ``final_selection``); None: ``train.selection``.
    selection_option: ClassVar[str | None] = None

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        raise NotImplementedError

    @classmethod
    def default_supervision(cls) -> Supervision:
        """The supervision a run with default options records (``unspur methods`` shows
        it): a method whose own default selection rule reads no group label (DiffInject
        selects by validation accuracy) is x, although its worst-group option is ✓."""
        if cls.selection_option is None:
            return cls.supervision
        return cls.supervision.given_selection(str(cls.defaults[cls.selection_option]))

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            raise ConfigError(
                f"method {cls.name!r} has no option(s) {unknown}"
                f"{did_you_mean(unknown[0], cls.defaults, 'method.options.')}; its options are: "
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
        raise ConfigError(
            f"unknown method {name!r}{did_you_mean(name, METHODS)}; "
            f"available: {', '.join(sorted(METHODS))}"
        )
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
