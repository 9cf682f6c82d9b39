"""Run configuration: YAML files, ``--set key=value`` overrides, validation.

A config is a tree of dataclasses. Loading checks every key against the dataclass
fields, so ``train.lr_rate`` fails with "unknown key 'train.lr_rate' (did you mean
'train.lr'?)" instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unspur.errors import ConfigError


@dataclass
class DataConfig:
    """Which dataset, read how. ``options`` go to the reader (see ``unspur data list``)."""

    name: str = "synthetic"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    on_bad_image: str = "fail"
    bias_ratio: float | None = None  # FFR resplitting of train (0.95, 0.99, ...)
    balance_eval: bool = False  # subsample val and test to equal group sizes
    image_size: int = 32
    crop_ratio: float = 1.0  # < 1: resize to size/crop_ratio then centre-crop (224/256)
    normalize: bool = True  # ImageNet mean/std


@dataclass
class ModelConfig:
    arch: str = "small_cnn"
    pretrained: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """One training loop's knobs; defaults suit the CPU demo, configs carry the papers'."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "none"  # none | cosine | step
    step_size: int = 30
    gamma: float = 0.1
    augment: bool = True
    augment_scale: tuple[float, float] = (0.7, 1.0)
    num_workers: int = 0
    eval_batch_size: int = 256
    selection: str = "auto"  # auto | worst_group | average | last
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "no"  # no | fp16 | bf16
    progress: bool = True
    checkpoint_every: int = 1
    tensorboard: bool = False  # log curves to <stage>/tensorboard (needs `tensorboard`)


@dataclass
class MethodConfig:
    name: str = "erm"
    options: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None  # a saved ERM model directory to reuse (DFR, JTT, ...)
    # Train-group labels inferred from the reference model instead of read from the data:
    # {rule: error | loss_quantile | loss_topk, quantile: 0.1, top_k: 10, per_class: true}
    group_inference: dict[str, Any] | None = None


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SELECTION_RULES = ("auto", "worst_group", "average", "last")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "step")


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is Any:
        return value
    if origin is dict or hint is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _build(cls: type, values: Any, path: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key {full!r}{_suggest(str(key), names)}; "
                f"valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def validate(config: RunConfig) -> RunConfig:
    """Check values that have a fixed set of choices."""
    checks = [
        ("train.optimizer", config.train.optimizer, OPTIMIZERS),
        ("train.scheduler", config.train.scheduler, SCHEDULERS),
        ("train.selection", config.train.selection, SELECTION_RULES),
        ("train.mixed_precision", config.train.mixed_precision, ("no", "fp16", "bf16")),
        ("data.on_bad_image", config.data.on_bad_image, ("fail", "skip")),
    ]
    for path, value, choices in checks:
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not one of {', '.join(choices)}")
    if config.train.epochs < 0 or config.train.batch_size < 1:
        raise ConfigError("train.epochs must be >= 0 and train.batch_size >= 1")
    if config.data.bias_ratio is not None and not 0.5 <= config.data.bias_ratio < 1:
        raise ConfigError(f"data.bias_ratio={config.data.bias_ratio} must be in [0.5, 1)")
    return config


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    return validate(_build(RunConfig, values, ""))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.1`` -> (["train", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return values


def read_yaml_mapping(path: str | Path | None) -> dict[str, Any]:
    """The mapping in a YAML config file (``{}`` for None); errors name the file."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set``s."""
    values = apply_overrides(read_yaml_mapping(path), overrides or [])
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from exc


def dump_config(config: RunConfig) -> str:
    data = config.to_dict()
    data["train"]["augment_scale"] = list(data["train"]["augment_scale"])
    return yaml.safe_dump(data, sort_keys=False)


def train_config_with(base: TrainConfig, overrides: Any, what: str) -> TrainConfig:
    """``base`` with a method option's train settings (e.g. a pretraining stage) applied.

    ``what`` names the option in errors, so a bad key points at the method option.
    """
    if not isinstance(overrides, dict):
        raise ConfigError(f"method option {what} must be a mapping of train settings")
    values = {**dataclasses.asdict(base), **overrides}
    values["augment_scale"] = list(values["augment_scale"])
    try:
        return config_from_dict({"train": values}).train
    except ConfigError as err:
        raise ConfigError(f"method option {what}: {err}") from err
