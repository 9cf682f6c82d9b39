"""JTT: Just Train Twice (Liu et al., ICML 2021).

"Just Train Twice: Improving Group Robustness without Training Group Information".

Stage 1 (identification): train an ERM model for ``T`` epochs and keep the model of the
*last* epoch (no validation-based selection in this stage; the paper treats ``T`` as
the hyperparameter). The *error set* is the training samples this model misclassifies.
Two ways to read "misclassifies" (option ``error_pass``):

- ``eval`` (default): one pass of the model after ``T`` epochs over the training set in
  eval mode with the eval transform (no augmentation, BatchNorm on its running
  statistics). This is the paper's definition (Algorithm 1: the error set is the
  training examples misclassified by the identification model f_id trained for ``T``
  epochs, one fixed model), and the set does not depend on a random crop or on the
  order of the batches; hence the default.
- ``online``: the official code's set. ``anniesch/jtt``'s ``train.py`` logs, during
  every training epoch, the prediction of each sample made in train mode on its
  training batch (before that batch's update; augmentation if enabled, BatchNorm on
  batch statistics), and ``process_training.py --final_epoch T`` reads the log of epoch
  index ``T`` (0-based, ``output_train_epoch_{T}.csv``), i.e. the pass that starts after
  ``T`` full epochs. ``online`` does exactly that: the identification stage trains
  ``T + 1`` epochs and records those predictions during the last one
  (:class:`OnlinePredictions`); the stage is ``jtt_identify_online``.

Stage 2 (final model): train a *new* model (``context.build_model()``) with ERM on the
training set with the error set up-sampled by ``lambda_up``, selected on validation by
the run's rule (worst-group accuracy with validation group labels: ✓; no training group
labels are read).

Paper defaults (Table 5 of the paper / the official ``anniesch/jtt`` scripts):

============== ====== ==========
dataset        T      lambda_up
============== ====== ==========
Waterbirds     60     100
CelebA         1      50
MultiNLI       2      6
CivilComments  2      6
============== ====== ==========

Generic defaults here: ``identification_epochs=2`` (the median of the four papers'
values; the point is an early-stopped, still-biased model) and ``lambda_up=50`` (the
CelebA value, between the two image datasets'). Set both per dataset in the configs.

Up-sampling is explicit duplication, as the paper and the official code do: the
official ``run_expt.py`` trains on ``ConcatDataset([train, Subset(train, error_set *
up_weight)])``, so an error-set sample appears ``1 + lambda_up`` times per epoch (the
paper's text says "lambda_up times"; we follow the code that produced its numbers).
:class:`UpsampledDataset` builds this list; each epoch is one shuffled pass over it.
Items are ``(x, y, g, position)`` where ``position`` indexes the *up-sampled* dataset
(what the training loop sees); ``source_index[position]`` maps back to the original
training row, a row of its ``table`` (the source table: one row per image).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from unspur.data.dataset import GroupDataset, GroupItems
from unspur.errors import ConfigError
from unspur.io import atomic_write_json
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.train.features import with_transform
from unspur.train.group_inference import misclassified, precision_recall, true_minority
from unspur.train.loop import FitResult
from unspur.train.objectives import Objective

logger = logging.getLogger(__name__)


class UpsampledDataset(GroupItems, Dataset):
    """A dataset whose epoch lists some rows several times.

    ``positions[i]`` is the row of ``base`` behind item ``i``; items are
    ``(x, y, g, i)``. ``y``, ``g``, ``a`` and ``group_counts()`` describe the
    up-sampled list (duplicates counted); ``table`` is the source table and
    ``source_index`` maps items to its rows.
    """

    def __init__(self, base: GroupDataset, positions: np.ndarray) -> None:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(base)):
            raise ConfigError("UpsampledDataset positions fall outside the dataset")
        self.base = base
        self.source_index = positions
        index = torch.as_tensor(positions)
        self.y = base.y[index]
        self.g = base.g[index]
        self.a = base.a[index]
        # The canonical table allows one row per image, so ``table`` is the source
        # table (group names, class and attribute names); ``source_index`` maps items
        # to its rows.
        self.table = base.table
        self.transform = base.transform
        self.filenames = [base.filenames[i] for i in positions]

    def __len__(self) -> int:
        return len(self.source_index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        x, y, g, _ = self.base[int(self.source_index[index])]
        return x, y, g, index

    def raw(self, index: int):
        return self.base.raw(int(self.source_index[index]))


def upsample(dataset: GroupDataset, error_indices: np.ndarray, lambda_up: int) -> UpsampledDataset:
    """JTT's up-sampled set: every row once, plus ``lambda_up`` extra copies of the
    error set (official ``run_expt.py``); length ``N + lambda_up * |E|``."""
    if isinstance(lambda_up, bool) or not isinstance(lambda_up, int) or lambda_up < 0:
        raise ConfigError(f"jtt option lambda_up must be a non-negative integer, got {lambda_up!r}")
    error_indices = np.asarray(error_indices, dtype=np.int64)
    positions = np.concatenate(
        [np.arange(len(dataset), dtype=np.int64), np.tile(error_indices, lambda_up)]
    )
    return UpsampledDataset(dataset, positions)


def error_set(
    model: nn.Module, dataset: Any, batch_size: int = 256, num_workers: int = 0
) -> np.ndarray:
    """Indices of the rows ``model`` misclassifies (pass the eval-transform dataset)."""
    return np.flatnonzero(misclassified(model, dataset, batch_size, num_workers))


ERROR_PASSES = ("eval", "online")


class OnlinePredictions(Objective):
    """Cross-entropy (ERM) that records each sample's training-time prediction.

    During epoch index ``record_epoch`` (0-based: the pass after ``record_epoch`` full
    epochs) the argmax of the logits the loop computes for the batch, in train mode and
    before the batch's update, is stored per dataset index, as the official JTT
    ``train.py`` logs it. The record is part of the objective's state, so a finished or
    resumed stage still has it.
    """

    name = "erm_online_predictions"

    def __init__(self, n: int, record_epoch: int) -> None:
        self.record_epoch = int(record_epoch)
        self.epoch = 0
        self.predicted = torch.full((n,), -1, dtype=torch.long)

    def step(self, model, x, y, g, index):
        logits = model(x)
        if self.epoch == self.record_epoch:
            rows = self.gather(index.detach()).cpu().long()
            self.predicted[rows] = self.gather(logits.detach().argmax(1)).cpu().long()
        return self(logits, y, g, index), logits

    def on_epoch_end(self, epoch: int) -> None:
        self.epoch = epoch + 1

    def errors(self, y: torch.Tensor) -> np.ndarray:
        """Indices whose recorded prediction is wrong; every sample must have one."""
        if (self.predicted < 0).any():
            raise ConfigError(
                f"JTT online error set: {int((self.predicted < 0).sum())} training samples "
                f"got no prediction in epoch {self.record_epoch + 1}"
            )
        return np.flatnonzero((self.predicted != y.cpu().long()).numpy())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "predicted": self.predicted.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        predicted = state["predicted"]
        if predicted.shape != self.predicted.shape:
            raise ValueError("JTT online predictions saved for another training set")
        self.epoch = int(state["epoch"])
        self.predicted = predicted.clone().long()


@register_method
class JTT(Method):
    """Just Train Twice: up-sample what an early-stopped ERM model gets wrong.

    Options: ``identification_epochs`` (T, default 2), ``lambda_up`` (default 50) and
    ``error_pass`` (``eval``, the paper's fixed model, default; ``online``, the official
    code's train-mode predictions during epoch index T); the paper's per-dataset values
    are in the module docstring. Stage 1 runs in ``out_dir/jtt_identify`` (``online``:
    ``jtt_identify_online``, T + 1 epochs) with the run's train config except the
    epochs and last-epoch selection; the error set, with precision/recall against the
    true bias-conflicting samples and the pass that made it, goes to
    ``error_set.json`` in that folder; stage 2 runs in ``out_dir/jtt_final``.
    ``train.epochs`` sets stage 2 only, and one stage-2 epoch is a pass over
    ``N + lambda_up * |E|`` items (each error-set image ``1 + lambda_up`` times), so it
    costs more than an ERM epoch.
    """

    name = "jtt"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    summary = (
        "just train twice: retrain with the early ERM model's errors up-sampled. "
        "train.epochs sets stage 2 only (stage 1: identification_epochs); a stage-2 "
        "epoch draws N + lambda_up * |E| items (N training images, E the error set)"
    )
    defaults = {"identification_epochs": 2, "lambda_up": 50, "error_pass": "eval"}
    debug_options = {"identification_epochs": 1, "lambda_up": 5}

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        epochs = context.options["identification_epochs"]
        lambda_up = context.options["lambda_up"]
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"jtt option identification_epochs must be a positive integer, got {epochs!r}"
            )
        error_pass = context.options["error_pass"]
        if error_pass not in ERROR_PASSES:
            raise ConfigError(
                f"jtt option error_pass={error_pass!r} is not one of {', '.join(ERROR_PASSES)}"
            )
        train_config = context.config.train
        identify = context.build_model()
        if error_pass == "online":
            stage = "jtt_identify_online"
            online = OnlinePredictions(len(context.train), record_epoch=epochs)
            context.fit(
                identify,
                stage,
                train_config=replace(train_config, epochs=epochs + 1, selection="last"),
                objective=online,
            )
            errors = online.errors(context.train.y)
        else:
            stage = "jtt_identify"
            context.fit(
                identify,
                stage,
                train_config=replace(train_config, epochs=epochs, selection="last"),
            )
            eval_view = with_transform(context.train, context.eval_transform)
            errors = error_set(
                identify, eval_view, train_config.eval_batch_size, train_config.num_workers
            )
        self._record(context, errors, stage, error_pass)
        if len(errors) == 0:
            logger.warning(
                "JTT: the identification model makes no training error after %d epoch(s); "
                "stage 2 is plain ERM. Lower identification_epochs.",
                epochs,
            )
        upsampled = upsample(context.train, errors, lambda_up)
        model = context.build_model()
        return model, context.fit(model, "jtt_final", train=upsampled)

    @staticmethod
    def _record(context: RunContext, errors: np.ndarray, stage: str, error_pass: str) -> None:
        train = context.train
        is_error = np.zeros(len(train), dtype=bool)
        is_error[errors] = True
        y, g = train.y.numpy(), train.g.numpy()
        table = train.table
        report = {
            "error_pass": error_pass,
            "n_train": len(train),
            "n_errors": int(len(errors)),
            "errors_per_group": np.bincount(g[is_error], minlength=table.n_groups).tolist(),
            "against_true_groups": precision_recall(
                is_error, true_minority(y, g, table.n_classes, table.n_attrs)
            ),
            "error_indices": errors.tolist(),
        }
        atomic_write_json(context.out_dir / stage / "error_set.json", report)
