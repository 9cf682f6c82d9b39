"""The one training loop every method runs through.

Methods differ in *what* they minimise (an :class:`Objective`), *which samples* they
draw (sampler weights), and *which parameters* they update (e.g. only the head); the
loop owns everything else: optimisation, per-epoch validation, model selection,
checkpoints and resume, seeding, progress and device placement (through accelerate).

On disk, in ``out_dir``:
  ``checkpoints/last/``  model + trainer state after the last finished epoch
  ``best/``              the selected model (``model.safetensors`` + ``model.json``)
  ``history.json``       per-epoch training loss and validation metrics
  ``timing.json``        seconds spent in this stage, summed over invocations
A restart with the same arguments resumes after the last finished epoch and, because
every epoch reseeds from ``(seed, epoch)``, ends with the same weights as an
uninterrupted run. The checkpoint carries the seconds spent so far, so the time a
resumed stage reports is the sum over its invocations (the work after an interrupted
invocation's last checkpoint is redone, so it is not counted twice).

Output: one line at once saying what is trained (images, groups, device, threads), a
tqdm bar per epoch on a terminal (``train.progress``; a plain progress line every
:data:`PROGRESS_EVERY` seconds when stderr is not a terminal), and a line per epoch
with its time and an estimate of the time left.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from unspur.config import TrainConfig
from unspur.data.dataset import GroupDataset
from unspur.errors import CheckpointError, ConfigError, UnspurError
from unspur.evaluate.metrics import GroupMetrics
from unspur.evaluate.predict import evaluate_split
from unspur.io import atomic_dir, atomic_write_json, recover_dir
from unspur.models.checkpoint import load_weights, save_checkpoint
from unspur.train.objectives import Objective
from unspur.train.seeding import epoch_seed, seed_everything

SELECTION_DESCRIPTIONS = {
    "worst_group": (
        "epoch with the highest validation worst-group accuracy "
        "(ties broken by validation balanced accuracy)"
    ),
    "average": "epoch with the highest validation accuracy (no group labels used)",
    "last": "the last epoch",
}


#: Seconds between plain progress lines within an epoch when stderr is not a terminal.
PROGRESS_EVERY = 30.0
TIMING_FILE = "timing.json"


@dataclass
class FitResult:
    best_epoch: int
    selection: str
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: dict[str, float] | None = None
    threads: int | None = None  # torch CPU threads the stage ran with
    seconds: float = 0.0  # wall seconds in this stage, summed over invocations
    earlier_seconds: float = 0.0  # the part of ``seconds`` from earlier invocations


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), else the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(requested: int | None) -> int:
    """``train.threads`` as a count: ``None`` is :func:`available_cores`, capped by the
    threads torch already uses (``OMP_NUM_THREADS`` or an earlier ``set_num_threads``)."""
    if requested is None:
        return max(1, min(available_cores(), torch.get_num_threads()))
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(
            f"train.threads={requested!r} must be a whole number >= 1 (or null for the "
            "cores this process may use); e.g. --set train.threads=1"
        )
    return requested


def apply_threads(requested: int | None) -> int:
    """Set torch's CPU threads from ``train.threads``; return the count now in use."""
    threads = resolve_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def earlier_seconds(run_dir: str | Path, stages: Iterable[str]) -> float:
    """Seconds that ``stages`` of a run spent in earlier invocations (from timing.json).

    Added to an invocation's own wall time, this gives a resumed run's total.
    """
    total = 0.0
    for stage in stages:
        try:
            timing = json.loads((Path(run_dir) / stage / TIMING_FILE).read_text())
            total += float(timing.get("earlier_seconds", 0.0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return total


def resolve_selection(rule: str, val_group_labels: bool, has_val: bool) -> str:
    """``auto`` means worst-group when validation group labels may be used."""
    if not has_val:
        return "last"
    if rule == "auto":
        return "worst_group" if val_group_labels else "average"
    if rule == "worst_group" and not val_group_labels:
        raise UnspurError(
            "train.selection=worst_group needs validation group labels, but this method "
            "runs without them; use selection=average or auto"
        )
    return rule


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UnspurError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return Accelerator(cpu=cpu, mixed_precision=config.mixed_precision)


def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UnspurError("nothing to train: every parameter is frozen")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    return None


# Weight of the tie-break: below any real difference in worst-group accuracy (one sample
# of a group of a million), so it only orders epochs whose worst group ties — common
# early on, when the worst group is at 0% and the first epoch would otherwise win.
_TIE_BREAK = 1e-7


def selection_score(metrics: Mapping[str, float], rule: str) -> float:
    """The number model selection maximises under ``rule`` (``worst_group`` or not).

    Also for choosing between candidates (hyperparameters) on validation metrics, so
    that ties at a worst group of 0% are broken by balanced accuracy there too.
    """
    if rule == "worst_group":
        return metrics["worst_group_accuracy"] + _TIE_BREAK * metrics["balanced_accuracy"]
    return metrics["accuracy"]


def candidate_rule(selection: str) -> str:
    """The rule for choosing between hyperparameter candidates on validation, given the
    run's ``train.selection``: plain accuracy under ``average``, worst-group otherwise."""
    return "average" if selection == "average" else "worst_group"


def candidate_score(result: FitResult, rule: str) -> float:
    """A trained candidate's :func:`selection_score` on its best validation metrics
    (``-inf`` when it recorded none, so that any validated candidate wins over it)."""
    return selection_score(result.best_val, rule) if result.best_val else -math.inf


def _score(metrics: GroupMetrics, rule: str) -> float:
    return selection_score(metrics.headline(), rule)


def fit(
    model: nn.Module,
    train_set: GroupDataset,
    val_set: GroupDataset | None,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    objective: Objective | None = None,
    sample_weights: torch.Tensor | np.ndarray | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
    val_group_labels: bool = True,
    train_group_counts: np.ndarray | None = None,
    description: str = "train",
) -> FitResult:
    """Train ``model`` in place and leave the selected weights loaded in it.

    ``sample_weights`` (one per training item) switches to sampling with replacement in
    proportion to them; ``parameters`` restricts the update (last-layer retraining);
    ``train_group_counts`` weights the validation "average accuracy".
    """
    invoked = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = apply_threads(config.threads)
    objective = objective or Objective()
    rule = resolve_selection(config.selection, val_group_labels, val_set is not None)
    if train_group_counts is None:
        train_group_counts = train_set.group_counts().numpy()
    seed_everything(seed)

    accelerator = make_accelerator(config)
    optimizer = make_optimizer(parameters if parameters is not None else model.parameters(), config)
    scheduler = make_scheduler(optimizer, config)

    generator = torch.Generator()
    if sample_weights is not None:
        weights = torch.as_tensor(np.asarray(sample_weights), dtype=torch.double)
        if (
            len(weights) != len(train_set)
            or not torch.isfinite(weights).all()
            or weights.sum() <= 0
        ):
            raise UnspurError("sample_weights must be finite, non-negative, one per training item")
        sampler = WeightedRandomSampler(
            weights, len(train_set), replacement=True, generator=generator
        )
    else:
        sampler = RandomSampler(train_set, generator=generator)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=False,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    objective.bind_processes(accelerator)

    state = _TrainerState(out_dir, description)
    start_epoch, best_score, best_epoch, history, earlier = 0, -math.inf, -1, [], 0.0
    if state.exists():
        resumed = state.load(accelerator.unwrap_model(model), optimizer, scheduler, objective)
        start_epoch, best_score, best_epoch, history, earlier = resumed
        accelerator.print(f"[{description}] resuming after epoch {start_epoch} from {state.path}")
    if start_epoch < config.epochs:
        accelerator.print(
            _plan(description, train_set, val_set, config, len(loader), accelerator, threads)
        )

    if config.epochs == 0 and not (out_dir / "best" / "model.json").exists():
        _save_best(accelerator, model, out_dir, {"epoch": 0})

    curves = _CurveLogger(
        out_dir / "tensorboard", config.tensorboard and accelerator.is_main_process
    )
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        generator.manual_seed(epoch_seed(seed, epoch))
        torch.manual_seed(epoch_seed(seed, epoch) + 1)
        model.train()
        total, count, correct = 0.0, 0, 0
        progress = _progress(
            loader,
            f"[{description}] epoch {epoch + 1}/{config.epochs}",
            config,
            accelerator.is_main_process,
        )
        for x, y, g, index in progress:
            with accelerator.autocast():
                loss, logits = objective.step(model, x, y, g, index)
            if not torch.isfinite(loss):
                raise UnspurError(
                    f"[{description}] loss became {loss.item()} at epoch {epoch + 1}; "
                    "lower train.lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            correct += int((logits.argmax(1) == y).sum())
        if scheduler is not None:
            scheduler.step()
        objective.on_epoch_end(epoch)

        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": total / max(count, 1),
            "train_accuracy": correct / max(count, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        score = float(epoch)
        if val_set is not None:
            metrics, _ = evaluate_split(
                accelerator.unwrap_model(model),
                val_set,
                train_group_counts,
                config.eval_batch_size,
                config.num_workers,
            )
            record["val"] = metrics.headline()
            score = _score(metrics, rule) if rule != "last" else float(epoch)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            _save_best(accelerator, model, out_dir, {"epoch": epoch + 1, "selection": rule})
        done = [h["seconds"] for h in history[start_epoch:]]
        left = (config.epochs - epoch - 1) * sum(done) / len(done)
        accelerator.print(_summary(description, record, config.epochs, left))
        curves.log(record)
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
            state.save(
                accelerator,
                model,
                optimizer,
                scheduler,
                objective,
                epoch + 1,
                best_score,
                best_epoch,
                history,
                earlier + time.perf_counter() - invoked,
            )
        atomic_write_json(out_dir / "history.json", history)

    curves.close()
    unwrapped = accelerator.unwrap_model(model)
    try:
        load_weights(unwrapped, out_dir / "best")
    except CheckpointError as exc:
        raise CheckpointError(
            f"cannot load the selected model of stage {description!r}: {exc}. Delete "
            f"{out_dir} to train that stage again, or use a new --out directory"
        ) from None
    best_val = next((h.get("val") for h in history if h["epoch"] == best_epoch), None)
    seconds = earlier + time.perf_counter() - invoked
    if accelerator.is_main_process:
        atomic_write_json(
            out_dir / TIMING_FILE,
            {"seconds": seconds, "earlier_seconds": earlier, "threads": threads},
        )
    return FitResult(
        best_epoch=max(best_epoch, 0),
        selection=rule,
        history=history,
        best_val=best_val,
        threads=threads,
        seconds=seconds,
        earlier_seconds=earlier,
    )


class _CurveLogger:
    """Optional TensorBoard scalars: training loss/accuracy, lr and validation metrics."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UnspurError(
                "train.tensorboard=true needs the tensorboard package: "
                "pip install tensorboard (or set train.tensorboard=false)"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["epoch"]
        for key in ("train_loss", "train_accuracy", "lr"):
            self.writer.add_scalar(f"train/{key}", record[key], step)
        for key, value in record.get("val", {}).items():
            self.writer.add_scalar(f"val/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plan(description, train_set, val_set, config, batches, accelerator, threads) -> str:
    """The line printed before the first epoch: what is trained, where, how."""
    val = f", validating on {len(val_set)}" if val_set is not None else ", no validation split"
    groups = getattr(train_set, "n_groups", "?")
    classes = getattr(train_set, "n_classes", "?")
    return (
        f"[{description}] training on {len(train_set)} images ({groups} groups, "
        f"{classes} classes){val}; {config.epochs} epoch(s) of {batches} "
        f"batch(es) of {config.batch_size}; device {accelerator.device}, {threads} torch "
        f"thread(s) (train.threads)"
    )


def _progress(loader: DataLoader, desc: str, config: TrainConfig, main_process: bool = True):
    """A tqdm bar on a terminal; elsewhere (logs, pipes) a line every PROGRESS_EVERY s."""
    if not config.progress or not main_process:
        return loader
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(loader, desc=desc, leave=False)
    return _progress_lines(loader, desc)


def _progress_lines(loader: DataLoader, desc: str):
    started = last = time.perf_counter()
    total = len(loader)
    for done, batch in enumerate(loader, 1):
        yield batch
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY and done < total:
            last = now
            left = (now - started) / done * (total - done)
            print(
                f"{desc}: {done}/{total} batches, {_duration(now - started)}, "
                f"~{_duration(left)} left in this epoch",
                file=sys.stderr,
                flush=True,
            )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _summary(
    description: str, record: dict[str, Any], epochs: int | None = None, left: float = 0.0
) -> str:
    of = f"/{epochs}" if epochs else ""
    text = (
        f"[{description}] epoch {record['epoch']}{of}: loss {record['train_loss']:.4f} "
        f"train acc {100 * record['train_accuracy']:.1f}%"
    )
    if "val" in record:
        val = record["val"]
        text += (
            f" | val worst-group {100 * val['worst_group_accuracy']:.1f}% "
            f"acc {100 * val['accuracy']:.1f}%"
        )
    if "seconds" in record:
        text += f" | {_duration(record['seconds'])}"
        if epochs and record["epoch"] < epochs:
            text += f", ~{_duration(left)} left"
    return text


def _save_best(accelerator, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model), out_dir / "best", extra=extra)
    accelerator.wait_for_everyone()


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to retry
    with ``weights_only=False`` (that would run whatever code the file holds)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a tensor-only PyTorch file: torch.load(weights_only=True) refused it"
    if isinstance(exc, (RuntimeError, zipfile.BadZipFile, EOFError)):
        return "truncated or corrupt archive"
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:200]}" if first else type(exc).__name__


class _TrainerState:
    """Model, optimizer, scheduler and objective state after an epoch, saved atomically."""

    def __init__(self, out_dir: Path, description: str = "train") -> None:
        self.path = out_dir / "checkpoints" / "last"
        self.stage = description

    def exists(self) -> bool:
        recover_dir(self.path)
        return (self.path / "trainer.pt").is_file()

    def save(
        self,
        accelerator,
        model,
        optimizer,
        scheduler,
        objective,
        epoch,
        best_score,
        best_epoch,
        history,
        seconds=0.0,
    ) -> None:
        if accelerator.is_main_process:
            with atomic_dir(self.path) as scratch:
                save_checkpoint(accelerator.unwrap_model(model), scratch)
                torch.save(
                    {
                        "epoch": epoch,
                        "best_score": best_score,
                        "best_epoch": best_epoch,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "objective": objective.state_dict(),
                        "history": json.dumps(history),
                        "seconds": float(seconds),
                    },
                    scratch / "trainer.pt",
                )
        accelerator.wait_for_everyone()

    def _restart_hint(self) -> str:
        return (
            f"To restart stage {self.stage!r} from its first epoch, delete {self.path} "
            "(the run's other stages are kept) and run the same command again; or use a "
            "new --out directory"
        )

    def load(self, model, optimizer, scheduler, objective):
        """Restore a checkpoint; damaged or foreign files fail with how to restart."""
        trainer = self.path / "trainer.pt"
        try:
            # weights_only: tensors and plain containers, never arbitrary objects.
            state = torch.load(trainer, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            EOFError,
            OSError,
            RuntimeError,
            ValueError,
            AttributeError,
            TypeError,
            IndexError,
        ) as exc:
            raise CheckpointError(
                f"cannot resume from {trainer}: the file is damaged or not an unspur trainer "
                f"checkpoint ({_load_failure(exc)}). {self._restart_hint()}"
            ) from None
        needed = ("epoch", "best_score", "best_epoch", "optimizer", "objective", "history")
        if not isinstance(state, dict) or any(key not in state for key in needed):
            raise CheckpointError(
                f"cannot resume from {trainer}: it lacks the trainer state unspur writes "
                f"({', '.join(needed)}). {self._restart_hint()}"
            )
        try:
            load_weights(model, self.path)
        except CheckpointError as exc:
            raise CheckpointError(
                f"cannot resume stage {self.stage!r}: {exc}. {self._restart_hint()}"
            ) from None
        try:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            objective.load_state_dict(state["objective"])
            history = json.loads(state["history"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"cannot resume from {self.path}: {exc}. It was written by a different "
                f"model or configuration. {self._restart_hint()}"
            ) from None
        # Checkpoints from before the seconds were stored: the epochs' own times.
        seconds = state.get("seconds", sum(h.get("seconds", 0.0) for h in history))
        return (
            state["epoch"],
            state["best_score"],
            state["best_epoch"],
            history,
            float(seconds),
        )
