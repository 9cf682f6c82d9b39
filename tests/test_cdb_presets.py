"""Clustered DreamBooth's paper values (clustered_dreambooth.md A.1-A.8) and the severe-bias
borrowing rule of A.5 / A.6 (issue 17)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import helpers
import numpy as np
import pandas as pd
import pytest
import torch

from unspur.config import RunConfig, TrainConfig, load_config
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError
from unspur.methods import cdb_presets as P
from unspur.methods.clustered_dreambooth import ClusteredDreamBooth, SupConEq3Objective
from unspur.pipeline import run
from unspur.train.losses import supervised_contrastive_loss

CDB = ClusteredDreamBooth


def test_paper_values_are_pinned_and_are_the_defaults():
    assert P.CLASSIFIER == {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 1e-3,
                            "batch_size": 128, "epochs": 20, "scheduler": "none",
                            "augment": False}  # fmt: skip
    assert P.GENERATION == {"n_per_group": 5000, "keep_fraction": 0.75, "alpha": 0.5,
                            "steps": 50, "guidance_scale": 7.5,
                            "generator": "CompVis/stable-diffusion-v1-4"}  # fmt: skip
    assert P.LORA_FINETUNE == {"rank": 16, "alpha": 16, "steps": 200, "warmup_steps": 0}
    assert (P.BETA, P.TEMPERATURE) == (0.5, 1.0)
    assert {k: v["k_D"] for k, v in P.DATASET_PRESETS.items()} == {
        "waterbirds": 3, "celeba": 20, "utkface": 5}  # fmt: skip
    assert P.DATASET_PRESETS["utkface"]["steps"] == {"clustered_dreambooth": 25}
    d = CDB.defaults
    assert (d["n_per_group"], d["steps"], d["alpha"], d["keep_fraction"]) == (5000, 50, 0.5, 0.75)
    assert (d["beta"], d["temperature"], d["supcon"], d["classifier"]) == (0.5, 1.0, "eq3", "paper")
    assert d["lora_finetune"] == P.LORA_FINETUNE
    steps = CDB.resolve_preset({**d, "preset": "utkface"})
    assert CDB.sampling_steps(steps) == 25
    assert CDB.sampling_steps({**steps, "mode": "dreambooth"}) == 50


@dataclass
class _Context:
    config: RunConfig = field(default_factory=RunConfig)


def test_both_stages_train_with_a2_a8_settings():
    context = _Context(RunConfig(train=TrainConfig(optimizer="adam", lr=0.1, augment=True)))
    options = dict(CDB.defaults)
    for key, head in (("pretrain", False), ("head", True), ("finetune", False)):
        config = CDB()._train_config(context, options, key, head=head)
        assert (config.optimizer, config.lr, config.weight_decay) == ("sgd", 1e-3, 1e-3), key
        assert (config.batch_size, config.epochs, config.augment) == (128, 20, False), key
    config = CDB()._train_config(context, {**options, "head": {"epochs": 3}}, "head", head=True)
    assert config.epochs == 3 and config.lr == 1e-3
    run_config = CDB()._train_config(context, {**options, "classifier": "run"}, "pretrain")
    assert (run_config.optimizer, run_config.lr) == ("adam", 0.1)


def _table(counts, class_names, attr_names, name, majority) -> GroupTable:
    rows = [(g // 2, g % 2) for g, n in enumerate(counts) for _ in range(n)]
    frame = pd.DataFrame(rows, columns=["y", "a"])
    frame.insert(0, "filename", [f"i{i}" for i in range(len(frame))])
    frame["split"] = "train"
    return GroupTable(frame, ArrayStore(np.zeros((1, 1, 1), np.uint8)), class_names, attr_names,
                      name=name, info={"majority_attr": majority})  # fmt: skip


def _plans(table, mode="dreambooth", severe_level=True, embeddings=None, **options):
    counts = np.bincount(table.groups, minlength=table.n_groups)
    resolved = CDB.resolve_preset(CDB.resolve_options({"mode": mode, **options}))
    gens, plans, k = CDB()._plan(resolved, table, counts, embeddings, 0, severe_level)
    return {p.group: p for p in plans}, k


def test_celeba_and_utkface_borrow_as_a6_says():
    # CelebA at 0.999 (Blond_Hair x Male, scaled): blond men (23 >= 20) borrow as well.
    celeba = _table([67, 668, 2288, 23], ["not Blond_Hair", "Blond_Hair"], ["not Male", "Male"],
                    "celeba", ["Male", "not Male"])  # fmt: skip
    plans, _ = _plans(celeba, preset="celeba")
    assert {g: p.source for g, p in plans.items()} == {0: 1, 1: 1, 2: 2, 3: 2}
    assert plans[3].prompt == "Photo of a ((male)) person with blond hair"
    assert plans[3].negative_prompt == "((female)), grayscale"
    assert plans[0].prompt == "Photo of a non-blond ((female)) person"
    assert plans[0].negative_prompt == "((male)), grayscale, blond hair"
    assert plans[2].prompt == "photo of a sks person with blond hair"
    assert plans[1].negative_prompt == "grayscale, blond hair"
    vanilla, _ = _plans(celeba, mode="vanilla", preset="celeba")
    assert vanilla[0].prompt == "photo of a female person" and not vanilla[0].borrowed
    # The original dataset (no severe level): nobody borrows (every group has >= 20).
    original, _ = _plans(celeba, severe_level=False, preset="celeba")
    assert not any(p.borrowed for p in original.values())

    # UTKFace at 0.999, majority cdb: female children from the male-children models.
    utk = _table([934, 1, 1, 5730], ["male", "female"], ["child (age<=10)", "adult (age>=20)"],
                 "utkface", ["child", "adult"])  # fmt: skip
    plans, _ = _plans(utk, preset="utkface")
    assert {g: p.source for g, p in plans.items()} == {0: 0, 1: 3, 2: 0, 3: 3}
    assert plans[2].prompt == "Photo of a ((female)) person who is a child"
    assert plans[2].negative_prompt == "((male)), grayscale"
    assert plans[1].prompt == "Photo of a ((male)) person who is a adult"
    assert plans[0].prompt == "photo of a sks male person"
    with pytest.raises(ConfigError, match="internal name"):
        _plans(utk)  # no words: "child (age<=10)" must not reach a prompt


def test_k_d_is_fixed_by_the_preset():
    table = _table([120, 40, 40, 120], ["landbird", "waterbird"], ["land", "water"],
                   "waterbirds", ["land", "water"])  # fmt: skip
    embeddings = torch.nn.functional.normalize(torch.randn(320, 8, generator=torch.Generator()
                                                           .manual_seed(0)), dim=1)  # fmt: skip
    plans, k = _plans(table, mode="clustered_dreambooth", severe_level=False,
                      embeddings=embeddings, preset="waterbirds")  # fmt: skip
    assert k == 3  # the rule on these counts would give round(40 / 20) = 2
    assert plans[0].prompt == "photo of a sks bird" and len(plans[0].generators) == 3
    _, k = _plans(table, mode="clustered_dreambooth", severe_level=False, embeddings=embeddings)
    assert k == 2


def test_supcon_eq3_against_its_formula():
    torch.manual_seed(0)
    features, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 1, 0])
    z = torch.nn.functional.normalize(features, dim=1)
    sim = z @ z.t()  # tau = 1
    eq3, l_out = 0.0, 0.0
    for j in range(6):
        pos = [p for p in range(6) if p != j and y[p] == y[j]]
        neg = [n for n in range(6) if y[n] != y[j]]
        others = [a for a in range(6) if a != j]
        eq3 += -sum(sim[j, p] - torch.logsumexp(sim[j, neg], 0) for p in pos) / len(pos)
        l_out += -sum(sim[j, p] - torch.logsumexp(sim[j, others], 0) for p in pos) / len(pos)
    got = supervised_contrastive_loss(features, y, 1.0, reduction="sum", denominator="negatives")
    assert got.item() == pytest.approx(float(eq3), rel=1e-5)
    assert supervised_contrastive_loss(features, y, 1.0).item() == pytest.approx(float(l_out) / 6,
                                                                                rel=1e-5)  # fmt: skip
    logits = torch.randn(6, 2)
    objective = SupConEq3Objective(0.5, 1.0, "eq3")
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert objective.combine(logits, features, y).item() == pytest.approx(
        0.5 * ce.item() + 0.5 * float(eq3), rel=1e-5)  # fmt: skip
    same = supervised_contrastive_loss(features, torch.zeros(6, dtype=torch.long), 1.0,
                                       reduction="sum", denominator="negatives")  # fmt: skip
    assert same.item() == 0.0  # no negative anywhere: every anchor left out, no NaN


def test_borrowed_groups_are_filtered_by_clip_label_only(tmp_path):
    # 64 / 16 / 16 / 64: the conflicting groups have enough images for a centroid, yet at
    # severe bias they are generated by borrowed models and scored with alpha = 1 (A.5).
    options = {k: v for k, v in CDB.debug_options.items() if k not in ("max_clusters",)}
    overrides = [f"method.options.{k}={v}" for k, v in options.items()]
    overrides += ["method.name=clustered_dreambooth", "method.options.mode=dreambooth",
                  "method.options.severe=true", "method.options.fid=false",
                  "data.options.bias=0.8"]  # fmt: skip
    run(load_config(None, helpers.DEBUG + overrides), tmp_path)
    base = tmp_path / "clustered_dreambooth" / "dreambooth"
    summary = json.loads((base / "summary.json").read_text())
    borrowed = {p["group"] for p in summary["plans"] if p["borrowed"]}
    assert borrowed == {1, 2}
    frame = pd.read_csv(base / "filter.csv")
    alphas = frame.groupby("g")["alpha"].first().to_dict()
    assert alphas == {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.5}


@pytest.mark.parametrize(
    ("name", "preset", "ratio"),
    [("waterbirds_cdb", "waterbirds", None), ("waterbirds_cdb_0999", "waterbirds", 0.999),
     ("celeba_cdb", "celeba", None), ("celeba_cdb_0999", "celeba", 0.999),
     ("utkface_cdb", "utkface", None), ("utkface_cdb_0999", "utkface", 0.999)],
)  # fmt: skip
def test_shipped_configs_carry_the_paper_settings(name, preset, ratio):
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    options = config.method.options
    assert options["preset"] == preset and config.data.bias_ratio == ratio
    assert options["severe"] is (ratio is not None)
    assert options["generator"] == "CompVis/stable-diffusion-v1-4"
    assert (options["n_per_group"], options["classifier"], options["supcon"]) == (
        5000, "paper", "eq3")  # fmt: skip
    if preset == "utkface":
        assert config.data.options["majority"] == "cdb"
        assert (config.data.options.get("train_groups") == "cdb_original") == (ratio is None)
