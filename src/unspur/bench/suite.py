"""Benchmark suites: one YAML file names everything a benchmark table is made of.

A suite lists *settings* (a dataset and the config overrides that make it), *methods*
(a method name, or a named variant of one: ``mac_views4: {method: mac, set: [...]}``),
the *seeds*, the *assets* it reads from the data directory, and the *measurements*
(:mod:`unspur.bench.measurements`) the table carries besides accuracy. Every setting
runs every method unless it lists its own subset (``methods: [erm, ...]``, ERM
included: it is the paired reference). Every problem is
found when the file is read, before anything trains: an unknown key, method, variant,
measurement or asset raises :class:`~unspur.errors.ConfigError` naming it.

Example (``bench/suites/smoke.yaml``)::

    description: ERM against two robust methods on the synthetic benchmark
    seeds: [0, 1]
    seeds_note: 2 seeds keep the smoke suite under five CPU minutes
    set: [train.epochs=2]
    settings:
      synthetic-99: {set: [data.name=synthetic, data.options.bias=0.99]}
      colored_mnist-1%: {root: mnist, set: [data.name=colored_mnist]}
    assets:
      mnist: {path: mnist, labels: none, what: MNIST digits (t10k)}
    methods:
      erm:
      dfr_val:
      mac_gt: {method: mac, set: [method.options.saliency=ground_truth],
               oracle: exact object masks}
    measurements: [timing]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unspur.bench.assets import ASSET_REF
from unspur.compare import label_of, receives_base_options
from unspur.config import load_yaml
from unspur.errors import ConfigError, did_you_mean

TOP_KEYS = (
    "description",
    "seeds",
    "seeds_note",
    "set",
    "settings",
    "methods",
    "assets",
    "measurements",
    "notes",
)
SETTING_KEYS = ("config", "set", "root", "uses", "methods", "note")
METHOD_KEYS = ("method", "set", "oracle", "note")
ASSET_KEYS = ("path", "labels", "what", "build", "data", "seed", "options")
#: Which labels an asset's construction saw, as a supervision level (captions that name
#: the bias attribute count as training group labels).
ASSET_LABELS = {"none": 0, "val_groups": 1, "train_groups": 2}
SYMBOLS = ("x", "✓", "✓✓")
#: ``{shared}`` in an override: ``WORK/<setting>/shared``, a folder the runs of one
#: setting share (e.g. DBB's ``shared_cache``, where pruning variants of a seed find the
#: candidates another variant generated). ``{asset:NAME}`` names an asset's folder.
SHARED_REF = "{shared}"
#: Method options that feed the method an oracle input: (method, option, value) -> mark.
ORACLE_OPTIONS = {
    ("mac", "saliency", "ground_truth"): "exact object masks",
    ("dbb", "masker", "ground_truth"): "exact object masks",
}


@dataclass
class Asset:
    """Something a setting reads from ``--data-dir`` (``path``: a dataset folder), or a
    generator the suite builds itself (``build``, see :mod:`unspur.bench.assets`)."""

    name: str
    path: str | None
    labels: str = "none"
    what: str = ""
    build: str | None = None
    data: list[str] = field(default_factory=list)
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setting:
    """A dataset and the overrides that make one row group (one table) of the suite."""

    name: str
    overrides: list[str]
    root: str | None = None  # an asset name: data.root = DATA_DIR/<asset path>
    config: str | None = None  # a config file (from the repository root) the setting starts from
    uses: list[str] = field(default_factory=list)  # further assets (generators, ...)
    note: str = ""
    methods: list[str] | None = None  # the variants this setting runs; None: every one


@dataclass
class Variant:
    """A row of the table: a method, or a named variant of one with its own overrides."""

    label: str
    method: str
    overrides: list[str]
    oracle: str = ""
    note: str = ""


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    seeds: list[int]
    seeds_note: str
    overrides: list[str]
    settings: dict[str, Setting]
    variants: dict[str, Variant]
    assets: dict[str, Asset]
    measurements: list[str]
    notes: str = ""

    @property
    def root(self) -> Path:
        """The repository a ``bench/suites/`` file belongs to (config paths start there);
        the current folder for a suite kept elsewhere."""
        if self.path.resolve().parent.name == "suites":
            return self.path.resolve().parent.parent.parent
        return Path.cwd()

    @property
    def labels(self) -> list[str]:
        return list(self.variants)

    def labels_of(self, setting: str) -> list[str]:
        """The variants ``setting`` runs, in the suite's order: its ``methods`` list, or
        every variant of the suite when it has none."""
        chosen = self.settings[setting].methods
        return [label for label in self.variants if chosen is None or label in chosen]

    def compare_variants(self) -> dict[str, tuple[str, list[str]]]:
        """The ``variants`` argument of :func:`unspur.compare.plan`."""
        return {v.label: (v.method, list(v.overrides)) for v in self.variants.values()}

    def base_method(self, setting: str) -> str:
        """The method a setting's config (and the suite's and setting's overrides) names,
        ``erm`` without one: the one method that receives the setting's ``method.options``
        (:func:`unspur.compare.plan` resets them for every other method)."""
        chosen = self.settings[setting]
        name = "erm"
        if chosen.config is not None:
            from unspur.config import read_yaml_mapping

            name = (read_yaml_mapping(self.root / chosen.config).get("method") or {}).get(
                "name", name
            )
        for override in [*self.overrides, *chosen.overrides]:
            key, _, value = override.partition("=")
            if label_of(override) is None and key.strip() == "method.name":
                name = value.strip()
        return name

    def assets_of(self, setting: str, label: str | None = None) -> list[str]:
        """The assets a setting (and the variant ``label`` in it) reads. For a variant,
        the overrides it receives as :func:`unspur.compare.plan` hands them out: the
        unprefixed ones (``method.options`` only if its method is the setting's base
        method), its own ``LABEL:`` ones and its variant overrides; without ``label``,
        every asset any variant of the setting may read."""
        chosen = self.settings[setting]
        overrides = [*self.overrides, *chosen.overrides]
        if label is not None:
            variant = self.variants[label]
            same_method = receives_base_options(variant.method, self.base_method(setting))
            overrides = [
                o.partition(":")[2] if label_of(o) else o
                for o in overrides
                if label_of(o) == label
                or (label_of(o) is None and (same_method or not o.startswith("method.options")))
            ]
            overrides += variant.overrides
        names = [chosen.root, *chosen.uses, *referenced(overrides)]
        return list(dict.fromkeys(n for n in names if n))

    def asset_supervision(self, setting: str, label: str | None = None) -> int:
        """The highest label level any asset of ``setting`` (and ``label``) saw (0, 1, 2)."""
        names = self.assets_of(setting, label)
        return max((ASSET_LABELS[self.assets[n].labels] for n in names), default=0)


def referenced(overrides: list[str]) -> list[str]:
    """The asset names ``{asset:NAME}`` in ``overrides`` refer to."""
    return [m for o in overrides for m in ASSET_REF.findall(o)]


def _unknown(where: str, keys: list[str], allowed: tuple[str, ...], path: Path) -> None:
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        key = str(unknown[0])
        raise ConfigError(
            f"suite {path}: unknown key {where}{key!r}{did_you_mean(key, allowed)}; "
            f"the keys there are: {', '.join(allowed)}"
        )


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"suite {path}: {what} must be a mapping, got {value!r}")
    return value


def _overrides(value: Any, what: str, path: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(
            f"suite {path}: {what} must be a list of key=value overrides "
            f"(e.g. [train.epochs=2]), got {value!r}"
        )
    return list(value)


def _names(value: Any, what: str, path: Path) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"suite {path}: {what} must be a non-empty list of the suite's method labels "
            f"(e.g. [erm, groupdro]), got {value!r}"
        )
    return list(value)


def _check_subset(setting: Setting, variants: dict[str, Variant], path: Path) -> None:
    """A setting's ``methods`` names listed variants, keeps ERM (every table's paired
    reference) and is named by each of the setting's ``LABEL:`` overrides."""
    if setting.methods is None:
        return
    where = f"suite {path}: settings.{setting.name}.methods"
    for label in setting.methods:
        if label not in variants:
            raise ConfigError(
                f"{where} names {label!r}, which the suite's methods do not list"
                f"{did_you_mean(label, variants)}"
            )
    if "erm" in variants and "erm" not in setting.methods:
        raise ConfigError(f"{where} leaves out erm, the paired reference of every table; add it")
    for override in setting.overrides:
        head = label_of(override)
        if head is not None and head in variants and head not in setting.methods:
            raise ConfigError(
                f"suite {path}: settings.{setting.name}.set: {override!r} is for method "
                f"{head!r}, which settings.{setting.name}.methods leaves out"
            )


def _seeds(value: Any, path: Path) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"suite {path}: seeds must be a non-empty list like [0, 1, 2]")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise ConfigError(f"suite {path}: seeds must be integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"suite {path}: seeds lists a seed twice: {value!r}")
    return list(value)


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file (every method, variant, measurement and asset name)."""
    from unspur.bench.measurements import get_measurement
    from unspur.methods.base import get_method

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {path} does not exist")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"suite {path} is not valid YAML: {exc}") from exc
    raw = _mapping(raw, "the top level", path)
    _unknown("", list(raw), TOP_KEYS, path)
    for required in ("settings", "methods", "seeds"):
        if not raw.get(required):
            raise ConfigError(f"suite {path}: {required!r} is missing or empty")

    assets = {}
    for name, spec in _mapping(raw.get("assets"), "assets", path).items():
        spec = _mapping(spec, f"assets.{name}", path)
        _unknown(f"assets.{name}.", list(spec), ASSET_KEYS, path)
        if "build" in spec:
            assets[name] = _built_asset(str(name), spec, path)
            continue
        if not isinstance(spec.get("path"), str) or Path(spec["path"]).is_absolute():
            raise ConfigError(
                f"suite {path}: assets.{name}.path must be a path relative to --data-dir, "
                f"got {spec.get('path')!r}"
            )
        labels = spec.get("labels", "none")
        if labels not in ASSET_LABELS:
            raise ConfigError(
                f"suite {path}: assets.{name}.labels={labels!r} is not one of "
                f"{', '.join(ASSET_LABELS)}{did_you_mean(str(labels), ASSET_LABELS)}"
            )
        assets[name] = Asset(str(name), spec["path"], labels, str(spec.get("what", "")))

    settings = {}
    for name, spec in _mapping(raw["settings"], "settings", path).items():
        spec = _mapping(spec, f"settings.{name}", path)
        _unknown(f"settings.{name}.", list(spec), SETTING_KEYS, path)
        uses = spec.get("uses") or []
        for asset in [spec.get("root"), *uses]:
            if asset is not None and asset not in assets:
                raise ConfigError(
                    f"suite {path}: settings.{name} reads asset {asset!r}, which the suite's "
                    f"assets do not name{did_you_mean(str(asset), assets)}; add it under assets"
                )
        config = spec.get("config")
        if config is not None and (not isinstance(config, str) or Path(config).is_absolute()):
            raise ConfigError(
                f"suite {path}: settings.{name}.config must be a config file relative to the "
                f"repository root (e.g. configs/synthetic_dbb.yaml), got {config!r}"
            )
        settings[str(name)] = Setting(
            name=str(name),
            overrides=_overrides(spec.get("set"), f"settings.{name}.set", path),
            root=spec.get("root"),
            uses=list(uses),
            note=str(spec.get("note", "")),
            config=config,
            methods=_names(spec.get("methods"), f"settings.{name}.methods", path),
        )

    for where, overrides in [
        ("set", _overrides(raw.get("set"), "set", path)),
        *[(f"settings.{s.name}.set", s.overrides) for s in settings.values()],
    ]:
        _check_refs(where, overrides, assets, path)

    methods = raw["methods"]
    if isinstance(methods, list):
        methods = {m: None for m in methods}
    variants = {}
    for label, spec in _mapping(methods, "methods", path).items():
        spec = _mapping(spec, f"methods.{label}", path)
        _unknown(f"methods.{label}.", list(spec), METHOD_KEYS, path)
        method = spec.get("method", label)
        try:
            get_method(str(method))
        except ConfigError as exc:
            where = "method" if "method" in spec else "a method name or a variant with a method"
            raise ConfigError(f"suite {path}: methods.{label}: {where}: {exc}") from None
        overrides = _overrides(spec.get("set"), f"methods.{label}.set", path)
        if any(o.split("=", 1)[0].strip() == "method.name" for o in overrides):
            raise ConfigError(
                f"suite {path}: methods.{label}.set sets method.name; name the method with "
                f"`method: NAME` instead"
            )
        _check_refs(f"methods.{label}.set", overrides, assets, path)
        variants[str(label)] = Variant(
            str(label),
            str(method),
            overrides,
            str(spec.get("oracle", "")),
            str(spec.get("note", "")),
        )
    for setting in settings.values():  # LABEL:key=value overrides one method of a setting
        for override in setting.overrides:
            head, sep, _ = override.partition(":")
            if sep and "=" not in head and "." not in head and head not in variants:
                raise ConfigError(
                    f"suite {path}: settings.{setting.name}.set: {override!r} names method "
                    f"{head!r}, which the suite's methods do not list"
                    f"{did_you_mean(head, variants)}"
                )
    for setting in settings.values():  # a setting's `methods` subset
        _check_subset(setting, variants, path)
    if "erm" in variants and variants["erm"].method != "erm":
        raise ConfigError(f"suite {path}: methods.erm must be ERM itself (the paired reference)")

    measurements = raw.get("measurements") or []
    if not isinstance(measurements, list):
        raise ConfigError(f"suite {path}: measurements must be a list of names")
    for name in measurements:
        try:
            get_measurement(str(name))
        except ConfigError as exc:
            raise ConfigError(f"suite {path}: measurements: {exc}") from None

    return Suite(
        name=path.stem,
        path=path,
        description=str(raw.get("description", "")),
        seeds=_seeds(raw["seeds"], path),
        seeds_note=str(raw.get("seeds_note", "")),
        overrides=_overrides(raw.get("set"), "set", path),
        settings=settings,
        variants=variants,
        assets=assets,
        measurements=[str(m) for m in measurements],
        notes=str(raw.get("notes", "")),
    )


def _check_refs(where: str, overrides: list[str], assets: dict, path: Path) -> None:
    for name in referenced(overrides):
        if name not in assets:
            raise ConfigError(
                f"suite {path}: {where} refers to {{asset:{name}}}, which the suite's assets "
                f"do not name{did_you_mean(name, assets)}; add it under assets"
            )


def _built_asset(name: str, spec: dict[str, Any], path: Path) -> Asset:
    """An asset the runner builds (a generator), checked: builder, data, seed, options."""
    from unspur.bench.assets import BUILDERS, asset_labels, check_asset_options

    where = f"suite {path}: assets.{name}"
    if spec["build"] not in BUILDERS:
        raise ConfigError(
            f"{where}.build={spec['build']!r} is not one of {', '.join(BUILDERS)}"
            f"{did_you_mean(str(spec['build']), BUILDERS)}"
        )
    for key in ("path", "labels"):
        if key in spec:
            raise ConfigError(
                f"{where}: a built asset has no {key!r} (it lives in the work folder; the "
                "labels it saw follow from its captions)"
            )
    data = _overrides(spec.get("data"), f"assets.{name}.data", path)
    if not data:
        raise ConfigError(f"{where}.data: name the data it learns from, e.g. [data.name=...]")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}.seed must be an integer, got {seed!r}")
    options = _mapping(spec.get("options"), f"assets.{name}.options", path)
    check_asset_options(str(spec["build"]), options, f"{where}.options")
    return Asset(
        name,
        None,
        asset_labels(str(spec["build"]), options),
        str(spec.get("what", "")),
        str(spec["build"]),
        data,
        seed,
        dict(options),
    )


def oracle_mark(variant: Variant, config: Any) -> str:
    """The oracle inputs a run is given: the suite's ``oracle:`` text, else one the
    method's options imply (MaC with ``saliency: ground_truth``), else ``""``."""
    if variant.oracle:
        return variant.oracle
    options = config.method.options or {}
    for (method, key, value), mark in ORACLE_OPTIONS.items():
        if config.method.name == method and options.get(key) == value:
            return mark
    return ""


def pipeline_symbol(method_symbol: str, asset_level: int) -> str:
    """The supervision of the whole pipeline: the method's, raised to what its assets saw."""
    level = SYMBOLS.index(method_symbol) if method_symbol in SYMBOLS else 0
    return SYMBOLS[max(level, asset_level)]
