"""From a config to a trained model and ``results.json``: the library's main entry.

Data flows one way: dataset -> (resplit, balance) -> method -> evaluation -> results.
Everything the run produces lives under ``out_dir``; nothing is written elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from unspur.config import RunConfig, dump_config
from unspur.data.dataset import GroupDataset, drop_bad_images
from unspur.data.registry import load_dataset
from unspur.data.table import GroupTable, require_nonempty_groups
from unspur.data.transforms import eval_transform, train_transform
from unspur.errors import ConfigError, UnspurError
from unspur.evaluate.metrics import DEFINITIONS, GroupMetrics
from unspur.evaluate.predict import evaluate_split
from unspur.io import atomic_write_json, atomic_write_text
from unspur.methods.base import RunContext, get_method
from unspur.models.checkpoint import load_checkpoint, save_checkpoint
from unspur.models.factory import build_model
from unspur.train.seeding import seed_everything


@dataclass
class PreparedData:
    table: GroupTable
    train: GroupDataset
    val: GroupDataset | None
    test: GroupDataset | None
    eval_transform: Any

    @property
    def train_group_counts(self) -> np.ndarray:
        return self.train.group_counts().numpy()


def prepare_table(config: RunConfig) -> GroupTable:
    """Read the dataset and apply the data section's resplitting and balancing."""
    data = config.data
    table = load_dataset(data.name, data.root, **data.options)
    table = drop_bad_images(table, data.on_bad_image)
    if data.bias_ratio is not None:
        from unspur.data.resplit import resplit_bias

        table = resplit_bias(table, data.bias_ratio, seed=config.seed)
    if data.balance_eval:
        from unspur.data.resplit import balance_groups

        for split in ("val", "test"):
            if (table.frame["split"] == split).any():
                table = balance_groups(table, split, seed=config.seed)
    return table


def prepare_data(config: RunConfig, table: GroupTable | None = None) -> PreparedData:
    table = table if table is not None else prepare_table(config)
    data, train = config.data, config.train
    evaluation = eval_transform(data.image_size, data.crop_ratio, data.normalize)
    training = train_transform(
        data.image_size, train.augment, tuple(train.augment_scale), data.crop_ratio, data.normalize
    )
    splits = set(table.frame["split"])
    for split in ("val", "test"):
        if split in splits:
            require_nonempty_groups(table, split)
    return PreparedData(
        table=table,
        train=GroupDataset(table.split("train"), training),
        val=GroupDataset(table.split("val"), evaluation) if "val" in splits else None,
        test=GroupDataset(table.split("test"), evaluation) if "test" in splits else None,
        eval_transform=evaluation,
    )


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("unspur", "torch", "numpy", "accelerate", "transformers", "scikit-learn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def evaluate_model(model, prepared: PreparedData, batch_size: int = 256) -> dict[str, GroupMetrics]:
    counts = prepared.train_group_counts
    results = {}
    for name, dataset in (("val", prepared.val), ("test", prepared.test)):
        if dataset is not None:
            results[name], _ = evaluate_split(model, dataset, counts, batch_size)
    return results


def _use_inferred_groups(context: RunContext, options: dict[str, Any]) -> dict[str, Any]:
    """Replace the training groups by pseudo-groups from the reference (ERM) model.

    The report scores the inferred minority against the true bias-conflicting samples.
    """
    from unspur.data.dataset import GroupDataset
    from unspur.train.group_inference import infer_groups, with_inferred_groups

    allowed = {"rule", "quantile", "top_k", "per_class"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"method.group_inference has no key(s) {unknown}; use {', '.join(sorted(allowed))}"
        )
    reference = context.reference_model()
    view = GroupDataset(context.train.table, context.eval_transform)
    inference = infer_groups(reference, view, **{"rule": "error", **options})
    table = context.train.table
    report = inference.report(table.groups, table.n_attrs)
    context.train = with_inferred_groups(context.train, inference)
    atomic_write_json(context.out_dir / "group_inference.json", report)
    return report


# ------------------------------------------------------------------ fingerprints
#: Config keys that change how a run looks or how fast it goes, never its results.
COSMETIC_KEYS = (
    "train.progress",
    "train.num_workers",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.tensorboard",
)
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


def run_inputs(config: RunConfig) -> dict[str, Any]:
    """What a whole run depends on: the resolved config without :data:`COSMETIC_KEYS`."""
    return _drop_cosmetic(config.to_dict())


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
    the method-independent :data:`SHARED_STAGES`, the method's name, resolved options,
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
            "data": _jsonable(asdict(config.data)),
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
                "options": _jsonable(self.options),
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


def _evaluate_reference(
    config: RunConfig, out_dir: Path, prepared: PreparedData, method: str
) -> dict[str, Any] | None:
    """The "before" model of the report: the run's ERM reference, evaluated like the result."""
    if method == "erm":
        return None
    if config.method.reference:
        source = Path(config.method.reference)
    elif (out_dir / "erm" / "best" / "model.json").is_file():
        source = out_dir / "erm" / "best"
    else:
        return None
    try:
        model = load_checkpoint(source)
    except UnspurError:
        return None
    metrics = evaluate_model(model, prepared, config.train.eval_batch_size)
    return {
        "method": "erm",
        "model": str(source),
        "metrics": {split: m.to_dict() for split, m in metrics.items()},
    }


def run(config: RunConfig, out_dir: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Train ``config.method`` on ``config.data``, evaluate, write ``results.json``.

    A directory that already holds a finished run of the same config (same
    :func:`run_fingerprint`, stored in ``out_dir/run.json``) is not touched: its
    ``results.json`` is returned (``force=True`` evaluates again; finished training
    stages are still reused). Otherwise every training stage is checked against its own
    fingerprint (:class:`StagedContext`): unchanged stages resume or are reused, changed
    ones fail with a clear message.
    """
    out_dir = Path(out_dir)
    if not force and is_finished(config, out_dir):
        return json.loads((out_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(config)
    atomic_write_json(
        out_dir / RUN_FILE,
        {"fingerprint": fingerprint, "finished": False, "inputs": run_inputs(config)},
    )
    atomic_write_text(out_dir / "config.yaml", dump_config(config))
    started = time.perf_counter()
    prepared = prepare_data(config)
    method_cls = get_method(config.method.name)
    options = method_cls.resolve_options(config.method.options)
    table = prepared.table

    def new_model():
        # Seeded here so that initial weights depend on the run's seed alone.
        seed_everything(config.seed)
        return build_model(
            config.model.arch, table.n_classes, config.model.pretrained, **config.model.options
        )

    context = StagedContext(
        config=config,
        train=prepared.train,
        val=prepared.val,
        out_dir=out_dir,
        build_model=new_model,
        train_group_counts=prepared.train_group_counts,
        eval_transform=prepared.eval_transform,
        options=options,
    )
    inference_report = None
    if config.method.group_inference is not None:
        inference_report = _use_inferred_groups(context, config.method.group_inference)
    model, fit_result = method_cls().run(context)
    save_checkpoint(model, out_dir / "model", extra={"method": method_cls.name})
    metrics = evaluate_model(model, prepared, config.train.eval_batch_size)
    supervision = method_cls.supervision.given_selection(fit_result.selection)
    if inference_report is not None:
        supervision = replace(supervision, train_group_labels=False)
    results = {
        "method": method_cls.name,
        "dataset": table.name,
        "seed": config.seed,
        "supervision": {
            "train_group_labels": supervision.train_group_labels,
            "val_group_labels": supervision.val_group_labels,
            "symbol": supervision.symbol,
        },
        "selection": {"rule": fit_result.selection, "best_epoch": fit_result.best_epoch},
        "group_inference": inference_report,
        "metrics": {split: m.to_dict() for split, m in metrics.items()},
        "reference": _evaluate_reference(config, out_dir, prepared, method_cls.name),
        "stages": list(context.stages),
        "definitions": DEFINITIONS,
        "data": {
            "group_counts": table.counts().reset_index().to_dict(orient="records"),
            "info": table.info,
        },
        "config": config.to_dict(),
        "method_options": options,
        "fingerprint": fingerprint,
        "versions": library_versions(),
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_json(
        out_dir / RUN_FILE,
        {"fingerprint": fingerprint, "finished": True, "inputs": run_inputs(config)},
    )
    return results
