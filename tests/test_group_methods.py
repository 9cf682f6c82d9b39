"""GroupDRO, balancing weights, GCE, SupCon and LfF on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from unspur.config import TrainConfig
from unspur.data.dataset import GroupDataset
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.data.transforms import Compose
from unspur.errors import ConfigError
from unspur.methods.lff import LfFPair
from unspur.models.checkpoint import save_checkpoint
from unspur.models.factory import build_model
from unspur.models.restore import load_checkpoint
from unspur.train.group_objectives import (
    GroupDROObjective,
    LfFObjective,
    SupConObjective,
    WeightedCEObjective,
)
from unspur.train.loop import fit
from unspur.train.losses import (
    generalized_cross_entropy,
    supervised_contrastive_loss,
    weighted_cross_entropy,
)
from unspur.train.sampling import (
    balanced_subsample_indices,
    class_balanced_weights,
    group_balanced_weights,
    inverse_count_weights,
)


def batch_with_hard_group(hard: int = 0, n_groups: int = 4, per_group: int = 5):
    """Logits that are right with margin 4 for every group but ``hard`` (wrong by 4)."""
    g = torch.arange(n_groups).repeat_interleave(per_group)
    y = torch.zeros_like(g)
    logits = torch.zeros(len(g), 2)
    logits[:, 0] = torch.where(g == hard, -4.0, 4.0)
    return logits, y, g, torch.arange(len(g))


# ------------------------------------------------------------------------ GroupDRO
def test_groupdro_q_moves_to_the_high_loss_group_and_sums_to_one():
    objective = GroupDROObjective(4, [10, 10, 10, 10], eta=0.1)
    logits, y, g, index = batch_with_hard_group(hard=2)
    previous = objective.q.clone()
    for _ in range(20):
        objective(logits, y, g, index)
        assert torch.isclose(objective.q.sum(), torch.tensor(1.0))
        assert objective.q[2] > previous[2]
        previous = objective.q.clone()
    assert int(objective.q.argmax()) == 2 and objective.q[2] > 0.9


def test_groupdro_step_matches_algorithm_1():
    eta = 0.5
    objective = GroupDROObjective(3, [4, 4, 4], eta=eta)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])
    y = torch.tensor([0, 0, 1, 0])
    g = torch.tensor([0, 0, 1, 1])  # group 2 absent from the batch
    loss = objective(logits, y, g, torch.arange(4))
    ce = F.cross_entropy(logits, y, reduction="none")
    group_loss = torch.stack([ce[:2].mean(), ce[2:].mean(), torch.tensor(0.0)])
    q = torch.full((3,), 1 / 3) * torch.exp(eta * group_loss)
    q = q / q.sum()
    assert torch.allclose(objective.q, q)
    assert torch.isclose(loss, (q * group_loss).sum())


def test_groupdro_adjustment_raises_small_groups_weight():
    # Equal losses everywhere: without C the weights stay uniform; with C the group
    # with 10 training samples gains weight over the one with 1000.
    logits = torch.zeros(4, 2)
    y = torch.zeros(4, dtype=torch.long)
    g = torch.tensor([0, 0, 1, 1])
    plain = GroupDROObjective(2, [1000, 10], eta=0.1, adjustment=0.0)
    adjusted = GroupDROObjective(2, [1000, 10], eta=0.1, adjustment=2.0)
    for _ in range(10):
        plain(logits, y, g, torch.arange(4))
        adjusted(logits, y, g, torch.arange(4))
    assert torch.allclose(plain.q, torch.tensor([0.5, 0.5]))
    assert adjusted.q[1] > adjusted.q[0]
    expected = torch.softmax(10 * 0.1 * (2.0 / torch.tensor([1000.0, 10.0]).sqrt()), 0)
    assert torch.allclose(adjusted.q, expected, atol=1e-6)


def test_groupdro_state_round_trip_and_validation():
    objective = GroupDROObjective(4, [5, 5, 5, 5], eta=0.3)
    logits, y, g, index = batch_with_hard_group(hard=1)
    for _ in range(3):
        objective(logits, y, g, index)
    restored = GroupDROObjective(4, [5, 5, 5, 5], eta=0.3)
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.q, objective.q)
    assert torch.equal(restored(logits, y, g, index), objective(logits, y, g, index))
    with pytest.raises(ValueError):
        GroupDROObjective(3, [5, 5, 5]).load_state_dict(objective.state_dict())
    with pytest.raises(ConfigError):
        GroupDROObjective(2, [5, 5], eta=0.0)
    with pytest.raises(ConfigError):
        GroupDROObjective(2, [5, 5], adjustment=-1.0)


def test_groupdro_empty_training_group_gets_no_infinite_adjustment():
    objective = GroupDROObjective(3, [10, 4, 0], eta=0.1, adjustment=1.0)
    logits, y, g, index = batch_with_hard_group(hard=0, n_groups=2)
    objective(logits, y, g, index)
    assert torch.isfinite(objective.q).all() and objective.adjustment[2] == 0


# ------------------------------------------------------------------ balancing weights
def test_balanced_sampling_weights_exact():
    g = torch.tensor([0, 0, 0, 1, 2, 2])  # group 3 is empty
    weights = group_balanced_weights(g, 4)
    assert torch.allclose(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5]).double())
    assert torch.allclose(
        torch.bincount(g, weights=weights, minlength=4).float(), torch.tensor([1.0, 1, 1, 0])
    )
    y = np.array([1, 1, 0, 1])
    assert torch.allclose(
        class_balanced_weights(y, 2), torch.tensor([1 / 3, 1 / 3, 1.0, 1 / 3]).double()
    )
    with pytest.raises(ConfigError):
        group_balanced_weights(torch.tensor([0, 5]), 4)


def test_reweighting_weights_exact_and_objective():
    weights = inverse_count_weights([3, 1, 2, 0])
    assert torch.allclose(weights, torch.tensor([8 / 11, 24 / 11, 12 / 11, 0.0]))
    objective = WeightedCEObjective(weights, by="group")
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.3, 0.1]])
    y = torch.tensor([0, 0, 1])
    g = torch.tensor([0, 1, 2])
    ce = F.cross_entropy(logits, y, reduction="none")
    expected = (weights[g] * ce).mean()
    assert torch.isclose(objective(logits, y, g, torch.arange(3)), expected)
    by_class = WeightedCEObjective(torch.tensor([2.0, 0.0]), by="class")
    assert torch.isclose(by_class(logits, y, g, torch.arange(3)), 2 * ce[:2].sum() / 3)


def test_subsample_indices_balanced_and_deterministic():
    g = np.array([0] * 10 + [1] * 3 + [2] * 6)
    first = balanced_subsample_indices(g, 4, seed=3)
    assert np.array_equal(first, balanced_subsample_indices(g, 4, seed=3))
    assert np.bincount(g[first], minlength=4).tolist() == [3, 3, 3, 0]
    assert set(np.flatnonzero(g == 1)) <= set(first)
    others = [balanced_subsample_indices(g, 4, seed=s) for s in range(5)]
    assert any(not np.array_equal(first, o) for o in others)


def test_weighted_cross_entropy_guards_empty_selection():
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = weighted_cross_entropy(logits, y, torch.zeros(4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    w = torch.tensor([0.0, 1.0, 1.0, 0.0])
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.isclose(weighted_cross_entropy(logits, y, w), ce[1:3].mean())
    assert torch.allclose(weighted_cross_entropy(logits, y, w, reduction="none"), ce * w)


# ----------------------------------------------------------------------------- GCE
def test_gce_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    q = 0.7
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.e)]
    lff = [-math.log(pi) * q * pi**q for pi in p]
    zhang = [(1 - pi**q) / q for pi in p]
    got = generalized_cross_entropy(logits, y, q, reduction="none")
    assert torch.allclose(got, torch.tensor(lff))
    got = generalized_cross_entropy(logits, y, q, reduction="none", form="zhang")
    assert torch.allclose(got, torch.tensor(zhang))
    assert torch.isclose(generalized_cross_entropy(logits, y, q), torch.tensor(lff).mean())


def test_gce_gradient_downweights_low_confidence_samples():
    logits = torch.tensor([[3.0, 0.0], [-1.0, 1.0]], requires_grad=True)  # confident, unsure
    y = torch.tensor([0, 0])
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), logits)
    gce = generalized_cross_entropy(logits, y, 0.7, reduction="sum")
    (g_lff,) = torch.autograd.grad(gce, logits)
    ratio = g_lff.norm(dim=1) / g_ce.norm(dim=1)
    p = torch.softmax(logits.detach(), 1)[:, 0]
    assert torch.allclose(ratio, 0.7 * p**0.7)  # GCE gradient = q * p_y^q * CE gradient
    assert ratio[1] < ratio[0]  # the low-confidence sample is down-weighted
    zhang = generalized_cross_entropy(logits, y, 0.7, reduction="sum", form="zhang")
    (g_zhang,) = torch.autograd.grad(zhang, logits)
    assert torch.allclose(g_lff, 0.7 * g_zhang, atol=1e-6)  # same direction, scale q


# -------------------------------------------------------------------------- SupCon
def test_supcon_hand_computed_case():
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1])  # the third anchor has no positive: excluded
    expected = -math.log(math.e / (math.e + 1))
    loss = supervised_contrastive_loss(features, y, temperature=1.0)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    per = supervised_contrastive_loss(features, y, temperature=0.5, reduction="none")
    assert torch.allclose(per, torch.tensor([-math.log(math.e**2 / (math.e**2 + 1))] * 2 + [0.0]))


def test_supcon_singletons_no_nan_and_scale_invariant():
    features = torch.randn(5, 8, requires_grad=True)
    loss = supervised_contrastive_loss(features, torch.arange(5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(features.grad).all()
    one = torch.randn(1, 8, requires_grad=True)
    supervised_contrastive_loss(one, torch.tensor([0])).backward()
    assert torch.isfinite(one.grad).all()
    x = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 0])
    assert torch.isclose(
        supervised_contrastive_loss(x, y, 0.2), supervised_contrastive_loss(37.5 * x, y, 0.2)
    )


def test_supcon_objective_combines_ce_and_supcon():
    torch.manual_seed(0)
    model = build_model("mlp", 3, in_features=4, hidden=[6])
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    objective = SupConObjective(beta=0.25, temperature=0.5)
    loss, logits = objective.step(model, x, y, y, torch.arange(8))
    features = model.features(x)
    expected = 0.25 * F.cross_entropy(logits, y) + 0.75 * supervised_contrastive_loss(
        features, y, 0.5
    )
    assert torch.isclose(loss, expected)


# ----------------------------------------------------------------------------- LfF
def test_lff_ema_update_arithmetic():
    objective = LfFObjective(labels=[0, 0, 1], n_classes=2, ema_alpha=0.7)
    objective.update_ema(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 5.0]), torch.tensor([0, 1]))
    assert torch.allclose(objective.ema_b, torch.tensor([1.0, 2.0, 0.0]))  # first visit: the loss
    objective.update_ema(torch.tensor([3.0, 6.0]), torch.tensor([0.0, 1.0]), torch.tensor([0, 2]))
    assert torch.allclose(objective.ema_b, torch.tensor([0.7 * 1 + 0.3 * 3, 2.0, 6.0]))
    assert torch.allclose(objective.ema_d, torch.tensor([0.7 * 4 + 0.3 * 0, 5.0, 1.0]))
    assert torch.allclose(objective.class_max(objective.ema_b), torch.tensor([2.0, 6.0]))
    restored = LfFObjective(labels=[0, 0, 1], n_classes=2)
    restored.load_state_dict(objective.state_dict())
    assert torch.equal(restored.ema_d, objective.ema_d)
    with pytest.raises(ValueError):
        LfFObjective(labels=[0, 1], n_classes=2).load_state_dict(objective.state_dict())


def test_lff_weights_high_for_biased_hard_low_for_biased_easy():
    objective = LfFObjective(labels=[0, 0, 1, 1], n_classes=2)
    # items 0, 2: the biased model fails (bias-conflicting); items 1, 3: it is right.
    loss_b = torch.tensor([5.0, 0.001, 4.0, 0.002])
    loss_d = torch.tensor([0.01, 1.0, 0.02, 2.0])
    objective.update_ema(loss_b, loss_d, torch.arange(4))
    w = objective.weights(torch.arange(4))
    assert w[0] > 0.98 and w[2] > 0.98
    assert w[1] < 0.01 and w[3] < 0.01
    # class-wise normalisation: by each class's maximum EMA loss
    expected_0 = 1.0 / (1.0 + 0.01 / 1.0 + 1e-8)
    assert torch.isclose(w[0], torch.tensor(expected_0))


def test_lff_pair_step_checkpoint_and_forward():
    torch.manual_seed(0)
    pair = LfFPair(
        build_model("mlp", 2, in_features=4, hidden=[5]),
        build_model("mlp", 2, in_features=4, hidden=[5]),
    )
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    logits_b, logits_d = pair(x, both=True)
    assert torch.equal(pair(x), logits_d) and torch.equal(pair.biased(x), logits_b)
    objective = LfFObjective(labels=y, n_classes=2)
    loss, logits = objective.step(pair, x, y, y, torch.arange(6))
    loss.backward()
    assert torch.equal(logits, logits_d)
    assert pair.biased.head.weight.grad.abs().sum() > 0
    assert pair.debiased.head.weight.grad.abs().sum() > 0
    assert objective.updated.sum() == 6


def test_lff_pair_checkpoint_round_trip(tmp_path):
    pair = LfFPair(build_model("small_cnn", 2, widths=[4]), build_model("small_cnn", 2, widths=[4]))
    save_checkpoint(pair, tmp_path / "pair")
    loaded = load_checkpoint(tmp_path / "pair")
    assert isinstance(loaded, LfFPair) and loaded.spec == pair.spec
    for key, value in pair.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(loaded(x), pair.eval()(x))
    assert pair.cam_layer is pair.debiased.cam_layer


def test_lff_biased_and_debiased_models_start_from_independent_weights(tmp_path):
    """alinlab/LfF builds model_b and model_d as two draws; ours reseeded both alike."""
    from helpers import DEBUG

    from unspur.config import load_config
    from unspur.pipeline import run

    config = load_config(None, DEBUG + ["method.name=lff", "train.epochs=0"])
    run(config, tmp_path / "a")
    pair = load_checkpoint(tmp_path / "a" / "lff" / "best")  # the pair at initialisation
    assert isinstance(pair, LfFPair)
    biased, debiased = pair.biased.state_dict(), pair.debiased.state_dict()
    assert biased.keys() == debiased.keys()
    weights = [k for k, v in biased.items() if v.is_floating_point() and v.std() > 0]
    assert weights and all(not torch.equal(biased[k], debiased[k]) for k in weights)
    run(config, tmp_path / "b")  # still a function of the run's seed alone
    again = load_checkpoint(tmp_path / "b" / "lff" / "best")
    for key, value in pair.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


# --------------------------------------------------------- resume through the loop
def tiny_sets():
    rng = np.random.default_rng(0)
    n = 48
    y, a = rng.integers(0, 2, n), rng.integers(0, 2, n)
    images = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    images[y == 0, :, :, 0] = 200
    images[y == 1, :, :, 2] = 200
    images[a == 1, :2, :2, 1] = 255
    split = np.array(["train"] * 32 + ["val"] * 16)
    store = ArrayStore(images)
    frame = pd.DataFrame(
        {"filename": [store.filename(i) for i in range(n)], "y": y, "a": a, "split": split}
    )
    table = GroupTable(frame, store, ["red", "blue"], ["plain", "patch"], name="tiny")
    transform = Compose([], mean=None, std=None)
    return GroupDataset(table.split("train"), transform), GroupDataset(
        table.split("val"), transform
    )


class Interrupting:
    """Mixin: raise KeyboardInterrupt on the n-th training step, like Ctrl-C."""

    def arm(self, calls: int):
        self.remaining = calls
        return self

    def step(self, model, x, y, g, index):
        self.remaining = getattr(self, "remaining", 10**9) - 1
        if self.remaining < 0:
            raise KeyboardInterrupt
        return super().step(model, x, y, g, index)


class InterruptingDRO(Interrupting, GroupDROObjective):
    pass


class InterruptingLfF(Interrupting, LfFObjective):
    pass


@pytest.mark.parametrize("kind", ["groupdro", "lff"])
def test_resume_restores_objective_state_exactly(kind, tmp_path):
    train, val = tiny_sets()
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, progress=False)

    def make():
        torch.manual_seed(0)
        if kind == "groupdro":
            model = build_model("small_cnn", 2, widths=[4, 4])
            objective_cls = InterruptingDRO
            args = (train.n_groups, train.group_counts().numpy())
        else:
            model = LfFPair(
                build_model("small_cnn", 2, widths=[4]), build_model("small_cnn", 2, widths=[4])
            )
            objective_cls = InterruptingLfF
            args = (train.y, 2)
        return model, objective_cls(*args)

    reference, objective = make()
    fit(reference, train, val, config, tmp_path / "once", objective=objective)
    resumed, interrupted = make()
    with pytest.raises(KeyboardInterrupt):
        fit(resumed, train, val, config, tmp_path / "twice", objective=interrupted.arm(6))
    # Interrupted in epoch 2: epoch 1's state is on disk, so the rerun resumes from it.
    assert (tmp_path / "twice" / "checkpoints" / "last" / "trainer.pt").is_file()
    resumed, fresh = make()
    fit(resumed, train, val, config, tmp_path / "twice", objective=fresh)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for key, value in objective.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
