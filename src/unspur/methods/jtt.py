"""JTT: Just Train Twice (Liu et al., ICML 2021).

"Just Train Twice: Improving Group Robustness without Training Group Information".

Stage 1 (identification): train an ERM model for ``T`` epochs and keep the model of the
*last* epoch (no validation-based selection in this stage; the paper treats ``T`` as
the hyperparameter). The *error set* is the training samples this model misclassifies,
evaluated in eval mode with the eval transform (no augmentation), so the set does not
depend on a random crop.

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


@register_method
class JTT(Method):
    """Just Train Twice: up-sample what an early-stopped ERM model gets wrong.

    Options: ``identification_epochs`` (T, default 2) and ``lambda_up`` (default 50);
    the paper's per-dataset values are in the module docstring. Stage 1 runs in
    ``out_dir/jtt_identify`` with the run's train config except ``epochs=T`` and
    last-epoch selection; the error set, with precision/recall against the true
    bias-conflicting samples, goes to ``out_dir/jtt_identify/error_set.json``; stage 2
    runs in ``out_dir/jtt_final``.
    """

    name = "jtt"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    summary = "just train twice: retrain with the early ERM model's errors up-sampled"
    defaults = {"identification_epochs": 2, "lambda_up": 50}
    debug_options = {"identification_epochs": 1, "lambda_up": 5}

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        epochs = context.options["identification_epochs"]
        lambda_up = context.options["lambda_up"]
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"jtt option identification_epochs must be a positive integer, got {epochs!r}"
            )
        train_config = context.config.train
        identify = context.build_model()
        context.fit(
            identify,
            "jtt_identify",
            train_config=replace(train_config, epochs=epochs, selection="last"),
        )
        eval_view = with_transform(context.train, context.eval_transform)
        errors = error_set(
            identify, eval_view, train_config.eval_batch_size, train_config.num_workers
        )
        self._record(context, errors)
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
    def _record(context: RunContext, errors: np.ndarray) -> None:
        train = context.train
        is_error = np.zeros(len(train), dtype=bool)
        is_error[errors] = True
        y, g = train.y.numpy(), train.g.numpy()
        table = train.table
        report = {
            "n_train": len(train),
            "n_errors": int(len(errors)),
            "errors_per_group": np.bincount(g[is_error], minlength=table.n_groups).tolist(),
            "against_true_groups": precision_recall(
                is_error, true_minority(y, g, table.n_classes, table.n_attrs)
            ),
            "error_indices": errors.tolist(),
        }
        atomic_write_json(context.out_dir / "jtt_identify" / "error_set.json", report)
