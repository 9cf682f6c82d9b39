"""The training loop: selection, resume after interruption, sampling, frozen parameters."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from unspur.config import TrainConfig
from unspur.data.dataset import GroupDataset
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.data.transforms import Compose
from unspur.models.factory import build_model
from unspur.models.restore import load_checkpoint
from unspur.train.loop import fit, resolve_selection
from unspur.train.objectives import Objective


def tiny_table(n: int = 64, seed: int = 0) -> GroupTable:
    """Colour decides y (red vs blue); a bright patch is the attribute."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = rng.integers(0, 2, n)
    images = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    images[y == 0, :, :, 0] = 200
    images[y == 1, :, :, 2] = 200
    images[a == 1, :2, :2, 1] = 255
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    store = ArrayStore(images)
    frame = pd.DataFrame(
        {"filename": [store.filename(i) for i in range(n)], "y": y, "a": a, "split": split}
    )
    return GroupTable(frame, store, ["red", "blue"], ["plain", "patch"], name="tiny")


def datasets():
    table = tiny_table()
    transform = Compose([], mean=None, std=None)
    return GroupDataset(table.split("train"), transform), GroupDataset(
        table.split("val"), transform
    )


def config(**overrides) -> TrainConfig:
    values = dict(epochs=4, batch_size=8, lr=0.05, progress=False, scheduler="cosine")
    values.update(overrides)
    return TrainConfig(**values)


def model():
    torch.manual_seed(0)
    return build_model("small_cnn", 2, widths=[8, 8])


class InterruptAt(Objective):
    """Cross-entropy that raises KeyboardInterrupt at a given call, like Ctrl-C."""

    def __init__(self, calls: int) -> None:
        self.remaining = calls

    def __call__(self, logits, y, g, index):
        self.remaining -= 1
        if self.remaining < 0:
            raise KeyboardInterrupt
        return super().__call__(logits, y, g, index)


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    train, val = datasets()
    reference = model()
    fit(reference, train, val, config(), tmp_path / "once", seed=1)

    resumed = model()
    with pytest.raises(KeyboardInterrupt):
        # 4 batches per epoch: interrupt in the middle of the third epoch.
        fit(resumed, train, val, config(), tmp_path / "twice", seed=1, objective=InterruptAt(10))
    history = json.loads((tmp_path / "twice" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    resumed = model()
    result = fit(resumed, train, val, config(), tmp_path / "twice", seed=1)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_selection_rule_and_best_checkpoint(tmp_path):
    train, val = datasets()
    net = model()
    result = fit(net, train, val, config(epochs=3), tmp_path, seed=0)
    assert result.selection == "worst_group"
    scores = [h["val"]["worst_group_accuracy"] for h in result.history]
    assert result.best_epoch == int(np.argmax(scores)) + 1
    saved = load_checkpoint(tmp_path / "best")
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved.state_dict()[key])
    assert resolve_selection("auto", False, True) == "average"
    assert resolve_selection("auto", True, False) == "last"


def test_frozen_backbone_only_head_changes(tmp_path):
    train, val = datasets()
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.freeze_backbone()
    fit(net, train, val, config(epochs=1), tmp_path, parameters=net.head.parameters())
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("head", "fc")) for k in changed), changed


def test_sample_weights_draw_only_weighted_items(tmp_path):
    train, val = datasets()
    seen: list[int] = []

    class Record(Objective):
        def __call__(self, logits, y, g, index):
            seen.extend(index.tolist())
            return super().__call__(logits, y, g, index)

    weights = np.zeros(len(train))
    weights[:3] = 1.0
    fit(model(), train, val, config(epochs=1), tmp_path, objective=Record(), sample_weights=weights)
    assert len(seen) == len(train) and set(seen) <= {0, 1, 2}


def test_diverging_loss_is_reported(tmp_path):
    train, val = datasets()

    class Bad(Objective):
        def __call__(self, logits, y, g, index):
            return logits.sum() * float("nan")

    from unspur.errors import UnspurError

    with pytest.raises(UnspurError, match="lower train.lr"):
        fit(model(), train, val, config(epochs=1), tmp_path, objective=Bad())


def test_pipeline_runs_are_reproducible(tmp_path):
    from unspur.config import load_config
    from unspur.pipeline import run

    settings = [
        "data.options.n_train=120",
        "data.options.n_val=40",
        "data.options.n_test=40",
        "data.options.size=16",
        "data.image_size=16",
        "model.options.widths=[8,8]",
        "train.epochs=1",
        "train.progress=false",
    ]
    first = run(load_config(None, settings), tmp_path / "a")
    torch.manual_seed(12345)  # unrelated global state must not matter
    second = run(load_config(None, settings), tmp_path / "b")
    assert first["metrics"] == second["metrics"]


def test_tensorboard_curves_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    train, val = datasets()
    fit(model(), train, val, config(epochs=2, tensorboard=True), tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_worst_group_ties_are_broken_by_balanced_accuracy():
    from unspur.evaluate.metrics import GroupMetrics
    from unspur.train.loop import _score

    def metrics(worst: float, balanced: float) -> GroupMetrics:
        return GroupMetrics(worst, 0, balanced, balanced, balanced, 10, [])

    assert _score(metrics(0.0, 0.7), "worst_group") > _score(metrics(0.0, 0.5), "worst_group")
    # A real worst-group difference always outranks any balanced accuracy.
    assert _score(metrics(0.001, 0.0), "worst_group") > _score(metrics(0.0, 1.0), "worst_group")
    assert _score(metrics(0.0, 0.7), "average") == 0.7
