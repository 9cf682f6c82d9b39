"""Run configuration: YAML files, ``--set key=value`` overrides, validation.

A config is a tree of dataclasses. Loading checks every key against the dataclass
fields, so ``train.lr_rate`` fails with "unknown config key 'train.lr_rate' (did you
mean 'train.lr'?)" instead of being silently ignored; a key in the wrong section
(``train.image_size``) points to the right one. Every number is then checked against
:data:`RANGES`, so ``data.image_size=0`` or ``train.lr=-1`` fail when the config loads,
with the key and an allowed value, not deep inside training.

Numbers may be written in scientific notation everywhere (``1e-4``, also in method
and reader options): PyYAML follows YAML 1.1, which reads ``1e-4`` as a string, so
:func:`load_yaml` adds YAML 1.2's float form.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unspur.errors import ConfigError, closest_name, did_you_mean


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
    # MB of memory caches that change speed only, never a number; 0: off. Per dataset,
    # decoded, resized images (GroupDataset): the run's train / val / test and the views
    # derived from them (datasets a method builds from generated images use the
    # default). Per MaC (alpha, beta) search, the frozen backbone's features of each
    # batch's interventions, shared by the candidates. Our choice: the UTKFace
    # benchmarks at 32-64 px fit whole; a 224 px Waterbirds train split (about 720 MB)
    # fits in part.
    cache_mb: int = 512
    eval_batch_size: int = 256
    selection: str = "auto"  # auto | worst_group | average | last
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "no"  # no | fp16 | bf16
    progress: bool = True
    checkpoint_every: int = 1
    tensorboard: bool = False  # log curves to <stage>/tensorboard (needs `tensorboard`)
    # torch CPU threads (torch.set_num_threads). None: the cores this process may use
    # (os.sched_getaffinity), never more than torch already uses (OMP_NUM_THREADS).
    # Our choice: on a shared machine set 1-2; one thread per core oversubscribes.
    threads: int | None = None


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
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take, with what it means and a valid example."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is not allowed
    high_open: bool = False
    meaning: str = ""
    example: Any = None

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )

    def describe(self) -> str:
        def text(bound: float) -> str:
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {text(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {text(self.high)}")
        return " and ".join(parts) or "a finite number"


#: The allowed range of every numeric setting, checked when a config loads. No paper
#: bounds these: each range is what the code can run with (our choice), so a typo fails
#: at once with the key instead of as a ZeroDivisionError or a torch ValueError later.
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32, high_open=True, meaning="numpy seeds are 32-bit", example=0),
    "data.bias_ratio": Range(
        0.5, 1, high_open=True, meaning="share of majority groups in each class", example=0.95
    ),
    "data.image_size": Range(1, meaning="side in pixels images are resized to", example=224),
    "data.crop_ratio": Range(
        0,
        1,
        low_open=True,
        meaning="share of the resized image kept by the centre crop",
        example=0.875,
    ),
    "train.epochs": Range(0, meaning="0 keeps the model as built, untrained", example=10),
    "train.batch_size": Range(1, meaning="images per training step", example=64),
    "train.eval_batch_size": Range(1, meaning="images per evaluation step", example=256),
    "train.lr": Range(0, low_open=True, meaning="the optimiser's step size", example=0.01),
    "train.momentum": Range(0, 1, high_open=True, meaning="SGD momentum", example=0.9),
    "train.weight_decay": Range(0, meaning="L2 penalty", example=1e-4),
    "train.step_size": Range(1, meaning="epochs between step-scheduler decays", example=30),
    "train.gamma": Range(
        0, 1, low_open=True, meaning="the step scheduler's decay factor", example=0.1
    ),
    "train.augment_scale": Range(
        0,
        1,
        low_open=True,
        meaning="[low, high] share of the image a random crop keeps",
        example="[0.7,1.0]",
    ),
    "train.num_workers": Range(0, meaning="DataLoader worker processes", example=0),
    "train.cache_mb": Range(
        0, meaning="MB of speed-only caches (decoded images, MaC search features)", example=512
    ),
    "train.checkpoint_every": Range(1, meaning="epochs between checkpoints", example=1),
    "train.threads": Range(1, meaning="torch threads", example=1),
}


def _path_value(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _range_error(path: str, value: Any, allowed: str, meaning: str, example: Any) -> ConfigError:
    return ConfigError(
        f"{path}={value!r} is out of range: it must be {allowed} ({meaning}). Fix {path} "
        f"in the config file or on the command line, e.g. --set {path}={example}"
    )


def _shown(path: str, train_path: str) -> str:
    """``path`` as the user wrote it: ``train.lr`` of a method option's train settings is
    ``method.options.<option>.lr``."""
    head, dot, tail = path.partition(".")
    return f"{train_path}.{tail}" if head == "train" and dot else path


def check_ranges(config: RunConfig, train_path: str = "train") -> None:
    """Refuse any number outside :data:`RANGES` (a missing or None setting is skipped).

    A pair such as ``train.augment_scale`` must hold two numbers in range, low first.
    ``train_path`` is where the train settings came from, for the message.
    """
    for key, allowed in RANGES.items():
        value = _path_value(config, key)
        path = _shown(key, train_path)
        if isinstance(value, tuple | list):
            ordered = list(value) == sorted(value)
            if not ordered or not all(allowed.contains(v) for v in value):
                raise _range_error(
                    path,
                    list(value),
                    f"two numbers, low <= high, each {allowed.describe()}",
                    allowed.meaning,
                    allowed.example,
                )
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not allowed.contains(value):
            raise _range_error(path, value, allowed.describe(), allowed.meaning, allowed.example)


def _leaf_paths(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every key of the config tree, dotted (``train.lr``), sections included."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        paths.append(full)
        if dataclasses.is_dataclass(hints[f.name]):
            paths += _leaf_paths(hints[f.name], f"{full}.")
    return paths


def _unknown_key(key: str, path: str, names: list[str]) -> ConfigError:
    """The error for an unknown key, with the key the user most likely meant."""
    prefix = f"{path}." if path else ""
    full = f"{prefix}{key}"
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    elsewhere = [p for p in _leaf_paths() if p.rsplit(".", 1)[-1] == key and p != full]
    if path not in ["", *sections]:  # a method option's settings: only its own keys
        elsewhere = []
    if len(elsewhere) == 1:
        hint = f" (did you mean {elsewhere[0]!r}? {key!r} belongs in that section)"
    else:
        hint = did_you_mean(key, names, prefix)
    if not hint and not elsewhere and path in ["", *sections]:
        # a misspelt key of another section: data.num_epochs -> train.epochs
        by_leaf: dict[str, list[str]] = {}
        for other in _leaf_paths():
            by_leaf.setdefault(other.rsplit(".", 1)[-1], []).append(other)
        leaf = closest_name(key, by_leaf)
        if leaf is not None and len(by_leaf[leaf]) == 1:
            hint = f" (did you mean {by_leaf[leaf][0]!r}?)"
    where = f"under {path!r}" if path else "at the top level"
    return ConfigError(
        f"unknown config key {full!r}{hint}; the keys {where} are: {', '.join(names)}. "
        "Fix the key in the config file or in --set"
    )


#: A number in any notation YAML 1.2 or Python accepts: ``1e-4``, ``5E3``, ``.5``, ``1_000``.
_NUMBER = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot or exponent sign."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely, reading ``1e-4`` as the number it is (PyYAML says string)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _as_number(value: Any) -> float | None:
    """``value`` as a float when it is a number or a string that spells one, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value.strip().replace("_", ""))
    return None


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
        number = _as_number(value)  # 1e3 and 10.0 are whole numbers too
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ConfigError(
            f"{path}: expected an integer (a whole number such as 10 or 1e3), got {value!r}. Fix {path} "
            "in the config file or in --set"
        )
    if hint is float:
        number = _as_number(value)
        if number is not None:
            return number
        raise ConfigError(
            f"{path}: expected a number (e.g. 0.01 or 1e-4), got {value!r}. Fix {path} "
            "in the config file or in --set"
        )
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
            raise _unknown_key(str(key), path, names)
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def validate(config: RunConfig, train_path: str = "train") -> RunConfig:
    """Check values with a fixed set of choices, and every number's range (:data:`RANGES`).

    ``train_path`` names where the train settings came from in messages (a method
    option's own train settings: ``method.options.pretrain``).
    """
    checks = [
        ("train.optimizer", config.train.optimizer, OPTIMIZERS),
        ("train.scheduler", config.train.scheduler, SCHEDULERS),
        ("train.selection", config.train.selection, SELECTION_RULES),
        ("train.mixed_precision", config.train.mixed_precision, ("no", "fp16", "bf16")),
        ("train.device", config.train.device, DEVICES),
        ("data.on_bad_image", config.data.on_bad_image, ("fail", "skip")),
    ]
    for key, value, choices in checks:
        path = _shown(key, train_path)
        if value not in choices:
            raise ConfigError(
                f"{path}={value!r} is not one of {', '.join(choices)}"
                f"{did_you_mean(str(value), choices)}; fix {path} in the config file or "
                f"on the command line, e.g. --set {path}={choices[0]}"
            )
    check_ranges(config, train_path)
    _check_shipped_backbone(config)
    return config


def _check_shipped_backbone(config: RunConfig) -> None:
    """Refuse a shipped backbone on a dataset its card rules out (``not_for``)."""
    from unspur.models.shipped import is_shipped_name, not_for_reason

    source = config.model.pretrained
    if not is_shipped_name(source):
        return
    reason = not_for_reason(str(source), config.data.name)
    if reason:
        raise ConfigError(
            f"model.pretrained={source} must not be used with data.name={config.data.name}: "
            f"{reason}. Train from scratch (model.pretrained: null) or use a backbone that "
            "has not seen this benchmark's images"
        )


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
        value = load_yaml(raw) if raw.strip() else ""
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
        loaded = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded or {}


def with_data_settings(values: dict[str, Any], data: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` with ``data`` set in its data section (the CLI's ``--dataset``, ``--root``,
    ``--option``, ``--on-bad-image``).

    Options merge key by key; a dataset name other than the config's drops the config's
    reader options, which belong to the other reader.
    """
    if not data:
        return values
    section = dict(values.get("data") or {})
    data = dict(data)
    options = data.pop("options", None) or {}
    if "name" in data and data["name"] != section.get("name", DataConfig.name):
        section.pop("options", None)
    section.update(data)
    if options:
        section["options"] = {**(section.get("options") or {}), **options}
    return {**values, "data": section}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None), set ``data`` in its
    data section (:func:`with_data_settings`), then apply the ``--set`` overrides."""
    values = with_data_settings(read_yaml_mapping(path), data)
    values = apply_overrides(values, overrides or [])
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

    ``what`` names the option in errors, so a bad key or value is named as the user
    wrote it: ``method.options.pretrain.lr``, not ``train.lr``.
    """
    path = f"method.options.{what}"
    if not isinstance(overrides, dict):
        raise ConfigError(
            f"{path} must be a mapping of train settings (e.g. {{epochs: 5, lr: 1e-3}}), "
            f"got {overrides!r}"
        )
    values = {**dataclasses.asdict(base), **overrides}
    values["augment_scale"] = list(values["augment_scale"])
    train = _build(TrainConfig, values, path)
    validate(RunConfig(train=train), train_path=path)
    return train
