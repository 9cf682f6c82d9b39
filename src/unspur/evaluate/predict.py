"""Batched inference over a :class:`GroupDataset`, in one pass over one DataLoader."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from unspur.data.dataset import GroupDataset
from unspur.evaluate.metrics import GroupMetrics, group_metrics


@dataclass
class Predictions:
    logits: np.ndarray
    y: np.ndarray
    g: np.ndarray
    index: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: GroupDataset,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
) -> Predictions:
    """Logits for every item, in dataset order (gathered across processes if distributed)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = next(model.parameters()).device
    if accelerator is not None:
        loader = accelerator.prepare(loader)
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "y": [], "g": [], "index": []}
    for x, y, g, index in loader:
        logits = model(x.to(device)).float()
        batch = {"logits": logits, "y": y.to(device), "g": g.to(device), "index": index.to(device)}
        if accelerator is not None:
            batch = accelerator.gather_for_metrics(batch)
        for key, value in batch.items():
            parts[key].append(value.cpu())
    model.train(was_training)
    merged = {k: torch.cat(v).numpy() for k, v in parts.items()}
    order = np.argsort(merged["index"], kind="stable")
    return Predictions(**{k: v[order] for k, v in merged.items()})


def evaluate_split(
    model: nn.Module,
    dataset: GroupDataset,
    train_group_counts: np.ndarray | None,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator=None,
) -> tuple[GroupMetrics, Predictions]:
    preds = predict(model, dataset, batch_size, num_workers, accelerator)
    table = dataset.table
    names = [table.group_name(g) for g in range(table.n_groups)]
    metrics = group_metrics(
        preds.predicted, preds.y, preds.g, table.n_groups, train_group_counts, names
    )
    return metrics, preds
