"""Seeding without global side effects at construction time.

Each epoch reseeds from ``(seed, epoch)``, so a run resumed at an epoch boundary
continues with exactly the random numbers an uninterrupted run would have drawn.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
