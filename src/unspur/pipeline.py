"""From a config to a trained model and ``results.json``: the library's main entry.

Data flows one way: dataset -> (resplit, balance) -> method -> evaluation -> results.
Everything the run produces lives under ``out_dir``; nothing is written elsewhere.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, replace
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
from unspur.stages import RUN_FILE, StagedContext, is_finished, run_fingerprint, run_inputs
from unspur.train.loop import apply_threads, earlier_seconds
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
    threads = apply_threads(config.train.threads)
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
        "threads": threads,
        # This invocation plus the training that earlier (interrupted) ones checkpointed.
        "wall_seconds": time.perf_counter() - started + earlier_seconds(out_dir, context.stages),
    }
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_json(
        out_dir / RUN_FILE,
        {"fingerprint": fingerprint, "finished": True, "inputs": run_inputs(config)},
    )
    return results
