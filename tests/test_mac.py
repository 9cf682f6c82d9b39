"""MaC (Mask and Combine), its saliency and mask tools, and MaskTune."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unspur.config import load_config
from unspur.errors import ConfigError
from unspur.explain.masks import (
    PAPER_FRACTION,
    elbow_index,
    mask_quality,
    resolve_top_k,
    threshold_mask,
    top_k_mask,
)
from unspur.explain.xgradcam import cam_from, xgradcam
from unspur.methods.mac import (
    PAPER_ALPHA_GRID,
    PAPER_BETA_GRID,
    PAPER_HEAD,
    PAPER_PRESETS,
    MaC,
    MaCObjective,
    integrated_gradients_map,
)
from unspur.models.restore import load_checkpoint
from unspur.models.small_cnn import MLP, SmallCNN
from unspur.pipeline import run
from unspur.train.interventions import batch_mean_colour, combine, draw_partners, remove

DEBUG = helpers.DEBUG


# ------------------------------------------------------------ interventions
def _batch():
    # Two images, one channel, 2x2 pixels; masks mark the core.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[10.0, 20.0], [30.0, 40.0]]]])
    m = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    return x, m


def test_batch_mean_colour_is_per_channel_mean_over_all_pixels():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    b = batch_mean_colour(x)
    assert b.shape == (1, 3, 1, 1)
    for c in range(3):
        assert b[0, c, 0, 0] == x[:, c].mean()


def test_remove_formula_exact():
    x, m = _batch()
    b = batch_mean_colour(x)  # (1+2+3+4+10+20+30+40) / 8 = 13.75
    assert b.item() == 13.75
    out = remove(x, m)
    expected = torch.tensor([[[[1.0, 13.75], [13.75, 13.75]]], [[[13.75, 20.0], [13.75, 13.75]]]])
    assert torch.equal(out, expected)


def test_combine_formula_exact():
    x, m = _batch()
    b = torch.tensor(5.0).reshape(1, 1, 1, 1)
    mixed, keep = combine(x, m, torch.tensor([1, 0]), b)
    assert keep.tolist() == [0, 1]
    # i=0, j=1: core of x0 at (0,0); x1's core (0,1) -> b; the rest x1's background.
    # i=1, j=0: core of x1 at (0,1); x0's core (0,0) -> b; the rest x0's background.
    expected = torch.tensor([[[[1.0, 5.0], [30.0, 40.0]]], [[[5.0, 20.0], [3.0, 4.0]]]])
    assert torch.equal(mixed, expected)
    # Against the paper's equation, term by term.
    i, j = 0, 1
    eq = x[i] * m[i] + (1 - m[i]) * (1 - m[j]) * x[j] + (1 - m[i]) * m[j] * b[0]
    assert torch.equal(mixed[0], eq)


def test_partners_are_of_another_class_and_missing_ones_are_skipped():
    y = torch.tensor([0, 0, 1, 2, 1])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        partner = draw_partners(y, generator)
        assert (partner >= 0).all()
        assert (y[partner] != y).all()
    alone = draw_partners(torch.tensor([1, 1, 1]))
    assert alone.tolist() == [-1, -1, -1]
    x = torch.rand(3, 3, 4, 4)
    mixed, keep = combine(x, torch.ones(3, 4, 4), alone)
    assert mixed.shape[0] == 0 and keep.numel() == 0


def test_objective_on_single_class_batch_has_no_nan():
    model = SmallCNN(2, widths=[4, 4]).freeze_backbone()
    masks = torch.ones(8, 8, 8, dtype=torch.uint8)
    objective = MaCObjective(masks, alpha=1.0, beta=2.0)
    x = torch.rand(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    loss, logits = objective.step(model, x, y, y, torch.arange(4))
    assert torch.isfinite(loss) and logits.shape == (4, 2)
    loss.backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert model.head.weight.grad is not None


def test_objective_loss_is_ce_plus_weighted_terms():
    torch.manual_seed(0)
    model = SmallCNN(2, widths=[4, 4]).freeze_backbone()
    masks = (torch.rand(6, 8, 8) > 0.5).to(torch.uint8)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    index = torch.arange(6)
    torch.manual_seed(1)
    loss, _ = MaCObjective(masks, alpha=2.0, beta=3.0).step(model, x, y, y, index)
    torch.manual_seed(1)
    partner = draw_partners(y)
    m = masks.float()[:, None]
    model.eval()
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y)
        rmv = F.cross_entropy(model(remove(x, m)), y)
        mixed, keep = combine(x, m, partner)
        comb = F.cross_entropy(model(mixed), y[keep])
    assert torch.allclose(loss, ce + 2.0 * rmv + 3.0 * comb, atol=1e-5)


# ------------------------------------------------------------------ xGradCAM
def test_cam_formula_matches_definition():
    act = torch.rand(2, 3, 4, 4)
    grad = torch.randn(2, 3, 4, 4)
    cam = cam_from(act, grad, (4, 4))
    w = (grad * act).sum((2, 3)) / (act.sum((2, 3)) + 1e-7)
    expected = torch.relu((w[:, :, None, None] * act).sum(1))
    assert torch.allclose(cam, expected)
    assert cam_from(act, grad, (8, 8)).shape == (2, 8, 8)


def _quadrant_data(n, generator):
    """Only the top-left quadrant carries the label (a red or blue square)."""
    x = torch.rand(n, 3, 16, 16, generator=generator)
    y = torch.randint(0, 2, (n,), generator=generator)
    x[:, :, :8, :8] = 0.5
    x[y == 1, 0, 2:6, 2:6] = 1.0
    x[y == 0, 2, 2:6, 2:6] = 1.0
    return x, y


@pytest.mark.parametrize("saliency", ["xgradcam", "integrated_gradients"])
def test_saliency_concentrates_on_the_region_that_decides(saliency):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = SmallCNN(2, widths=[8, 8])
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(40):
        x, y = _quadrant_data(32, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = _quadrant_data(64, generator)
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    optimizer.zero_grad(set_to_none=True)
    model.freeze_backbone()  # frozen parameters still give activation gradients
    if saliency == "xgradcam":
        cam = xgradcam(model, x, y)
    else:
        cam = integrated_gradients_map(model, x, y, n_steps=16)
    assert cam.shape == (64, 16, 16) and (cam >= 0).all()
    share = cam[:, :8, :8].sum((1, 2)) / cam.sum((1, 2)).clamp_min(1e-12)
    assert share.mean() > 0.6  # a uniform map would put 0.25 there
    assert all(p.grad is None for p in model.parameters())


def test_xgradcam_on_a_model_without_conv_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="convolutional"):
        xgradcam(MLP(2, in_features=3 * 8 * 8), torch.rand(2, 3, 8, 8))


# ------------------------------------------------------------------- masks
def test_top_k_picks_exactly_k_pixels():
    saliency = torch.rand(3, 10, 12)
    saliency[0] = 0.0  # all ties
    mask = top_k_mask(saliency, 17)
    assert mask.dtype == torch.bool and mask.shape == (3, 10, 12)
    assert mask.reshape(3, -1).sum(1).tolist() == [17, 17, 17]
    flat, chosen = saliency[1].reshape(-1), mask[1].reshape(-1)
    assert flat[chosen].min() >= flat[~chosen].max()
    assert top_k_mask(saliency, 0.25).reshape(3, -1).sum(1).tolist() == [30, 30, 30]
    assert resolve_top_k(None, 224, 224) == 15000
    assert resolve_top_k(None, 32, 32) == round(PAPER_FRACTION * 1024)
    with pytest.raises(ConfigError):
        resolve_top_k(121, 10, 12)


def test_threshold_mask_is_mean_plus_two_std_of_positive_scores():
    saliency = torch.zeros(1, 1, 10)
    saliency[0, 0, :9] = 1.0
    saliency[0, 0, 9] = 10.0
    values = np.array([1.0] * 9 + [10.0])
    threshold = values.mean() + 2 * values.std()
    assert threshold < 10
    assert threshold_mask(saliency)[0, 0].tolist() == [False] * 9 + [True]


def test_mask_quality_on_a_constructed_case():
    truth = torch.zeros(2, 4, 4)
    truth[:, :2, :] = 1  # foreground: top half (8 pixels)
    saliency = torch.zeros(2, 4, 4)
    saliency[0, :2, :] = 1.0  # image 0: all saliency on the foreground
    saliency[1, 3, :] = 1.0  # image 1: all on the last background row
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, :] = True  # 4 of 8 foreground pixels
    mask[1, 2:, :] = True  # all 8 background pixels
    table = mask_quality(saliency, mask, truth, [0, 1], ["g0", "g1"])
    g0 = table[table["name"] == "g0"].iloc[0]
    g1 = table[table["name"] == "g1"].iloc[0]
    assert (g0.saliency_fg, g0.saliency_bg, g0.mask_fg, g0.mask_bg) == pytest.approx(
        (1.0, 0.0, 0.5, 0.0), abs=1e-6
    )
    assert (g1.saliency_fg, g1.saliency_bg, g1.mask_fg, g1.mask_bg) == pytest.approx(
        (0.0, 0.5, 0.0, 1.0), abs=1e-6
    )
    overall = table[table["name"] == "all"].iloc[0]
    assert overall.n == 2 and overall.mask_bg == 0.5


def test_adaptive_mask_size_picks_the_elbow():
    q = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9]
    # Loss falls steeply until 0.2 of the pixels are kept, then stays almost flat.
    loss = [3.0, 2.0, 0.40, 0.35, 0.32, 0.30, 0.28, 0.27]
    assert q[elbow_index(q, loss)] == 0.2
    assert elbow_index([0.1, 0.2, 0.3], [3.0, 2.0, 1.0]) == 1  # no bend: the middle
    with pytest.raises(ConfigError):
        elbow_index([0.1, 0.2], [1.0, 0.5])


# ---------------------------------------------------------- methods end to end
def mac_config(*options: str):
    """The debug run of MaC with ``KEY=VALUE`` method options."""
    overrides = ["method.name=mac", *(f"method.options.{o}" for o in options)]
    return load_config(None, DEBUG + overrides)


def _backbone_and_head(model):
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    backbone = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith(type(model).head_name + ".")
    }
    return backbone, head


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_mac_trains_only_the_head_and_writes_its_artefacts(tmp_path):
    config = mac_config("search=false", "epochs=2", "figures=4")
    results = run(config, tmp_path)
    erm = load_checkpoint(tmp_path / "erm" / "best")
    final = load_checkpoint(tmp_path / "model")
    erm_backbone, erm_head = _backbone_and_head(erm)
    backbone, head = _backbone_and_head(final)
    assert _same(erm_backbone, backbone)
    assert not _same(erm_head, head)
    mac = tmp_path / "mac"
    from unspur.models.checkpoint import load_state

    masks = load_state(mac / "masks.safetensors")["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (160, 16, 16)
    assert set(masks.unique().tolist()) <= {0, 1}
    assert (masks.reshape(160, -1).sum(1) == round(PAPER_FRACTION * 256)).all()
    import pandas as pd

    quality = pd.read_csv(mac / "mask_quality.csv")
    assert {"saliency_fg", "saliency_bg", "mask_fg", "mask_bg"} <= set(quality.columns)
    assert "all" in set(quality["name"])
    summary = json.loads((mac / "mac.json").read_text())
    assert summary["alpha"] == 2.0 and summary["beta"] == 3.0  # Sec. 4.2 (Waterbirds)
    assert summary["views"] == 0  # fresh interventions every batch
    figures = list((mac / "figures").glob("*.png"))
    assert figures or results["metrics"]["val"]["accuracy"] == 1.0


def test_mac_search_with_cached_views_and_ground_truth_masks(tmp_path):
    config = mac_config(
        "saliency=ground_truth",
        "mask_size=adaptive",
        "adaptive_samples=32",
        "search=true",
        "alpha_grid=[0,1]",
        "beta_grid=[2]",
        "views=2",
        "epochs=2",
        "figures=0",
    )
    run(config, tmp_path)
    summary = json.loads((tmp_path / "mac" / "search.json").read_text())
    assert len(summary["candidates"]) == 2
    best = max(summary["candidates"], key=lambda c: c["score"])
    assert summary["alpha"] == best["alpha"] and summary["beta"] == 2.0
    curve = summary["masks"]["adaptive_curve"]
    assert curve["chosen"] in curve["q"]
    # Ground-truth saliency: the masks cover the core first.
    quality = __import__("pandas").read_csv(tmp_path / "mac" / "mask_quality.csv")
    overall = quality[quality["name"] == "all"].iloc[0]
    assert overall.mask_fg > overall.mask_bg


def test_mac_search_feature_cache_changes_speed_not_results(tmp_path):
    # views=0 (the paper's fresh interventions): the candidates of the search share the
    # backbone's features of each batch; with train.cache_mb=0 each runs the backbone.
    options = [
        "method.name=mac",
        "method.options.saliency=ground_truth",
        "method.options.search=true",
        "method.options.alpha_grid=[0,1]",
        "method.options.beta_grid=[0,2]",
        "method.options.epochs=2",
        "method.options.figures=0",
    ]
    summaries, heads = [], []
    for budget in (512, 0):
        out = tmp_path / f"cache{budget}"
        run(load_config(None, [*DEBUG, *options, f"train.cache_mb={budget}"]), out)
        summaries.append(json.loads((out / "mac" / "search.json").read_text()))
        heads.append(load_checkpoint(out / "model").head.state_dict())
    cached, plain = summaries
    assert "feature_cache" not in plain
    batches = cached["feature_cache"]["misses"]
    assert batches > 0 and cached["feature_cache"]["hits"] == 3 * batches  # 4 candidates
    assert [c["score"] for c in cached["candidates"]] == pytest.approx(
        [c["score"] for c in plain["candidates"]]
    )
    assert (cached["alpha"], cached["beta"]) == (plain["alpha"], plain["beta"])
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], atol=1e-5, rtol=1e-4)


def test_mac_with_integrated_gradients_masks(tmp_path):
    config = mac_config(
        "saliency=integrated_gradients",
        "ig_steps=4",
        "top_k=0.2",
        "search=false",
        "epochs=1",
        "figures=0",
    )
    run(config, tmp_path)
    info = json.loads((tmp_path / "mac" / "masks.json").read_text())
    assert info["saliency"] == "integrated_gradients"
    assert info["fraction"] == pytest.approx(0.2, abs=0.01)
    assert (tmp_path / "mac" / "mask_quality.csv").is_file()
    bad = mac_config("ig_steps=0")
    with pytest.raises(ConfigError, match="ig_steps"):
        run(bad, tmp_path / "bad")


def test_mac_on_a_model_without_conv_layer_fails_clearly(tmp_path):
    config = load_config(
        None, DEBUG + ["method.name=mac", "model.arch=mlp", "model.options={in_features: 768}"]
    )
    with pytest.raises(ConfigError, match="convolutional"):
        run(config, tmp_path)
    assert not (tmp_path / "erm").exists()  # fails before training anything


def test_masktune_changes_the_backbone(tmp_path):
    config = load_config(None, DEBUG + ["method.name=masktune"])
    run(config, tmp_path)
    erm_backbone, _ = _backbone_and_head(load_checkpoint(tmp_path / "erm" / "best"))
    backbone, _ = _backbone_and_head(load_checkpoint(tmp_path / "model"))
    assert not _same(erm_backbone, backbone)
    masks = json.loads((tmp_path / "masktune" / "masks.json").read_text())
    assert 0.0 < masks["hidden_fraction"] < 0.5


def test_mac_ground_truth_masks_are_used_exactly(tmp_path):
    """A binary ground-truth map is the mask itself: no top-K speckle of background."""
    config = mac_config("saliency=ground_truth", "search=false", "epochs=1", "figures=0")
    run(config, tmp_path)
    quality = __import__("pandas").read_csv(tmp_path / "mac" / "mask_quality.csv")
    overall = quality[quality["name"] == "all"].iloc[0]
    assert overall.mask_fg > 0.99 and overall.mask_bg < 0.01
    info = json.loads((tmp_path / "mac" / "mac.json").read_text())["masks"]
    assert info["top_k"] == "exact" and 0 < info["fraction"] < PAPER_FRACTION


# ------------------------------------------------------------ the paper's values
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_paper_values_are_pinned():
    """Sec. 4.2, App. B and Table 1 of the MaC paper: changing one must fail here."""
    assert PAPER_ALPHA_GRID == (0, 1, 2)  # App. B
    assert PAPER_BETA_GRID == (0, 1, 2, 3, 4, 5)  # App. B
    assert PAPER_HEAD == {
        "optimizer": "adam",
        "lr": 0.5e-2,
        "step_size": 5,
        "gamma": 0.5,
        "batch_size": 32,
    }  # Sec. 4.2, both datasets
    assert PAPER_PRESETS == {
        "waterbirds": {"alpha": 2, "beta": 3, "epochs": 10, "balance": "none"},
        "celeba": {"alpha": 3, "beta": 0, "epochs": 6, "balance": "class"},
    }  # Sec. 4.2 (alpha, beta, class balance) and App. B (epochs)
    assert resolve_top_k(None, 224, 224) == 15000  # Table 1 caption
    defaults = MaC.defaults
    assert defaults["views"] == 0  # Sec. 3.2: interventions per batch
    assert defaults["saliency"] == "xgradcam" and defaults["search"] is True
    assert (defaults["alpha"], defaults["beta"], defaults["epochs"]) == (2, 3, 10)
    assert {k: defaults[k] for k in PAPER_HEAD} == PAPER_HEAD


@pytest.mark.parametrize("dataset", ["waterbirds", "celeba"])
def test_dataset_configs_carry_the_paper_presets(dataset):
    config = load_config(CONFIGS / f"{dataset}_mac.yaml")
    options = MaC.resolve_options(config.method.options)
    assert config.method.name == "mac" and config.data.name == dataset
    assert {k: options[k] for k in PAPER_PRESETS[dataset]} == PAPER_PRESETS[dataset]
    assert {k: options[k] for k in PAPER_HEAD} == PAPER_HEAD
    assert options["search"] is False  # the reported coefficients, not a new search
    assert options["views"] == 0 and options["top_k"] == 15000
    assert options["saliency"] == "xgradcam" and options["weight_decay"] == 0.0
    # The ERM reference of Sec. 4.2: ImageNet ResNet-50, SGD, constant lr 1e-3, momentum 0.9.
    train = config.train
    assert config.model.arch == "resnet50"
    assert (train.optimizer, train.lr, train.momentum, train.scheduler) == (
        "sgd",
        1e-3,
        0.9,
        "none",
    )
    assert train.augment is True and train.selection == "worst_group"
    expected = {"waterbirds": (100, 32, 1e-3), "celeba": (30, 128, 1e-4)}[dataset]
    assert (train.epochs, train.batch_size, train.weight_decay) == expected
    text = (CONFIGS / f"{dataset}_mac.yaml").read_text()
    for line in text.split("method:")[1].splitlines()[3:]:
        assert "#" in line, f"uncited value in {dataset}_mac.yaml: {line}"


def test_views_are_labelled_a_speed_option_wherever_used():
    from unspur.methods import mac

    assert "speed option" in MaC.summary and "fresh every batch" in MaC.summary
    assert "a speed option, not the paper" in mac.__doc__
    assert "not given" not in mac.__doc__ and "could check" not in mac.__doc__
    bench = Path(__file__).resolve().parents[1] / "bench"
    # Every suite row that precomputes views says so in its name or its note; no row
    # without them carries the suffix.
    from unspur.bench.suite import load_suite

    checked = 0
    for path in sorted((bench / "suites").glob("*.yaml")):
        suite = load_suite(path)
        for label, variant in suite.variants.items():
            if variant.method != "mac":
                continue
            views = [o.split("=", 1)[1] for o in variant.overrides if "options.views=" in o]
            expected = f"_views{views[-1]}" if views and views[-1] != "0" else None
            if expected:
                named = label.endswith(expected)
                noted = f"(views {views[-1]})" in variant.note and "not the paper" in variant.note
                assert named or noted, (path.name, label)
            else:
                assert "_views" not in label, (path.name, label)
            checked += 1
    assert checked >= 10
