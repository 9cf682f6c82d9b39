"""Fingerprints of runs and training stages: skip what is done, refuse stale state.

A run directory records a hash of its resolved config (without cosmetic keys such as
``train.progress``); every training stage records the inputs it was trained from. A
rerun with the same inputs reuses the stage; different inputs fail with the keys that
changed, instead of silently resuming from a checkpoint made for something else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unspur.config import RunConfig
from unspur.errors import ConfigError
from unspur.io import atomic_write_json
from unspur.methods.base import RunContext, get_method

#: Config keys that change how a run looks or how fast it goes, never its results.
COSMETIC_KEYS = (
    "train.progress",
    "train.num_workers",
    "train.cache_mb",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.tensorboard",
    "train.threads",
)
#: Method options that only say where finished work may be shared between runs (a
#: speed-up that changes no result): left out of run and stage fingerprints like
#: :data:`COSMETIC_KEYS`, so setting one neither reruns a finished run nor refuses it.
COSMETIC_OPTIONS = ("shared_cache",)
#: Stages whose training does not depend on the method: the ERM reference model. A
#: rerun with another method or other method options on the same directory reuses them.
SHARED_STAGES = ("erm",)
RUN_FILE = "run.json"
STAGE_FILE = "fingerprint.json"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict) and values:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: values}


def _drop_cosmetic(values: dict[str, Any], section: str | None = None) -> dict[str, Any]:
    values = _jsonable(values)
    for key in COSMETIC_KEYS:
        head, _, tail = key.partition(".")
        if section is None and isinstance(values.get(head), dict):
            values[head].pop(tail, None)
        elif section == head:
            values.pop(tail, None)
    return values


def digest(values: Any) -> str:
    """A stable SHA-256 of a JSON-able value (keys sorted)."""
    text = json.dumps(_jsonable(values), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _data_inputs(data: dict[str, Any]) -> dict[str, Any]:
    """The data section with ``root`` resolved to an absolute path, so that
    ``--data-dir ../shared/data`` and the same folder spelled absolutely (or through a
    symlink) are the same input and do not train twice."""
    data = dict(data)
    if data.get("root"):
        data["root"] = str(Path(str(data["root"])).expanduser().resolve())
    return data


def _without_cosmetic_options(options: Any) -> Any:
    if not isinstance(options, dict):
        return options
    return {k: v for k, v in options.items() if k not in COSMETIC_OPTIONS}


def run_inputs(config: RunConfig) -> dict[str, Any]:
    """What a whole run depends on: the resolved config without :data:`COSMETIC_KEYS`
    and :data:`COSMETIC_OPTIONS`."""
    values = _drop_cosmetic(config.to_dict())
    method = values.get("method")
    if isinstance(method, dict):
        method["options"] = _without_cosmetic_options(method.get("options"))
    values["data"] = _data_inputs(values["data"])
    return values


def method_stage_inputs(
    config: RunConfig, options: dict[str, Any], later: Sequence[str], **extra: Any
) -> dict[str, Any]:
    """The inputs of a method's stage (the key of a :mod:`unspur.shared_cache` entry):
    :func:`run_inputs`, with the method's resolved ``options`` less those read only after
    the stage (``later``), and ``extra`` (e.g. the hash of the model the stage starts
    from)."""
    inputs = run_inputs(config)
    inputs["method"]["options"] = {k: v for k, v in _jsonable(options).items() if k not in later}
    return {"run": inputs, **extra}


def run_fingerprint(config: RunConfig) -> str:
    return digest(run_inputs(config))


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"... and {len(keys) - limit} more")
    return "; ".join(shown) or "(inputs differ)"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(config: RunConfig, out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished run of exactly this config."""
    out_dir = Path(out_dir)
    stored = _read_json(out_dir / RUN_FILE)
    return (
        isinstance(stored, dict)
        and stored.get("fingerprint") == run_fingerprint(config)
        and stored.get("finished") is True
        and (out_dir / "results.json").is_file()
        and (out_dir / "model" / "model.json").is_file()
    )


def changed_defaults(config: RunConfig, out_dir: str | Path) -> str | None:
    """For a finished run of ``config`` in ``out_dir``: the method options the code now
    resolves differently from those the run used (a default changed, or an option was
    added, since it ran), as ``"key: used -> now"``; None when they agree.

    The run fingerprint covers the config as written, not the method's defaults, so a
    changed default alone would otherwise let a stale run pass as finished.
    """
    results = _read_json(Path(out_dir) / "results.json")
    used = results.get("method_options") if isinstance(results, dict) else None
    if not isinstance(used, dict):
        return None
    now = get_method(config.method.name).resolve_options(config.method.options)
    used, now = (_jsonable(_without_cosmetic_options(o)) for o in (used, now))
    return None if used == now else _differences(used, now)


def _dataset_signature(dataset: Any) -> dict[str, Any] | None:
    if dataset is None:
        return None
    signature: dict[str, Any] = {"n": len(dataset)}
    y = getattr(dataset, "y", None)
    if y is not None:
        array = np.ascontiguousarray(np.asarray(y, dtype=np.int64))
        signature["y"] = hashlib.sha256(array.tobytes()).hexdigest()[:16]
    return signature


@dataclass
class StagedContext(RunContext):
    """A :class:`RunContext` whose stages carry a fingerprint of their inputs.

    A stage's fingerprint covers the data section, the model section, the train config
    the stage runs with (without :data:`COSMETIC_KEYS`), the seed, the training and
    validation sets it is given (size and labels), the objective's type and, except for
    the method-independent :data:`SHARED_STAGES`, the method's name, resolved options
    (without :data:`COSMETIC_OPTIONS`),
    group inference and reference. It is written to ``out_dir/<stage>/fingerprint.json``
    before training; an existing stage with another fingerprint is refused with the
    keys that differ (so a changed config never silently resumes someone else's
    checkpoint), an unchanged one resumes or is reused as it stands.
    """

    stages: list[str] = field(default_factory=list)  # the stages this run trained, in order

    def fit(self, model, stage, *, train=None, train_config=None, objective=None, **kwargs):
        config = self.config
        train_config = train_config or config.train
        val = kwargs.get("val", "default")
        inputs: dict[str, Any] = {
            "stage": stage,
            "seed": config.seed,
            "data": _data_inputs(_jsonable(asdict(config.data))),
            "model": _jsonable(asdict(config.model)),
            "train": _drop_cosmetic(asdict(train_config), "train"),
            "train_set": _dataset_signature(train if train is not None else self.train),
            "val_set": _dataset_signature(self.val if isinstance(val, str) else val),
            "objective": type(objective).__name__ if objective is not None else "Objective",
            "head_only": kwargs.get("parameters") is not None,
            "val_group_labels": kwargs.get("val_group_labels", True),
        }
        if stage not in SHARED_STAGES:
            inputs["method"] = {
                "name": config.method.name,
                "options": _without_cosmetic_options(_jsonable(self.options)),
                "group_inference": _jsonable(config.method.group_inference),
                "reference": config.method.reference,
            }
        check_stage(self.out_dir / stage, inputs)
        if stage not in self.stages:
            self.stages.append(stage)
        return super().fit(
            model, stage, train=train, train_config=train_config, objective=objective, **kwargs
        )


def check_stage(stage_dir: Path, inputs: dict[str, Any]) -> None:
    """Refuse a stage directory trained from other inputs; record them for a new one.

    A stage folder with nothing trained yet (a run that failed before its first epoch)
    takes the new inputs.
    """
    fingerprint = digest(inputs)
    path = stage_dir / STAGE_FILE
    stored = _read_json(path)
    trained = any(
        (stage_dir / name).exists() for name in ("history.json", "best", "checkpoints", ".best.old")
    )
    if (
        trained
        and isinstance(stored, dict)
        and stored.get("fingerprint") not in (None, fingerprint)
    ):
        raise ConfigError(
            f"stage {stage_dir.name!r} in {stage_dir.parent} was trained from other inputs "
            f"({_differences(stored.get('inputs', {}), inputs)}). Use a new --out directory, "
            f"or delete {stage_dir} to retrain that stage"
        )
    if stored is None or stored.get("fingerprint") != fingerprint:
        atomic_write_json(path, {"fingerprint": fingerprint, "inputs": inputs})
