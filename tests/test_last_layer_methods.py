"""Last-layer methods (DFR, LLR), feature caching, JTT's error set, group inference.

DFR is tested on arrays (no images): a constructed case with one core dimension that
decides y in every group and one larger spurious dimension that agrees with y on the
majority groups only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from unspur.config import RunConfig, TrainConfig
from unspur.data.dataset import GroupDataset
from unspur.data.registry import load_dataset
from unspur.data.transforms import eval_transform
from unspur.errors import ConfigError
from unspur.methods.base import RunContext
from unspur.methods.dfr import (
    CLASS_WEIGHTS,
    DFRTrain,
    DFRVal,
    LinearSolution,
    _l1_logistic,
    class_weight_pairs,
    dfr_train_fit,
    dfr_val_fit,
    fit_l1_logistic,
    fit_scaler,
    group_accuracies,
)
from unspur.methods.jtt import JTT, OnlinePredictions, error_set, upsample
from unspur.methods.last_layer import retrain_last_layer
from unspur.models.factory import build_model
from unspur.train.features import extract_features
from unspur.train.group_inference import (
    infer_groups,
    minority_from_losses,
    precision_recall,
    true_minority,
)


# ------------------------------------------------------------------ DFR on arrays
def spurious_case(n: int, minority: float, rng: np.random.Generator, noise_dims: int = 3):
    """Columns: core (sign = y), spurious (sign = a, 3x larger), noise. g = 2y + a."""
    y = rng.integers(0, 2, n)
    flip = rng.random(n) < minority
    a = np.where(flip, 1 - y, y)
    core = (2 * y - 1) * 1.0 + 0.3 * rng.standard_normal(n)
    spurious = (2 * a - 1) * 3.0 + 0.3 * rng.standard_normal(n)
    x = np.column_stack([core, spurious, rng.standard_normal((n, noise_dims))]) + 5.0
    return x, y, 2 * y + a


def test_dfr_val_puts_weight_on_the_core_feature():
    rng = np.random.default_rng(0)
    train_x, _, _ = spurious_case(2000, 0.05, rng)
    val_x, val_y, val_g = spurious_case(400, 0.2, rng)
    test_x, test_y, test_g = spurious_case(2000, 0.5, rng)
    solution, info = dfr_val_fit(train_x, val_x, val_y, val_g, 4, 2, seed=0, num_retrains=5)
    weight, _ = solution.head_weights()
    assert abs(weight[1, 0]) > 5 * abs(weight[1, 1])  # core >> spurious
    accs = group_accuracies(solution.predict(test_x), test_y, test_g, 4)
    assert accs.min() >= 0.97
    assert info["C"] in (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


def test_dfr_train_variant_and_missing_group_error():
    rng = np.random.default_rng(1)
    train_x, train_y, train_g = spurious_case(3000, 0.05, rng)
    val_x, val_y, val_g = spurious_case(300, 0.5, rng)
    solution, _ = dfr_train_fit(
        train_x, train_y, train_g, val_x, val_y, val_g, 4, 2, seed=0, num_retrains=3
    )
    assert group_accuracies(solution.predict(val_x), val_y, val_g, 4).min() >= 0.95
    keep = val_g != 3
    with pytest.raises(ConfigError, match="group"):
        dfr_val_fit(train_x, val_x[keep], val_y[keep], val_g[keep], 4, 2)


def test_dfr_train_tunes_class_weights_as_the_official_flag():
    """--tune_class_weights_dfr_train: C x {0: 1, 1: w} / {0: w, 1: 1}, w in the grid."""
    assert CLASS_WEIGHTS == (1, 2, 3, 10, 100, 300, 1000)  # official CLASS_WEIGHT_OPTIONS
    pairs = class_weight_pairs()
    assert pairs[:7] == [(1, w) for w in CLASS_WEIGHTS] and pairs[7] == (2, 1)
    assert len(pairs) == 13  # {0: 1, 1: 1} once
    assert DFRTrain.defaults["tune_class_weights"] is True  # the README's DFR^Tr_Tr command
    rng = np.random.default_rng(4)
    train_x, train_y, train_g = spurious_case(2000, 0.05, rng)
    val_x, val_y, val_g = spurious_case(300, 0.5, rng)
    args = (train_x, train_y, train_g, val_x, val_y, val_g, 4, 2)
    c_options = (1.0, 0.01)
    solution, info = dfr_train_fit(
        *args, seed=0, c_options=c_options, num_retrains=2, class_weights=pairs
    )
    scores = info["tuning_scores"]
    assert [(t["C"], tuple(t["class_weight"])) for t in scores] == [
        (c, w) for c in c_options for w in pairs
    ]
    best = max(scores, key=lambda t: t["score"])  # the first best, as np.argmax
    assert (info["C"], info["class_weight"]) == (best["C"], best["class_weight"])
    # The chosen weights reach the final fits: the same run with them fixed agrees.
    fixed, _ = dfr_train_fit(
        *args,
        seed=0,
        c_options=(info["C"],),
        num_retrains=2,
        class_weights=[tuple(info["class_weight"])],
    )
    np.testing.assert_allclose(solution.coef, fixed.coef)
    # A heavy weight on one class moves the decision towards it.
    z = (train_x - train_x.mean(0)) / train_x.std(0)
    heavy = fit_l1_logistic(z, train_y, 0.01, 2, class_weight=(1.0, 1000.0))
    plain = fit_l1_logistic(z, train_y, 0.01, 2)
    predict = lambda coef, b: (z @ coef.T + b)[:, 0] > 0  # noqa: E731
    assert predict(*heavy).sum() > predict(*plain).sum()
    with pytest.raises(ConfigError, match="two classes"):
        fit_l1_logistic(z, np.arange(len(z)) % 3, 1.0, 3, class_weight=(1.0, 2.0))


@pytest.mark.parametrize("method", ["dfr_val", "dfr_train"])
def test_dfr_starts_from_the_final_erm_checkpoint_by_default(method, tmp_path):
    """The DFR paper's base model is ERM after its last epoch, not the selected epoch."""
    import json

    from helpers import DEBUG

    from unspur.config import load_config
    from unspur.models.restore import load_checkpoint
    from unspur.pipeline import run

    assert DFRVal.defaults["base_model"] == DFRTrain.defaults["base_model"] == "final"

    def backbone(path):
        model = load_checkpoint(path)
        head = type(model).head_name + "."
        return {k: v for k, v in model.state_dict().items() if not k.startswith(head)}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    base = DEBUG + [f"method.name={method}", "train.epochs=3"]
    run(load_config(None, base), tmp_path / "final")
    erm = tmp_path / "final" / "erm"
    assert json.loads((erm / "best" / "model.json").read_text())["extra"]["epoch"] < 3
    final, selected = backbone(erm / "checkpoints" / "last"), backbone(erm / "best")
    assert not same(final, selected)  # the case distinguishes the two
    assert same(backbone(tmp_path / "final" / "model"), final)
    record = json.loads((tmp_path / "final" / method / "dfr.json").read_text())
    assert record["base_model"] == "final"
    # The option: the epoch the ERM run selected, recorded.
    run(load_config(None, base + ["method.options.base_model=selected"]), tmp_path / "sel")
    assert same(backbone(tmp_path / "sel" / "model"), backbone(tmp_path / "sel" / "erm" / "best"))
    record = json.loads((tmp_path / "sel" / method / "dfr.json").read_text())
    assert record["base_model"] == "selected"
    # A comparison hands DFR the ERM run's model folder: its final epoch sits beside it.
    reference = [f"method.reference={tmp_path / 'final' / 'model'}"]
    run(load_config(None, base + reference), tmp_path / "ref")
    assert same(backbone(tmp_path / "ref" / "model"), final)
    # A model saved elsewhere has no last epoch beside it: used as given, and recorded.
    import shutil

    shutil.copytree(tmp_path / "final" / "erm" / "best", tmp_path / "alone" / "model")
    alone = [f"method.reference={tmp_path / 'alone' / 'model'}"]
    run(load_config(None, base + alone), tmp_path / "given")
    assert same(backbone(tmp_path / "given" / "model"), selected)
    record = json.loads((tmp_path / "given" / method / "dfr.json").read_text())
    assert record["base_model"].startswith("reference as given")
    with pytest.raises(ConfigError, match="base_model"):
        run(load_config(None, base + ["method.options.base_model=best"]), tmp_path / "bad")


def test_scaler_folding_matches_sklearn_binary_and_multiclass():
    from sklearn.multiclass import OneVsRestClassifier

    rng = np.random.default_rng(2)
    x = rng.standard_normal((120, 6)) * rng.uniform(0.5, 4, 6) + rng.uniform(-3, 3, 6)
    mean, scale = fit_scaler(x)
    z = (x - mean) / scale
    y2 = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    clf = _l1_logistic(0.5, 100, 0).fit(z, y2)
    head = nn.Linear(6, 2)
    LinearSolution(clf.coef_, clf.intercept_, mean, scale, 2).install(head)
    with torch.no_grad():
        logits = head(torch.as_tensor(x, dtype=torch.float32)).double()
    np.testing.assert_allclose(
        torch.softmax(logits, 1)[:, 1].numpy(), clf.predict_proba(z)[:, 1], atol=1e-5
    )
    np.testing.assert_allclose(
        (logits[:, 1] - logits[:, 0]).numpy(), clf.decision_function(z), atol=1e-4
    )

    y3 = np.digitize(x[:, 0], np.quantile(x[:, 0], [1 / 3, 2 / 3]))
    ovr = OneVsRestClassifier(_l1_logistic(1.0, 100, 0)).fit(z, y3)
    coef, intercept = fit_l1_logistic(z, y3, 1.0, 3)
    head3 = nn.Linear(6, 3)
    LinearSolution(coef, intercept, mean, scale, 3).install(head3)
    with torch.no_grad():
        logits3 = head3(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(logits3, ovr.decision_function(z), atol=1e-4)
    assert (logits3.argmax(1) == ovr.predict(z)).all()


# -------------------------------------------------------------- JTT's error set
class ArrayItems(Dataset):
    def __init__(self, x, y):
        self.x = torch.as_tensor(x, dtype=torch.float32)
        self.y = torch.as_tensor(y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), 0, i


def test_jtt_error_set_is_exactly_the_misclassified_set():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 2))
    y = (x[:, 0] > 0).astype(int)
    y[[3, 7, 11]] = 1 - y[[3, 7, 11]]  # label noise the model gets wrong
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.bias.zero_()
    expected = np.flatnonzero((x[:, 0] > 0).astype(int) != y)
    assert error_set(model, ArrayItems(x, y), batch_size=7).tolist() == expected.tolist()
    assert set(expected) == {3, 7, 11}


def epoch_clock(batches_per_epoch: int) -> nn.Module:
    """An MLP that predicts class ``e mod 3`` in training epoch ``e``, class 2 in eval."""
    model = build_model("mlp", 3, in_features=2, hidden=[4])
    calls = {"n": 0}

    def forward(x, **_):
        if model.training:
            label = (calls["n"] // batches_per_epoch) % 3
            calls["n"] += 1
        else:
            label = 2
        logits = torch.zeros(len(x), 3)
        logits[:, label] = 5.0
        return logits + 0.0 * model.head.weight.sum()

    model.forward = forward
    return model


def test_jtt_online_error_set_is_the_train_mode_pass_of_epoch_index_t(tmp_path):
    """anniesch/jtt reads the online predictions of epoch index T, not an eval pass."""
    from unspur.train.loop import fit

    assert JTT.defaults["error_pass"] == "eval"  # the paper's fixed f_id; online: option
    y = np.arange(30) % 3
    data = ArrayItems(np.zeros((30, 2)), y)
    data.group_counts = lambda: torch.ones(1)
    t = 1
    online = OnlinePredictions(len(data), record_epoch=t)
    model = epoch_clock(batches_per_epoch=3)
    config = TrainConfig(epochs=t + 1, batch_size=10, lr=0.1, progress=False, selection="last")
    fit(model, data, None, config, tmp_path / "identify", objective=online)
    assert online.predicted.tolist() == [1] * 30  # epoch index 1, in train mode
    assert online.errors(torch.as_tensor(y)).tolist() == np.flatnonzero(y != 1).tolist()
    # Today's eval pass of the same model sees class 2: a different set.
    assert error_set(model, data, batch_size=7).tolist() == np.flatnonzero(y != 2).tolist()
    # A finished stage keeps its record (the objective's state is in the checkpoint).
    again = OnlinePredictions(len(data), record_epoch=t)
    fit(epoch_clock(3), data, None, config, tmp_path / "identify", objective=again)
    assert torch.equal(again.predicted, online.predicted)
    with pytest.raises(ConfigError, match="no prediction"):
        OnlinePredictions(4, record_epoch=0).errors(torch.zeros(4, dtype=torch.long))


def test_jtt_online_runs_end_to_end(tmp_path):
    import json

    from helpers import DEBUG

    from unspur.config import load_config
    from unspur.pipeline import run

    options = ["method.name=jtt", "method.options.identification_epochs=1"]
    run(load_config(None, DEBUG + options + ["method.options.error_pass=online"]), tmp_path)
    stage = tmp_path / "jtt_identify_online"
    report = json.loads((stage / "error_set.json").read_text())
    assert report["error_pass"] == "online"
    assert len(json.loads((stage / "history.json").read_text())) == 2  # T + 1 epochs
    with pytest.raises(ConfigError, match="error_pass"):
        run(load_config(None, DEBUG + options + ["method.options.error_pass=x"]), tmp_path / "b")


@pytest.fixture(scope="module")
def tiny_data():
    table = load_dataset("synthetic", None, n_train=48, n_val=24, n_test=8, size=16, bias=0.8)
    transform = eval_transform(16, 1.0, True)
    return (
        table,
        GroupDataset(table.split("train"), transform),
        GroupDataset(table.split("val"), transform),
    )


def test_upsampled_dataset_length_counts_and_indices(tiny_data):
    _, train, _ = tiny_data
    errors = np.array([1, 3, 10])
    up = upsample(train, errors, 4)
    assert len(up) == len(train) + 4 * len(errors)
    counts = np.bincount(up.source_index, minlength=len(train))
    assert counts[errors].tolist() == [5, 5, 5]
    assert counts.sum() - counts[errors].sum() == len(train) - len(errors)
    x, y, g, index = up[len(train) + 1]
    assert index == len(train) + 1 and y == int(train.y[3]) and g == int(train.g[3])
    assert torch.equal(x, train[3][0])
    expected = train.group_counts().clone()
    expected += 4 * torch.bincount(train.g[errors], minlength=train.n_groups)
    assert torch.equal(up.group_counts(), expected)
    with pytest.raises(ConfigError):
        upsample(train, errors, -1)


# ----------------------------------------------------------------- feature cache
def counting(model):
    calls = {"n": 0}
    original = model.features

    def features(x):
        calls["n"] += 1
        return original(x)

    model.features = features
    return calls


def test_feature_cache_computes_once_hits_disk_and_invalidates(tiny_data, tmp_path):
    _, train, _ = tiny_data
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, widths=[4, 4])
    calls = counting(model)
    first = extract_features(model, train, batch_size=16, cache_dir=tmp_path)
    assert calls["n"] == 3  # 48 items / 16: the backbone ran once per item
    assert first.features.shape == (48, model.feature_dim)
    second = extract_features(model, train, batch_size=16, cache_dir=tmp_path)
    assert calls["n"] == 3  # disk cache hit: the backbone did not run
    assert torch.equal(first.features, second.features) and second.key == first.key
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the head does not change features
    extract_features(model, train, batch_size=16, cache_dir=tmp_path)
    assert calls["n"] == 3
    with torch.no_grad():
        next(model.backbone_parameters()).mul_(2.0)
    third = extract_features(model, train, batch_size=16, cache_dir=tmp_path)
    assert calls["n"] == 6 and third.key != first.key
    assert not torch.equal(third.features, first.features)
    # eval mode: features match a direct no-grad pass in eval mode
    model.eval()
    with torch.no_grad():
        direct = torch.cat([model.features(train[i][0][None]) for i in range(4)])
    torch.testing.assert_close(third.features[:4], direct)


# ---------------------------------------------------------------------- LLR
def test_llr_trains_only_the_head_on_cached_features(tiny_data, tmp_path):
    _, train, val = tiny_data
    config = RunConfig(train=TrainConfig(epochs=3, batch_size=16, progress=False))
    config.data.image_size = 16
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, widths=[4, 4])
    context = RunContext(
        config=config,
        train=train,
        val=val,
        out_dir=tmp_path,
        build_model=lambda: build_model("small_cnn", 2, widths=[4, 4]),
        train_group_counts=train.group_counts().numpy(),
        eval_transform=val.transform,
    )
    backbone_before = {k: v.clone() for k, v in model.state_dict().items() if "head" not in k}
    head_before = model.head.weight.detach().clone()
    calls = counting(model)
    result = retrain_last_layer(context, model, "llr", {"epochs": 3, "lr": 0.05}, "class")
    assert calls["n"] == 2  # one batch for train (48 items), one for val; never per epoch
    assert len(result.history) == 3
    after = model.state_dict()
    for key, value in backbone_before.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(model.head.weight, head_before)
    assert model.backbone_frozen
    # rerun reuses the cached features and the finished stage
    retrain_last_layer(context, model, "llr", {"epochs": 3, "lr": 0.05}, "class")
    assert calls["n"] == 2


# ------------------------------------------------------------- group inference
def test_group_inference_precision_recall_on_a_constructed_case():
    # class 0: groups 0 (majority, 6) and 1 (minority, 2); class 1: 3 (majority) 2 (minority)
    y = np.array([0] * 8 + [1] * 8)
    g = np.array([0] * 6 + [1] * 2 + [3] * 6 + [2] * 2)
    truth = true_minority(y, g, 2, 2)
    assert truth.tolist() == [False] * 6 + [True] * 2 + [False] * 6 + [True] * 2
    losses = np.linspace(0.1, 0.2, 16)
    losses[[6, 7, 14, 2]] = [5.0, 4.0, 3.0, 6.0]  # 3 true minorities + 1 false alarm
    picked = minority_from_losses(losses, y, 2, quantile=0.25)  # 2 per class
    assert np.flatnonzero(picked).tolist() == [2, 6, 14, 15]
    report = precision_recall(picked, truth)
    assert report["precision"] == pytest.approx(3 / 4)
    assert report["recall"] == pytest.approx(3 / 4)
    assert report["n_correct"] == 3
    top1 = minority_from_losses(losses, y, 2, top_k=1, per_class=False)
    assert np.flatnonzero(top1).tolist() == [2]
    assert precision_recall(np.zeros(16, bool), truth)["precision"] == 0.0


def test_infer_groups_from_a_model():
    x = np.array([[1.0, 0], [2, 0], [-1, 0], [-2, 0]])
    y = np.array([1, 0, 0, 1])  # items 1 and 3 are wrong for a sign classifier
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.bias.zero_()
    inferred = infer_groups(model, ArrayItems(x, y), "error")
    assert inferred.is_minority.tolist() == [False, True, False, True]
    assert inferred.pseudo_g.tolist() == [2, 1, 0, 3]
    by_loss = infer_groups(model, ArrayItems(x, y), "loss_topk", top_k=1)
    assert by_loss.is_minority.tolist() == [False, True, False, True]
    assert (by_loss.losses[[1, 3]] > by_loss.losses[[0, 2]].max()).all()
