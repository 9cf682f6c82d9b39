"""DiffInject: content selection, the synthetic budget and allocation, the official
injection process (h from the content's inversion, replace grid, eta, dt_lambda, local
slice), the final training, end to end."""

from __future__ import annotations

import json
import math

import helpers
import numpy as np
import pandas as pd
import pytest
import torch

from unspur.config import load_config
from unspur.errors import ConfigError
from unspur.generate.ddpm import (
    _Schedule,
    build_ddpm_scheduler,
    build_ddpm_unet,
    ddim_invert,
    ddim_reverse,
    unet_eps,
)
from unspur.generate.hspace import (
    HSpace,
    InjectionSchedule,
    diffstyle_sample,
    inject,
    invert_with_h,
    nearest_timestep,
    official_local_mask,
    official_timesteps,
    slerp,
)
from unspur.methods import diffinject as di
from unspur.methods import get_method
from unspur.methods.diffinject import (
    DiffInject,
    GCEObjective,
    box_mask,
    inject_content,
    injection_requests,
    plan_injections,
    select_content,
    synthetic_budget,
)
from unspur.pipeline import prepare_data, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_ddpm():
    torch.manual_seed(0)
    unet = build_ddpm_unet(16, 3, block_out_channels=(8, 16)).eval()  # h: 16 x 8 x 8
    return unet, build_ddpm_scheduler()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------- content, budget, plan
def test_select_content_takes_top_k_losses_per_class():
    losses = np.array([0.1, 5.0, 0.3, 2.0, 9.0, 0.2, 4.0, 0.5, 3.0])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    chosen = select_content(losses, y, 3, top_k=2)
    # class 0: 5.0 (1), 2.0 (3); class 1: 9.0 (4), 4.0 (6); class 2 has one sample (8)
    assert chosen.tolist() == [1, 3, 4, 6, 8]
    with pytest.raises(ConfigError):
        select_content(losses, y, 3, top_k=0)


def test_official_defaults_are_pinned():
    d = DiffInject.defaults
    # aug_diffstyle.py / main.py of seanko29/DiffInject; paper Eq. 1, K = 10
    assert d["synthetic_ratio"] == 0.1 and d["top_k"] == 10 and d["q"] == 0.7
    assert (d["inv_steps"], d["gen_steps"], d["replace_steps"]) == (1000, 1000, 50)
    assert (d["gamma"], d["t_edit"], d["t_boost"]) == (0.7, 400, 200)
    assert (d["dt_lambda"], d["dt_end"], d["asymmetric"]) == (0.9985, 950, True)
    assert (d["allocation"], d["style_class"], d["synthetic_label"]) == (
        "uniform",
        "any",
        "content",
    )
    assert (d["final_loss"], d["final_selection"], d["biased_selection"]) == (
        "gce",
        "average",
        "average",
    )
    assert d["local_mask"] is None


def test_budget_is_a_fraction_of_the_dataset():
    assert synthetic_budget(7200, 0.1) == 720 and synthetic_budget(7209, 0.1) == 720
    assert synthetic_budget(160, 0.05) == 8 and synthetic_budget(10, 0.0) == 0
    with pytest.raises(ConfigError):
        synthetic_budget(10, 1.5)


def _cmnist_like(n_per_class: int = 720, k: int = 10):
    """Colored MNIST 1 % sizes: 7200 training images, class-ordered, K contents a class."""
    y = np.repeat(np.arange(10), n_per_class)
    content = np.concatenate([np.flatnonzero(y == c)[:k] for c in range(10)])
    pool = np.setdiff1d(np.arange(len(y)), content)
    return y, content, pool


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_class_with_a_content_sample_gets_synthetic_images(seed):
    # The old plan (72 images round-robin over 100 class-ordered contents) gave digits 8
    # and 9 none; the official budget drawn uniformly reaches every class.
    y, content, pool = _cmnist_like()
    budget = synthetic_budget(len(y), DiffInject.defaults["synthetic_ratio"])
    pairs = plan_injections(content, y, pool, budget, seed)
    assert len(pairs) == 720
    counts = np.bincount([y[c] for c, _ in pairs], minlength=10)
    assert (counts > 0).all(), counts
    stratified = plan_injections(content, y, pool, budget, seed, allocation="stratified")
    assert np.bincount([y[c] for c, _ in stratified], minlength=10).tolist() == [72] * 10


def test_plan_draws_with_replacement_and_styles_from_any_class():
    y, content, pool = _cmnist_like(n_per_class=30, k=2)
    pairs = plan_injections(content, y, pool, 200, seed=3)
    assert pairs == plan_injections(content, y, pool, 200, seed=3)  # seeded
    assert {c for c, _ in pairs} <= set(content.tolist()) and set(content) <= {c for c, _ in pairs}
    assert any(y[s] == y[c] for c, s in pairs)  # official: any bias-aligned image
    other = plan_injections(content, y, pool, 200, seed=3, style_class="other")
    assert all(y[s] != y[c] for c, s in other)
    with pytest.raises(ConfigError):
        plan_injections(content, y, pool, 5, allocation="round_robin")


def test_synthetic_label_content_or_style(tmp_path):
    config = load_config(None, helpers.DEBUG)
    train = prepare_data(config).train
    c = int(np.flatnonzero(train.y.numpy() == 0)[0])
    s = int(np.flatnonzero(train.y.numpy() == 1)[0])
    (content,) = injection_requests(train, [(c, s)], 0, {})
    (style,) = injection_requests(train, [(c, s)], 0, {}, label="style")
    assert (content.y, content.a) == (0, int(train.a[s]))
    assert (style.y, style.a) == (1, int(train.a[c]))
    assert content.parent == style.parent == train.filenames[c]


def test_gce_objective_is_lff_gce():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    p = torch.softmax(logits, 1)[:, 0]
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = (ce * p**0.7 * 0.7).mean()
    assert torch.allclose(GCEObjective(0.7)(logits, y, None, None), expected)


# ------------------------------------------------------------------- the official process
def test_official_grid_and_schedule():
    assert official_timesteps(1000) == list(range(1000))
    assert official_timesteps(50)[:4] == [0, 20, 40, 61] and official_timesteps(50)[-1] == 999
    schedule = InjectionSchedule.build(t_edit=500)
    assert len(schedule.gen_grid) == 1000 and len(schedule.replace) == 50
    assert len(schedule.inject) == 25 and min(schedule.inject) == 509
    assert sorted(schedule.stochastic) == [0, 20, 40, 61, 81, 101, 122, 142, 163, 183]
    assert sorted(schedule.shrink) == [958, 978, 999]  # dt_lambda at more than one step
    assert len(InjectionSchedule.build(t_edit=400).inject) == 30
    assert not InjectionSchedule.build(dt_lambda=1.0).shrink
    # The noise eta = 1 adds on those one-timestep steps, against eta = 1 on every
    # step below 200 of a 40-step grid (the old process): about 11 times less.
    a = build_ddpm_scheduler().alphas_cumprod.double().tolist()

    def var(t, s):
        return 0.0 if s < 0 else (1 - a[s]) / (1 - a[t]) * (1 - a[t] / a[s])

    official = sum(var(t, t - 1) for t in schedule.stochastic)
    grid40 = [round(i * 999 / 39) for i in range(40)]
    old = sum(var(t, grid40[i - 1] if i else -1) for i, t in enumerate(grid40) if t < 200)
    assert 10 < old / official < 12


def test_nearest_timestep_breaks_ties_upwards():
    assert nearest_timestep([0, 10, 20], 14) == 10 and nearest_timestep([0, 10, 20], 15) == 20
    assert nearest_timestep(official_timesteps(10)[:-1], 999) == 888


def test_content_h_comes_from_the_content_inversion_at_the_nearest_timestep(tiny_ddpm):
    unet, scheduler = tiny_ddpm
    content, style = _images(2, 1), _images(2, 2)
    _, h_inv = invert_with_h(unet, scheduler, content, steps=10)
    assert sorted(h_inv) == official_timesteps(10)[:-1]  # h_dic: the inversion's calls
    fed, own, t_now = [], [], {}
    hooks = [
        unet.register_forward_pre_hook(lambda m, a: t_now.update(t=int(a[1].flatten()[0]))),
        unet.mid_block.register_forward_hook(lambda m, i, o: own.append((t_now["t"], o))),
        unet.up_blocks[0].register_forward_pre_hook(lambda m, a: fed.append((t_now["t"], a[0]))),
    ]
    try:
        inject_content(
            unet,
            scheduler,
            content,
            style,
            [1, 2],
            inv_steps=10,
            gen_steps=10,
            replace_steps=10,
            gamma=1.0,
            t_edit=999,
            t_boost=None,
            dt_lambda=1.0,
        )
    finally:
        for hook in hooks:
            hook.remove()
    # the first U-Net call at t = 999 of generation is the injected one
    calls = [(t, h) for t, h in fed if t == 999]
    injected, style_h = calls[-2][1], [h for t, h in own if t == 999][-2]
    expected = h_inv[888]  # nearest inversion timestep to 999 on a 10-point grid
    cosine = torch.nn.functional.cosine_similarity(injected.flatten(1), expected.flatten(1))
    assert torch.allclose(cosine, torch.ones(2), atol=1e-4)
    assert torch.allclose(injected.flatten(1).norm(dim=1), style_h.flatten(1).norm(dim=1))


def test_injection_acts_only_on_replace_steps_at_or_above_t_edit(tiny_ddpm):
    unet, scheduler = tiny_ddpm
    content, style = _images(2, 1), _images(2, 2)
    grid = official_timesteps(10)
    x_style = ddim_invert(unet, scheduler, style, timesteps=grid)
    plain = ddim_reverse(unet, scheduler, x_style, grid)
    base = dict(inv_steps=10, gen_steps=10, replace_steps=10, t_boost=None, dt_lambda=1.0)
    none = inject_content(unet, scheduler, content, style, [1, 2], t_edit=1000, **base)
    assert torch.allclose(none, plain, atol=1e-5)
    top = inject_content(unet, scheduler, content, style, [1, 2], t_edit=999, gamma=0.8, **base)
    assert (top - plain).abs().max() > 1e-2
    # a replace step must also be a generation step: the 3-point replace grid
    # {0, 499, 999} meets the 10-point generation grid at {0, 999} only, so with
    # t_edit = 500 just t = 999 injects, as with t_edit = 999
    off = {**base, "replace_steps": 3}
    only_top = inject_content(unet, scheduler, content, style, [1, 2], t_edit=500, **off)
    same = inject_content(unet, scheduler, content, style, [1, 2], t_edit=999, **off)
    torch.testing.assert_close(only_top, same)


def test_eta_is_one_only_on_replace_steps_below_t_boost(tiny_ddpm):
    unet, scheduler = tiny_ddpm
    content, style = _images(2, 1), _images(2, 2)
    kwargs = dict(inv_steps=10, gen_steps=10, t_edit=1000, t_boost=900, dt_lambda=1.0)
    # replace grid {0, 999}: the only step at t <= t_boost is t = 0, whose sigma is 0,
    # so the seeds cannot matter (eta = 1 on every generation step below t_boost would)
    a = inject_content(unet, scheduler, content, style, [1, 2], replace_steps=2, **kwargs)
    b = inject_content(unet, scheduler, content, style, [7, 8], replace_steps=2, **kwargs)
    torch.testing.assert_close(a, b)
    a = inject_content(unet, scheduler, content, style, [1, 2], replace_steps=10, **kwargs)
    b = inject_content(unet, scheduler, content, style, [7, 8], replace_steps=10, **kwargs)
    assert (a - b).abs().max() > 1e-3


def test_dt_lambda_shrinks_the_direction_term_on_replace_steps_above_dt_end(tiny_ddpm):
    unet, scheduler = tiny_ddpm
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    schedule = InjectionSchedule.build(
        gen_steps=3, replace_steps=3, t_edit=1000, t_boost=None, dt_lambda=0.5, dt_end=400
    )
    assert sorted(schedule.shrink) == [499, 999]
    out = diffstyle_sample(unet, scheduler, x, {0: torch.zeros(1)}, schedule, dt_lambda=0.5)
    sched = _Schedule(scheduler)
    by_hand = x
    with torch.no_grad():
        for t, s in ((999, 499), (499, 0), (0, -1)):
            eps = unet_eps(unet, by_hand, t, sched, None)
            x0 = (by_hand - math.sqrt(1 - sched(t)) * eps) / math.sqrt(sched(t))
            shrink = 0.5 if t >= 400 else 1.0
            by_hand = math.sqrt(sched(s)) * x0 + math.sqrt(1 - sched(s)) * eps * shrink
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=1e-5)


def test_official_local_mask_is_the_fixed_h_slice_with_raw_slerp():
    h = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    content = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    mask = official_local_mask(h)
    assert mask.sum() == 6 and mask[0, 0, 4:7, 3:5].all()  # rows 4..6, columns 3..4
    out = inject(h, content, 0.5, mask=mask, norm="none")
    outside = mask.expand_as(h) == 0
    assert torch.equal(out[outside], h[outside])
    expected = slerp(h * mask, content * mask, 0.5, norm="none")  # no norm rescaling
    torch.testing.assert_close(out * mask, expected * mask)
    with pytest.raises(ConfigError):
        official_local_mask(torch.zeros(1, 4, 4, 4))


def test_local_official_changes_only_through_the_slice(tiny_ddpm):
    unet, scheduler = tiny_ddpm
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    content_h = {t: torch.randn(1, 16, 8, 8) for t in (0, 999)}
    schedule = InjectionSchedule.build(
        gen_steps=2, replace_steps=2, t_edit=999, t_boost=None, dt_lambda=1.0
    )
    seen = []
    hook = unet.up_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        diffstyle_sample(unet, scheduler, x, content_h, schedule, gamma=1.0, local="official")
    finally:
        hook.remove()
    with torch.no_grad(), HSpace(unet, record=[999]) as rec:
        unet_eps(unet, x, 999, _Schedule(scheduler), None)
    changed = (seen[0] - rec.h[999]).abs().sum(dim=1)[0] > 0
    assert changed[4:7, 3:5].all() and changed.sum() == 6


def test_box_mask():
    mask = box_mask([0.0, 0.5, 0.5, 1.0], 4)
    assert mask.shape == (1, 1, 4, 4) and mask.sum() == 4 and mask[0, 0, 0, 3] == 1
    assert box_mask(None, 4) is None
    with pytest.raises(ConfigError):
        box_mask([0.5, 0, 0.2, 1], 4)
    with pytest.raises(ConfigError):
        di.local_setting("slice", 8)


# ---------------------------------------------------------------------------- end to end
def _debug_config(*extra: str):
    method = get_method("diffinject")
    overrides = [f"method.options.{k}={v}" for k, v in method.debug_options.items()]
    return load_config(None, helpers.DEBUG + ["method.name=diffinject"] + overrides + list(extra))


def test_end_to_end_debug_dataset_needs_no_group_label(tmp_path, monkeypatch):
    built = []

    class Recording(GCEObjective):
        def __init__(self, q):
            super().__init__(q)
            built.append(q)

    monkeypatch.setattr(di, "GCEObjective", Recording)
    config = _debug_config()
    results = run(config, tmp_path)
    # final classifier selected by validation accuracy: the method reads no group label
    assert results["supervision"]["symbol"] == "x"
    assert results["selection"]["rule"] == "average"
    assert built == [0.7, 0.7]  # the biased and the final classifier both train with GCE
    biased = json.loads((tmp_path / "diffinject_biased" / "best" / "model.json").read_text())
    assert biased["extra"]["selection"] == "average"  # official best.path.tar
    train = prepare_data(config).train
    manifest = pd.read_csv(tmp_path / "diffinject_synthetic" / "manifest.csv")
    assert len(manifest) == int(0.05 * len(train)) == 8
    for _, row in manifest.iterrows():
        content = int(row["extra_content_index"])
        assert int(row["y"]) == int(train.y[content])  # the content sample's label
        assert row["parent"] == train.filenames[content]
    report = json.loads((tmp_path / "diffinject_content.json").read_text())
    assert report["n_content"] == 2 * train.n_classes and report["n_synthetic"] == 8
    fingerprint = json.loads((tmp_path / "diffinject_final" / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["train_set"]["n"] == len(train) + 8
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_worst_group_selection_is_an_option_and_is_recorded(tmp_path):
    config = _debug_config(
        "method.options.final_selection=worst_group",
        "method.options.final_loss=ce",
        "method.options.synthetic_ratio=0.0",
    )
    results = run(config, tmp_path)
    assert results["selection"]["rule"] == "worst_group"
    assert results["supervision"]["symbol"] == "✓"
    with pytest.raises(ConfigError):
        run(_debug_config("method.options.final_loss=focal"), tmp_path / "bad")
