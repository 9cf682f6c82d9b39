"""From a config to a trained model and ``results.json``: the library's main entry.

Data flows one way: dataset -> (resplit, balance) -> method -> evaluation -> results.
Everything the run produces lives under ``out_dir``; nothing is written elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from unspur.code_version import code_version
from unspur.config import RunConfig, dump_config
from unspur.data.dataset import GroupDataset, drop_bad_images
from unspur.data.registry import load_dataset
from unspur.data.table import GroupTable, require_nonempty_groups
from unspur.data.transforms import eval_transform, train_transform
from unspur.errors import (
    ConfigError,
    DataError,
    UnspurError,
    UnspurWarning,
    did_you_mean,
)
from unspur.evaluate.metrics import DEFINITIONS, GroupMetrics
from unspur.evaluate.predict import evaluate_split
from unspur.io import atomic_write_json, atomic_write_text
from unspur.methods.base import RunContext, get_method
from unspur.models.checkpoint import save_checkpoint
from unspur.models.factory import build_model
from unspur.models.restore import load_checkpoint
from unspur.stages import (
    RUN_FILE,
    STAGE_FILE,
    StagedContext,
    changed_defaults,
    is_finished,
    run_fingerprint,
    run_inputs,
)
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
        train=GroupDataset(table.split("train"), training, train.cache_mb),
        val=GroupDataset(table.split("val"), evaluation, train.cache_mb)
        if "val" in splits
        else None,
        test=GroupDataset(table.split("test"), evaluation, train.cache_mb)
        if "test" in splits
        else None,
        eval_transform=evaluation,
    )


def split_warnings(table: GroupTable, where: str | None = None) -> list[str]:
    """What a run must say about missing evaluation splits; an error when nothing is left.

    With neither val nor test rows nothing can be evaluated: the run would train and
    report no metric, so it is refused before any work (our choice, issue 21). A missing
    val split (selection falls back to the last epoch) or test split (val, which chose
    the model, is the only measurement) still gives a usable run: it goes on, warned.
    """
    splits = set(table.frame["split"])
    where = where or table.info.get("csv") or table.info.get("root") or table.name
    if not splits & {"val", "test"}:
        raise DataError(
            f"dataset {table.name!r} ({where}) has only train rows ({len(table.frame)} "
            "images): there is nothing to evaluate the model on. Mark some rows as val "
            "(model selection) and some as test (the reported metrics) in the split "
            "column, or use a reader option that holds them out (see `unspur data list`)"
        )
    found = []
    if "val" not in splits:
        found.append(
            f"dataset {table.name!r} ({where}) has no val rows: model selection falls back "
            "to the last epoch (train.selection=last) and methods that need validation "
            "group labels cannot run; mark some rows as val to select on them"
        )
    if "test" not in splits:
        found.append(
            f"dataset {table.name!r} ({where}) has no test rows: only val metrics are "
            "reported, and val also chose the model, so they are optimistic; mark some "
            "rows as test for an unbiased measurement"
        )
    return found


def check_group_inference(options: Any) -> None:
    """Refuse unknown ``method.group_inference`` keys before anything runs."""
    allowed = {"rule", "quantile", "top_k", "per_class"}
    if not isinstance(options, dict):
        raise ConfigError(
            f"method.group_inference must be a mapping of {', '.join(sorted(allowed))}, "
            f"got {options!r}"
        )
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"method.group_inference has no key(s) {unknown}"
            f"{did_you_mean(unknown[0], sorted(allowed), 'method.group_inference.')}; "
            f"use {', '.join(sorted(allowed))}"
        )


#: Files a run writes before any work: removed again when it fails before training.
BOOKKEEPING = frozenset({RUN_FILE, "config.yaml", STAGE_FILE})


def _holds_work(path: Path) -> bool:
    """True when ``path`` holds anything but run bookkeeping (a checkpoint, an image ...)."""
    if path.is_dir() and not path.is_symlink():
        return any(_holds_work(child) for child in path.iterdir())
    return path.name not in BOOKKEEPING


def _changed_since(folder: Path, since: float) -> bool:
    """True when a file below ``folder``, other than bookkeeping, was written after ``since``."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name not in BOOKKEEPING and os.stat(Path(dirpath) / name).st_mtime >= since:
                return True
    return False


@contextmanager
def _undo_on_early_failure(out_dir: Path) -> Iterator[None]:
    """Leave ``out_dir`` as it was when the run fails before it produced anything.

    A failed run must not leave ``config.yaml`` and ``run.json`` behind that the user
    did not have. When the failure left nothing but bookkeeping (:data:`BOOKKEEPING`),
    what this call created is removed (folders included) and an earlier run's
    ``run.json`` and ``config.yaml`` are put back as they were. Nothing that existed
    before is ever deleted, and once any checkpoint, history or other output was
    written everything stays, so the run can resume.
    """
    started = time.time()
    missing = []  # the folders this call creates, innermost first
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            break
        missing.append(folder)
    before = set(os.listdir(out_dir)) if out_dir.is_dir() else set()
    saved = {
        name: (out_dir / name).read_bytes()
        for name in (RUN_FILE, "config.yaml")
        if (out_dir / name).is_file()
    }
    try:
        yield
    except BaseException:
        after = set(os.listdir(out_dir)) if out_dir.is_dir() else set()
        new = [out_dir / name for name in sorted(after - before)]
        if any(_holds_work(p) for p in new) or _changed_since(out_dir, started):
            raise
        for path in new:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for name, content in saved.items():
            (out_dir / name).write_bytes(content)
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


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

    check_group_inference(options)
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
        changed = changed_defaults(config, out_dir)
        if changed:
            raise ConfigError(
                f"{out_dir} holds a finished {config.method.name} run of this config made "
                f"with other method defaults ({changed}): the code's defaults changed since "
                "it ran. Move or delete that folder to rerun it (nothing is overwritten)"
            )
        return json.loads((out_dir / "results.json").read_text())
    started = time.perf_counter()
    threads = apply_threads(config.train.threads)
    # Whatever can be checked without training is checked before anything is written.
    prepared = prepare_data(config)
    notes = split_warnings(prepared.table)
    method_cls = get_method(config.method.name)
    options = method_cls.resolve_options(config.method.options)
    if config.method.group_inference is not None:
        check_group_inference(config.method.group_inference)
    for note in notes:
        warnings.warn(note, UnspurWarning, stacklevel=2)
    table = prepared.table
    fingerprint = run_fingerprint(config)
    with _undo_on_early_failure(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out_dir / RUN_FILE,
            {"fingerprint": fingerprint, "finished": False, "inputs": run_inputs(config)},
        )
        atomic_write_text(out_dir / "config.yaml", dump_config(config))

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
            # A method's own record (FFR's training presets and lr search, CDB's plans).
            "method_record": next(
                (
                    h[method_cls.name]
                    for h in reversed(fit_result.history)
                    if isinstance(h, dict) and method_cls.name in h
                ),
                None,
            ),
            "definitions": DEFINITIONS,
            "data": {
                "group_counts": table.counts().reset_index().to_dict(orient="records"),
                "info": table.info,
            },
            "config": config.to_dict(),
            "method_options": options,
            "fingerprint": fingerprint,
            # The code that trained it (unspur.code_version): a finished run is found
            # again by its config, so a later reader can tell other code apart.
            "code_version": code_version(),
            "versions": library_versions(),
            "threads": threads,
            "warnings": notes,
            # This invocation plus the training that earlier (interrupted) ones checkpointed.
            "wall_seconds": time.perf_counter()
            - started
            + earlier_seconds(out_dir, context.stages),
        }
        atomic_write_json(out_dir / "results.json", results)
        atomic_write_json(
            out_dir / RUN_FILE,
            {"fingerprint": fingerprint, "finished": True, "inputs": run_inputs(config)},
        )
    return results
