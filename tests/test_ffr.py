"""FFR and its baselines USB / ASB: budgets, the synthetic pool, both stages, the probe."""

from __future__ import annotations

import json
from dataclasses import replace

import helpers
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unspur.config import load_config
from unspur.data.registry import load_dataset
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError
from unspur.generate.budget import synthetic_budget, usb_counts, usb_total
from unspur.generate.domain import SIZE_PRESETS
from unspur.generate.store import SyntheticStore, image_seed
from unspur.methods import get_method
from unspur.methods.ffr import (
    PROMPT_PRESETS,
    Prompter,
    fill_pool,
    freeze_batchnorm,
    grayscale_filter,
    grayscale_score,
    with_source_groups,
)
from unspur.models.restore import load_checkpoint
from unspur.pipeline import run
from unspur.train.probe import real_vs_synthetic_probe

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- budgets
def _table(counts: list[int]) -> GroupTable:
    """A 2-class x 2-attribute table with the given training group counts."""
    groups = [g for g, n in enumerate(counts) for _ in range(n)]
    frame = pd.DataFrame(
        {
            "filename": [f"mem:{i}" for i in range(len(groups))],
            "y": [g // 2 for g in groups],
            "a": [g % 2 for g in groups],
            "split": "train",
        }
    )
    images = np.zeros((len(frame), 2, 2, 3), dtype=np.uint8)
    return GroupTable(frame, ArrayStore(images), ["cat", "dog"], ["indoor", "outdoor"])


def test_budgets_match_the_official_accounting():
    table = _table([90, 10, 5, 95])
    counts = np.bincount(table.groups, minlength=table.n_groups)
    assert counts.tolist() == [90, 10, 5, 95]
    assert usb_counts(counts).tolist() == [5, 85, 90, 0]
    assert usb_total(counts) == 180

    usb = synthetic_budget("usb", counts)
    assert usb.synthetic == (5, 85, 90, 0) and usb.total == 180
    assert usb.training_counts == (95, 95, 95, 95)  # every group topped up to the largest

    asb = synthetic_budget("asb", counts)
    assert asb.synthetic == (45, 45, 45, 45) and asb.matched_total == 180
    assert asb.training_counts == (135, 55, 50, 140)  # added to the real data

    ffr = synthetic_budget("ffr", counts)
    assert ffr.synthetic == (45, 45, 45, 45)
    assert ffr.training_counts == (45, 45, 45, 45)  # stage 1 sees synthetic images only
    record = ffr.to_dict(["a", "b", "c", "d"])
    assert record["synthetic_total"] == 180 and record["real_total"] == 200
    assert record["groups"][1] == {"group": 1, "name": "b", "real": 10, "synthetic": 45,
                                   "training": 45}  # fmt: skip

    # num_gen // G, as the official scripts: the remainder is recorded as unspent.
    odd = synthetic_budget("ffr", [10, 4, 2, 10])  # USB needs 6 + 8 = 14
    assert odd.synthetic == (3, 3, 3, 3) and odd.unspent == 2
    assert synthetic_budget("asb", [10, 4, 2, 10], total=40).synthetic == (10, 10, 10, 10)
    with pytest.raises(ConfigError, match="USB's budget is fixed"):
        synthetic_budget("usb", [10, 4], total=3)
    with pytest.raises(ConfigError, match="mode"):
        synthetic_budget("mixed", [1, 2])


# ------------------------------------------------------------------ prompts, filters
def test_prompts_are_deterministic_per_image_and_presets_follow_the_paper():
    preset = PROMPT_PRESETS["utkface"]
    prompter = Prompter(
        ["male", "female"],
        ["child (age<=10)", "adult (age>=20)"],
        preset["prompt_template"],
        preset["class_words"],
        preset["bias_words"],
    )
    text = prompter(1, 0, seed=3, g=2, i=7)
    assert text == prompter(1, 0, seed=3, g=2, i=7)
    assert text.startswith("a headshot of a human Female ")
    assert text.removeprefix("a headshot of a human Female ") in preset["bias_words"][0]
    drawn = {prompter(0, 1, seed=0, g=1, i=i) for i in range(40)}
    assert len(drawn) > 1  # the age phrase is drawn per image
    plain = Prompter(["circle", "cross"], ["land", "water"], "A photo of {bias} {class}")
    assert plain(1, 0, 0, 2, 0) == "A photo of land cross"
    assert image_seed(0, 2, 7) == image_seed(0, 2, 7) != image_seed(1, 2, 7)
    spuco = PROMPT_PRESETS["spuco_animals"]
    animals = Prompter(["landbird", "waterbird"], ["land", "water"], spuco["prompt_template"],
                       spuco["class_words"], spuco["bias_words"])  # fmt: skip
    assert animals(1, 1, 0, 3, 0).startswith("a photo of ")
    with pytest.raises(ConfigError, match="must contain"):
        Prompter(["a"], ["b"], "a photo of {class}")


def test_grayscale_filter_drops_gray_images_like_the_official_check():
    gray = Image.new("RGB", (8, 8), (90, 90, 90))
    colour = Image.new("RGB", (8, 8), (200, 40, 30))
    assert grayscale_score(gray) == 0.0
    assert grayscale_score(colour) == pytest.approx(abs((200 + 40 + 30) / 3 - 200))
    results = grayscale_filter()(None, [gray, colour])
    assert [r.keep for r in results] == [False, True]
    assert results[0].reason == "grayscale image"


def test_pool_tops_up_filtered_groups_and_reports_a_shortfall(tmp_path):
    table = _table([4, 1, 1, 4])
    calls = []

    def generate(batch):
        calls.append([r.key for r in batch])
        # Every image whose index is odd comes out gray (dropped by the filter).
        return [
            Image.new("RGB", (4, 4), (90, 90, 90) if r.extra["i"] % 2 else (200, 40, 30))
            for r in batch
        ]

    prompter = Prompter(table.class_names, table.attr_names, "A photo of {bias} {class}")
    store = SyntheticStore(tmp_path / "pool")
    kwargs = dict(seed=0, generator_name="fake", weights_id="fake", batch_size=4,
                  filters=[grayscale_filter()])  # fmt: skip
    chosen = fill_pool(store, np.array([0, 3, 3, 0]), table, prompter, generate, **kwargs)
    assert chosen == {1: ["g1/000000", "g1/000002", "g1/000004"],
                      2: ["g2/000000", "g2/000002", "g2/000004"]}  # fmt: skip
    generated = sum(len(c) for c in calls)
    assert generated == 10  # indexes 0..4 of both groups: 0, 2, 4 kept, 1, 3 gray
    rows = store.rows()
    assert rows["g1/000001"]["kept"] is False and rows["g1/000001"]["reason"] == "grayscale image"
    # A second call with the same targets generates nothing (the pool is reused).
    again = fill_pool(store, np.array([0, 3, 3, 0]), table, prompter, generate, **kwargs)
    assert again == chosen and sum(len(c) for c in calls) == generated
    # max_tries caps the attempts: 4 kept images need 8 tries, 1.5 x 4 = 6 allowed.
    short = fill_pool(store, np.array([4, 0, 0, 0]), table, prompter, generate,
                      **{**kwargs, "max_tries": 1.5})  # fmt: skip
    assert short[0] == ["g0/000000", "g0/000002", "g0/000004"]


def test_source_groups_split_every_group_by_real_and_synthetic():
    table = _table([2, 1, 1, 2])
    frame = table.frame.assign(source=["real", "synthetic"] * 3)
    relabelled = with_source_groups(table.with_frame(frame))
    assert relabelled.attr_names == ["indoor", "indoor (synthetic)", "outdoor",
                                     "outdoor (synthetic)"]  # fmt: skip
    assert relabelled.frame["a"].tolist() == [0, 1, 2, 1, 2, 3]
    assert relabelled.frame["true_a"].tolist() == table.frame["a"].tolist()


def test_frozen_batchnorm_keeps_its_running_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = model[1].running_mean.clone()
    assert freeze_batchnorm(model) == 1
    model.train()
    model(torch.randn(8, 3, 6, 6) + 5)
    assert torch.equal(model[1].running_mean, before)


# ------------------------------------------------------------------------- probe
def test_probe_reports_accuracy_per_group():
    rng = np.random.default_rng(0)
    n = 40
    x, g, s = [], [], []
    for group, shift in ((0, 4.0), (1, 0.0)):
        for synthetic in (False, True):
            features = rng.normal(size=(n, 6))
            if synthetic:
                features[:, 0] += shift
            x.append(features)
            g += [group] * n
            s += [synthetic] * n
    x.append(rng.normal(size=(5, 6)))  # group 2: real images only
    g += [2] * 5
    s += [False] * 5
    result = real_vs_synthetic_probe(np.concatenate(x), np.array(g), np.array(s), 3,
                                     ["a", "b", "c"], folds=4)  # fmt: skip
    acc = result.accuracies
    assert acc[0] > 0.95  # the source is linearly decodable
    assert 0.2 < acc[1] < 0.8  # same distribution: about chance
    assert acc[2] is None and result.groups[2]["n_synthetic"] == 0
    assert result.mean_accuracy == pytest.approx((acc[0] + acc[1]) / 2)
    assert result.to_dict()["groups"][0]["n_per_source"] == n


# --------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def domain_model(tmp_path_factory):
    """One tiny domain model of the debug dataset, shared by the end-to-end tests."""
    from unspur.generate.domain import DomainModelConfig, train_domain_model

    config = load_config(None, helpers.DEBUG)
    options = dict(config.data.options)
    table = load_dataset("synthetic", **options).split("train")
    out = tmp_path_factory.mktemp("domain")
    debug = get_method("ffr").debug_options["domain"]
    train_domain_model(table, out, DomainModelConfig(**debug))
    return out


def _run(tmp_path, name: str, generator, *extra: str) -> dict:
    debug = [f"method.options.{k}={v}" for k, v in get_method(name).debug_options.items()]
    overrides = helpers.DEBUG + [f"method.name={name}"] + debug
    overrides += [f"method.options.generator={generator}", *extra]
    return run(load_config(None, overrides), tmp_path)


def test_ffr_runs_end_to_end_and_stage2_starts_from_stage1(tmp_path, domain_model, monkeypatch):
    from unspur.methods.erm import ERM

    received = {}
    original = ERM.run

    def spy(self, context):
        model = context.build_model()
        received["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(self, context)

    monkeypatch.setattr(ERM, "run", spy)
    results = _run(tmp_path, "ffr", domain_model, "method.options.probe=true")
    assert results["method"] == "ffr" and results["supervision"]["symbol"] == "✓✓"
    assert results["stages"] == ["ffr/pretrain", "ffr/finetune/erm"]

    stage1 = load_checkpoint(tmp_path / "ffr" / "pretrain" / "best").state_dict()
    assert received["weights"].keys() == stage1.keys()
    for key, value in stage1.items():
        assert torch.equal(received["weights"][key], value), key
    final = load_checkpoint(tmp_path / "model").state_dict()
    assert any(not torch.equal(final[k], stage1[k]) for k in stage1)  # stage 2 trained

    info = json.loads((tmp_path / "ffr" / "budget.json").read_text())
    real = [g["real"] for g in info["budget"]["groups"]]
    per_group = usb_total(real) // 4
    assert info["budget"]["mode"] == "ffr"
    assert [g["synthetic"] for g in info["budget"]["groups"]] == [per_group] * 4
    assert info["budget"]["matched_total"] == usb_total(real)
    assert info["generation"]["used_per_group"] == [per_group] * 4
    assert info["generation"]["example_prompts"]["circle / water"] == "a photo of a circle on water"
    assert info["stage1"]["selection"] == "worst_group"
    manifest = pd.read_csv(tmp_path / "ffr" / "synthetic" / "manifest.csv")
    assert len(manifest) == 4 * per_group and manifest["kept"].all()
    assert manifest["seed"].tolist() == [image_seed(0, g, i) for g in range(4)
                                         for i in range(per_group)]  # fmt: skip
    probe = json.loads((tmp_path / "ffr" / "probe.json").read_text())
    assert len(probe["groups"]) == 4
    assert all(g["accuracy"] is None or 0.0 <= g["accuracy"] <= 1.0 for g in probe["groups"])
    assert any(g["accuracy"] is not None for g in probe["groups"])


def test_usb_and_asb_share_one_pool_of_images(tmp_path, domain_model):
    pool = tmp_path / "pool"
    usb = _run(tmp_path / "usb", "usb", domain_model, f"method.options.store={pool}",
               "method.options.train_method=resample_group")  # fmt: skip
    assert usb["stages"] == ["usb/train/resample_group"]
    usb_info = json.loads((tmp_path / "usb" / "usb" / "budget.json").read_text())
    groups = usb_info["budget"]["groups"]
    largest = max(g["real"] for g in groups)
    assert [g["training"] for g in groups] == [largest] * 4
    generated = len(SyntheticStore(pool).rows())
    assert generated == usb_info["budget"]["synthetic_total"]

    asb = _run(tmp_path / "asb", "asb", domain_model, f"method.options.store={pool}")
    asb_info = json.loads((tmp_path / "asb" / "asb" / "budget.json").read_text())
    per_group = usb_info["budget"]["synthetic_total"] // 4
    assert [g["synthetic"] for g in asb_info["budget"]["groups"]] == [per_group] * 4
    assert asb["stages"] == ["asb/train/erm"]
    # ASB's images are the first images of each group of USB's pool: only the groups
    # USB did not fill that far were generated.
    needed = sum(max(0, per_group - g["synthetic"]) for g in groups)
    assert len(SyntheticStore(pool).rows()) == generated + needed


def test_runs_with_the_same_pool_inputs_share_it_through_the_cache(tmp_path, domain_model):
    """``shared_cache``: a run restores the pool of an earlier run with the same
    generation inputs (another ``train_method``; FFR after ASB, the same targets; another
    run seed with a fixed ``generation_seed``): the same images a run without the cache
    makes. USB (other targets) and another generation seed make their own."""
    cache = f"method.options.shared_cache={tmp_path / 'shared'}"
    gdro = "method.options.train_method=groupdro"
    _run(tmp_path / "asb", "asb", domain_model, cache)
    _run(tmp_path / "ffr", "ffr", domain_model, cache, gdro)
    _run(tmp_path / "alone", "ffr", domain_model, gdro)
    _run(tmp_path / "usb", "usb", domain_model, cache)
    _run(tmp_path / "seed5", "asb", domain_model, cache, "method.options.generation_seed=5")
    _run(
        tmp_path / "run1", "asb", domain_model, cache, "seed=1", "method.options.generation_seed=5"
    )

    def generation(name, method):
        info = json.loads((tmp_path / name / method / "budget.json").read_text())
        return info["generation"]["restored_from_shared_cache"]

    def manifest(name, method):
        return pd.read_csv(tmp_path / name / method / "synthetic" / "manifest.csv")

    assert generation("asb", "asb") == {} and generation("alone", "ffr") == {}
    assert generation("usb", "usb") == {} and generation("seed5", "asb") == {}
    assert set(generation("ffr", "ffr")) == {"synthetic"}
    assert set(generation("run1", "asb")) == {"synthetic"}
    created = manifest("asb", "asb")["created"].tolist()
    assert manifest("ffr", "ffr")["created"].tolist() == created
    assert manifest("alone", "ffr")["created"].tolist() != created
    for name in manifest("alone", "ffr")["filename"]:
        made = (tmp_path / "alone" / "ffr" / "synthetic" / name).read_bytes()
        assert (tmp_path / "ffr" / "ffr" / "synthetic" / name).read_bytes() == made
    assert len(list((tmp_path / "shared").iterdir())) == 3  # ASB/FFR's, USB's, seed 5's


def test_ffr_with_a_pipeline_directory_and_a_template(tmp_path):
    from unspur.generate.components import build_pipeline

    torch.manual_seed(0)
    sizes = replace(SIZE_PRESETS["tiny"], image_size=16)
    build_pipeline("text2image", sizes).save_pretrained(tmp_path / "sd")
    results = _run(tmp_path / "run", "ffr", tmp_path / "sd", "method.options.grayscale_filter=true",
                   "method.options.finetune={epochs: 1}", "method.options.budget=18")  # fmt: skip
    info = json.loads((tmp_path / "run" / "ffr" / "budget.json").read_text())
    assert [g["synthetic"] for g in info["budget"]["groups"]] == [4] * 4  # 18 // 4
    assert info["budget"]["unspent"] == 2
    assert info["generation"]["example_prompts"]["cross / land"] == "A photo of land cross"
    assert info["generation"]["filters"] == ["grayscale_filter"]
    assert info["stage2"]["train"]["epochs"] == 1
    assert results["metrics"]["test"]["worst_group_accuracy"] >= 0.0


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train_method cannot be 'usb'"):
        _run(tmp_path, "ffr", "domain", "method.options.train_method=usb")
    with pytest.raises(ConfigError, match="prompt_preset"):
        _run(tmp_path, "ffr", "domain", "method.options.prompt_preset=imagenet")


def test_ffr_table2_preset_and_the_lr_search_protocol(tmp_path, domain_model):
    # Table 2 preset by name: UTKFace at 99.9 % (level given: the debug data is not resplit).
    preset = ["method.options.preset=utkface", "method.options.level=0.999",
              "method.options.pretrain={epochs: 1, batch_size: 32}",
              "method.options.finetune={epochs: 1, batch_size: 32}"]  # fmt: skip
    _run(tmp_path / "preset", "ffr", domain_model, *preset)
    info = json.loads((tmp_path / "preset" / "ffr" / "budget.json").read_text())
    stage1, stage2 = info["stage1"]["train"], info["stage2"]["train"]
    assert (stage1["lr"], stage2["lr"]) == (1e-4, 1e-6)
    assert stage1["weight_decay"] == stage2["weight_decay"] == 1e-5
    assert stage2["optimizer"] == "adam" and stage2["augment"] is False
    assert (
        stage2["scheduler"] == "none" and stage2["sources"]["epochs"] == "method.options.finetune"
    )
    assert "Table 2(b)" in stage2["sources"]["lr"]

    # The paper's protocol: a learning-rate grid per stage, chosen on validation WGA.
    grid = ["method.options.lr_search=true", "method.options.lr_grid=[0.01, 0.001]",
            "method.options.pretrain={epochs: 1}", "method.options.finetune={epochs: 1}"]  # fmt: skip
    results = _run(tmp_path / "search", "ffr", domain_model, *grid)
    assert results["stages"] == ["ffr/pretrain/lr_0.01", "ffr/pretrain/lr_0.001",
                                 "ffr/finetune/lr_0.01/erm", "ffr/finetune/lr_0.001/erm"]  # fmt: skip
    info = json.loads((tmp_path / "search" / "ffr" / "budget.json").read_text())
    saved = json.loads((tmp_path / "search" / "results.json").read_text())
    assert saved["method_record"]["lr_search"] == info["lr_search"]  # in the results
    for search, key in zip(info["lr_search"], ("stage1", "stage2")):
        trials = search["trials"]
        assert [t["lr"] for t in trials] == [0.01, 0.001]
        best = max(
            trials, key=lambda t: (t["val_worst_group_accuracy"], t["val_balanced_accuracy"])
        )
        assert search["chosen_lr"] == best["lr"] == info[key]["train"]["lr"]
        assert info[key]["train"]["sources"]["lr"] == "lr_search"


def test_usb_and_none_train_with_the_papers_optimizer(tmp_path, domain_model):
    # The run's train section (helpers.DEBUG) is SGD with augmentation; USB must not be.
    _run(tmp_path / "usb", "usb", domain_model, "method.options.train={epochs: 1}")
    train = json.loads((tmp_path / "usb" / "usb" / "budget.json").read_text())["train"]
    assert (train["optimizer"], train["augment"], train["scheduler"]) == ("adam", False, "none")
    overrides = ["method.name=ffr_none", "method.options.preset=spuco_animals",
                 "method.options.level=0.97", "method.options.train_method=groupdro",
                 "method.options.train={epochs: 1, batch_size: 32}"]  # fmt: skip
    none = run(load_config(None, helpers.DEBUG + overrides), tmp_path / "none")
    assert none["stages"] == ["ffr_none/groupdro/groupdro"]
    record = json.loads((tmp_path / "none" / "ffr_none" / "training.json").read_text())
    assert (record["train"]["lr"], record["train"]["weight_decay"]) == (1e-5, 1e-3)
