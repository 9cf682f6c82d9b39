"""Clustered DreamBooth: the k_D rule, CLIP-score selection, k-means, FID, and the method
end to end on the debug dataset with a tiny domain model and a tiny random CLIP."""

from __future__ import annotations

import json

import helpers
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unspur.bench.measurements import cdb_clusters
from unspur.config import load_config
from unspur.errors import ConfigError
from unspur.evaluate.fid import (
    fid_from_features,
    fid_per_group,
    frechet_distance,
)
from unspur.generate.clip_score import cosine_to, filter_score, group_centroid
from unspur.methods import get_method
from unspur.methods.clustered_dreambooth import (
    ClusteredDreamBooth,
    cluster_count,
    filter_alpha,
    kmeans_clusters,
    select_images,
    split_evenly,
)
from unspur.pipeline import run

torch.set_num_threads(1)


# ------------------------------------------------------------------ rules
def test_cluster_count_rule():
    # k_D = max(1, min(round(M_smallest / 20), 20)), A.4, rounded as its numbers show
    assert [cluster_count(n) for n in (0, 1, 29, 30, 39, 49, 50, 389, 390, 10_000)] == [
        1, 1, 1, 2, 2, 2, 3, 19, 20, 20,
    ]  # fmt: skip
    # The paper's datasets (A.4): Waterbirds 56 -> 3, UTKFace 103 -> 5, CelebA 1387 -> 20.
    assert [cluster_count(n) for n in (56, 103, 1387)] == [3, 5, 20]
    assert cluster_count(72, per_cluster=20, cap=2) == 2
    with pytest.raises(ConfigError):
        cluster_count(10, per_cluster=0)
    assert split_evenly(10, 3) == [4, 3, 3] and sum(split_evenly(7, 7)) == 7
    assert split_evenly(2, 3) == [1, 1, 0]


def test_clip_score_ranking_on_constructed_embeddings():
    text = torch.tensor([1.0, 0.0, 0.0])  # "Photo of a {class}"
    real = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.9, 0.1]])  # the group's real images
    centroid = group_centroid(real)
    fake = torch.nn.functional.normalize(
        torch.tensor(
            [
                [1.0, 1.0, 0.0],  # shows the class and looks like the group: best
                [1.0, 0.0, 1.0],  # the class, not the group
                [0.0, 1.0, 1.0],  # the group, not the class
                [0.0, 0.0, 1.0],  # neither: worst
            ]
        ),
        dim=-1,
    )
    label = fake @ text
    score = filter_score(label, cosine_to(fake, centroid), alpha=0.5).numpy()
    assert np.argmax(score) == 0 and np.argmin(score) == 3
    keep = select_images(score, np.zeros(4), "clip", 0.75, seed=0)
    assert keep.tolist() == [True, True, True, False]  # ceil(0.75 * 4) = 3
    # alpha = 1: only the label counts (too few real images for a centroid)
    only_label = filter_score(label, cosine_to(fake, centroid), alpha=1.0)
    assert torch.allclose(only_label, label)
    assert filter_alpha(3, 0.5, 10) == 1.0 and filter_alpha(10, 0.5, 10) == 0.5
    # per group: a small group keeps its share; random keeps the same counts, seeded
    groups = np.array([0] * 8 + [1] * 4)
    scores = np.arange(12, dtype=float)
    top = select_images(scores, groups, "clip", 0.75, seed=0)
    assert top[:8].sum() == 6 and top[8:].sum() == 3 and not top[0] and not top[8]
    rand = select_images(scores, groups, "random", 0.75, seed=1)
    assert rand[:8].sum() == 6 and rand[8:].sum() == 3
    assert (rand == select_images(scores, groups, "random", 0.75, seed=1)).all()
    assert select_images(scores, groups, "none", 0.75, seed=0).all()


def test_kmeans_separates_blobs():
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 5
    x = np.concatenate([c + 0.1 * rng.normal(size=(10, 4)) for c in centres])
    labels = kmeans_clusters(x, 3, seed=0)
    assert labels[0] == 0  # renumbered by first appearance
    for block in range(3):
        assert len(set(labels[block * 10 : (block + 1) * 10])) == 1
    assert len(set(labels)) == 3
    assert kmeans_clusters(x[:2], 5, seed=0).tolist() == [0, 1]  # fewer rows than k
    assert kmeans_clusters(x, 1, seed=0).tolist() == [0] * 30


# ------------------------------------------------------------------- FID
def test_fid_zero_on_itself_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)
    shifts = [fid_from_features(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([5 * 0.25, 5 * 1.0, 5 * 4.0], rel=1e-6)  # |d mu|^2
    # closed form in one dimension: (m1 - m2)^2 + (s1 - s2)^2
    value = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]]))
    assert value == pytest.approx(1.0 + 1.0)


def test_fid_per_group_with_a_pluggable_extractor():
    def image(value: int) -> Image.Image:
        return Image.new("RGB", (4, 4), (value, value, value))

    def extractor(images):  # mean brightness and a constant second feature
        return np.asarray([[np.asarray(im).mean() / 255.0, 1.0] for im in images])

    real = [image(v) for v in (10, 20, 30, 200, 210, 220)]
    real_g = [0, 0, 0, 1, 1, 1]
    fake = [image(v) for v in (10, 20, 30, 100, 110, 120, 5)]
    fake_g = [0, 0, 0, 1, 1, 1, 2]
    result = fid_per_group(real, real_g, fake, fake_g, extractor)
    assert result[0]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert result[1]["fid"] > 0.1 and result[1]["n_fake"] == 3
    assert result[2]["fid"] is None and result[2]["n_real"] == 0


# ------------------------------------------------------------ end to end
def _config(overrides):
    options = [f"method.options.{k}={v}" for k, v in ClusteredDreamBooth.debug_options.items()]
    return load_config(
        None,
        helpers.DEBUG + ["method.name=clustered_dreambooth"] + options + overrides,
    )


@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cdb")
    results = run(_config([]), out)
    return out, results


def test_registered_with_modes():
    method = get_method("clustered_dreambooth")
    assert method.defaults["mode"] == "clustered_dreambooth"
    assert method.supervision.symbol == "✓✓"
    with pytest.raises(ConfigError, match="mode"):
        run(_config(["method.options.mode=textual"]), "/tmp/never-used-cdb")


def test_one_lora_per_cluster_is_trained_and_used(clustered_run):
    out, results = clustered_run
    base = out / "clustered_dreambooth" / "clustered_dreambooth"
    summary = json.loads((base / "summary.json").read_text())
    k = summary["k_D"]
    assert k == 2  # round(72 / 20) = 4, capped by the debug max_clusters=2
    plans = {p["group"]: p for p in summary["plans"]}
    trained = sorted({p["source"] for p in plans.values()})
    borrowed = [g for g, p in plans.items() if p["borrowed"]]
    assert borrowed and set(trained).isdisjoint(borrowed)  # 8-image groups borrow
    loras = {g["name"]: g["lora_dir"] for g in summary["generators"]}
    assert len(loras) == k * len(trained) and len(set(loras.values())) == len(loras)
    for g in summary["generators"]:  # what each cluster holds (the cdb_clusters column)
        assert g["instance_groups"] == {plans[g["group"]]["name"]: g["instance_images"]}
    clusters = cdb_clusters(out, {})
    assert clusters["CLIP filter"].startswith("CLIP filter untested")  # debug: tiny CLIP
    for directory in loras.values():
        assert (
            __import__("pathlib").Path(directory) / "pytorch_lora_weights.safetensors"
        ).is_file()

    frame = pd.read_csv(base / "filter.csv")
    manifest = pd.read_csv(base / "synthetic" / "manifest.csv")
    assert len(frame) == len(manifest) == 4 * 8  # n_per_group per group
    for g, rows in frame.groupby("g"):
        source = plans[g]["source"]
        used = set(rows["lora"])
        expected = {d for name, d in loras.items() if name.startswith(f"g{source}_")}
        assert used == expected  # every cluster's LoRA generated images of the group
        assert sorted(rows["cluster"].unique()) == list(range(k))
        assert rows["selected"].sum() == 6  # ceil(0.75 * 8)
    extra = manifest[manifest["key"].str.startswith(f"g{borrowed[0]}/")]
    assert extra["extra_negative_prompt"].notna().all()
    assert (extra["extra_source_group"] == plans[borrowed[0]]["source"]).all()
    assert "sks" not in plans[borrowed[0]]["prompt"]  # identifier dropped
    assert "sks" in plans[trained[0]]["prompt"]

    cost = json.loads((base / "cost.json").read_text())
    assert {"generation", "stage1", "stage2", "clip_filter"} <= set(cost)
    assert sum(key.startswith("lora/") for key in cost) == len(loras)
    record = results["history"][-1]["clustered_dreambooth"] if "history" in results else None
    assert record is None or record["mode"] == "clustered_dreambooth"
    assert set(summary["fid"]) and all("fid" in v for v in summary["fid"].values())


def test_lora_mode_with_llr_b_and_random_filter(clustered_run, tmp_path):
    out, _ = clustered_run
    domain = out / "domain_model"  # reuse the first run's domain model
    config = _config(
        [
            "method.options.mode=lora",
            f"method.options.generator={domain}",
            "method.options.stage2=llr_b",
            "method.options.filter=random",
            "method.options.fid=false",
        ]
    )
    results = run(config, tmp_path)
    summary = json.loads((tmp_path / "clustered_dreambooth" / "lora" / "summary.json").read_text())
    gens = summary["generators"]
    assert len(gens) == 2 and all(g["cluster"] is None for g in gens)
    assert {g["instance_images"] for g in gens} == {72}  # min |g| over the trained groups
    assert results["metrics"]["test"]["worst_group_accuracy"] >= 0.0
    assert (tmp_path / "clustered_dreambooth" / "lora" / "filter.csv").is_file()


# ------------------------------------------------------------ plan and stage 2
def _debug_plan(mode, **options):
    from unspur.pipeline import prepare_table

    real = prepare_table(load_config(None, helpers.DEBUG)).split("train")
    counts = np.bincount(real.groups, minlength=real.n_groups)
    resolved = ClusteredDreamBooth.resolve_options({"mode": mode, **options})
    _, plans, _ = ClusteredDreamBooth()._plan(resolved, real, counts, None, 0)
    return real, {p.group: p for p in plans}


def test_identifier_prompt_and_the_severe_rule():
    real, plans = _debug_plan("dreambooth", min_group_images=20)
    borrowed = [p for p in plans.values() if p.borrowed]
    own = [p for p in plans.values() if not p.borrowed]
    assert borrowed and own
    for plan in own:  # the paper's template: [V] and the class, no attribute
        cls = real.class_names[plan.group // real.n_attrs]
        assert plan.prompt == f"photo of a sks {cls}" and plan.negative_prompt == ""
    for plan in borrowed:  # aligned group's model, no [V], bias emphasised, source's negated
        y, a = divmod(plan.group, real.n_attrs)
        assert plan.source // real.n_attrs == y and plan.source != plan.group
        assert plan.generators == [f"g{plan.source}"]
        wanted = real.attr_names[a]
        assert plan.prompt == f"photo of a {real.class_names[y]} on (({wanted}))"
        assert "sks" not in plan.prompt
        source = real.attr_names[plan.source % real.n_attrs]
        assert plan.negative_prompt == f"(({source}))"

    _, named = _debug_plan(
        "dreambooth", identifier_template="photo of a {identifier} {class} on {bias}"
    )
    for plan in named.values():
        if not plan.borrowed:
            y, a = divmod(plan.group, real.n_attrs)
            want = f"photo of a sks {real.class_names[y]} on {real.attr_names[a]}"
            assert plan.prompt == want


@pytest.mark.parametrize("head", ["finetune", "fresh"])
def test_stage2_head_starts_from_the_stage1_softmax_layer(clustered_run, tmp_path, head):
    from unspur.models.checkpoint import read_state_dict

    out, _ = clustered_run
    config = _config(
        [
            "method.options.mode=vanilla",
            f"method.options.generator={out / 'domain_model'}",
            "method.options.filter=none",
            "method.options.fid=false",
            "method.options.head={epochs: 0}",
            f"method.options.stage2_head={head}",
        ]
    )
    run(config, tmp_path)
    stage1 = read_state_dict(tmp_path / "clustered_dreambooth" / "vanilla" / "pretrain" / "best")
    final = read_state_dict(tmp_path / "model")
    assert set(stage1) == set(final)
    backbone = [k for k in stage1 if not k.startswith("head.")]
    assert backbone and all(torch.equal(stage1[k], final[k]) for k in backbone)
    heads = [k for k in stage1 if k.startswith("head.")]
    same = all(torch.equal(stage1[k], final[k]) for k in heads)
    assert same == (head == "finetune")  # zero head epochs: the selected head is the start
