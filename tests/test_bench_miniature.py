"""The miniature suites (issue 20) and the premise measurements they list, on tiny fake
run folders: nothing here trains or generates with a real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from unspur.bench import load_suite
from unspur.bench.measurements import border_background, measure
from unspur.generate.store import GenerationRequest, SyntheticStore, generate_into_store

SUITES = Path(__file__).resolve().parent.parent / "bench" / "suites"
GENERATIVE = ("dbb", "ffr", "clustered_dreambooth")
SYNTHETIC = {"config": {"data": {"name": "synthetic", "options": {"bias": 0.99}}}}


def _values(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def test_the_miniature_suite_names_the_shipped_backbone_and_generator():
    suite = load_suite(SUITES / "miniature.yaml")
    base = _values(suite.overrides)
    assert base["model.pretrained"] == "unspur:cifar10-resnet18"
    assert base["model.arch"] == "resnet18"
    assert base["model.options.width"] == "16" and base["model.options.small_images"] == "true"
    assert suite.seeds == [0, 1, 2, 3, 4]
    for label in GENERATIVE:
        variant = suite.variants[label]
        assert variant.method == label
        assert _values(variant.overrides)["method.options.generator"] == "unspur:synthetic-domain"
        assert "CPU saving" in variant.note  # every deviation from the paper is named
    # The methods use shipped assets only: the suite builds nothing but the judges of the
    # generated images (measuring instruments that feed no method) and reads no data folder.
    assert {a.build for a in suite.assets.values()} == {"judge"}
    assert all(a.path is None for a in suite.assets.values())
    for label in suite.labels:
        assert not [n for n in suite.assets_of("synthetic-99", label) if n not in
                    ("shape_judge", "background_judge")]  # fmt: skip
    for name in ("erm", "dfr_val", "groupdro", "jtt", "mac"):
        assert name in suite.variants
    mac = _values(suite.variants["mac"].overrides)
    assert mac["method.options.search"] == "true"  # (alpha, beta) chosen on validation
    for name in ("mac_mask_quality", "dbb_pruning", "bg_probe", "ffr_stage1", "cdb_clusters",
                 "generated_judged", "judge_verdicts"):  # fmt: skip
        assert name in suite.measurements


def test_the_scratch_suite_is_the_same_model_without_pretrained_weights():
    scratch = load_suite(SUITES / "miniature_scratch.yaml")
    pretrained = load_suite(SUITES / "miniature.yaml")
    base = _values(scratch.overrides)
    assert "model.pretrained" not in base
    assert {
        k: v for k, v in _values(pretrained.overrides).items() if k != "model.pretrained"
    } == base
    assert scratch.variants["mac"].overrides == pretrained.variants["mac"].overrides
    assert "mac_mask_quality" in scratch.measurements
    assert [s.config for s in scratch.settings.values()] == [
        s.config for s in pretrained.settings.values()
    ]


def test_ffr_stage1_reads_the_stage1_model_on_real_validation(tmp_path):
    (tmp_path / "ffr").mkdir()
    record = {"stage1": {"best_epoch": 3, "val": {"worst_group_accuracy": 0.25,
                                                   "balanced_accuracy": 0.5}}}  # fmt: skip
    (tmp_path / "ffr" / "budget.json").write_text(json.dumps(record))
    assert measure(["ffr_stage1"], tmp_path, {}) == {
        "stage-1 val worst-group": 25.0,
        "stage-1 val balanced": 50.0,
    }
    assert measure(["ffr_stage1"], tmp_path / "ffr", {}) == {}  # not an FFR run


def _cdb_run(tmp_path: Path, clip: str, filter_rule: str = "clip") -> Path:
    folder = tmp_path / "clustered_dreambooth" / "clustered_dreambooth"
    folder.mkdir(parents=True)
    summary = {
        "k_D": 2,
        "clip": clip,
        "filter": filter_rule,
        "plans": [
            {"group": 0, "name": "circle / land", "borrowed": False},
            {"group": 1, "name": "circle / water", "borrowed": True},
        ],
        "generators": [
            {"name": "g0_c0", "group": 0, "cluster": 0, "instance_images": 600,
             "instance_groups": {"circle / land": 600}},
            {"name": "g0_c1", "group": 0, "cluster": 1, "instance_images": 390,
             "instance_groups": {"circle / land": 390}},
        ],
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_cdb_clusters_says_what_each_cluster_holds_and_if_clip_was_tested(tmp_path):
    columns = measure(["cdb_clusters"], _cdb_run(tmp_path / "a", "tiny (random init)"), {})
    assert columns["k_D"] == "2"
    assert columns["clusters"] == (
        "circle / land c0: 600 [circle / land 600]; circle / land c1: 390 [circle / land 390]"
    )
    assert columns["borrowing groups"] == "circle / water"
    assert columns["CLIP filter"].startswith("CLIP filter untested")
    real = measure(["cdb_clusters"], _cdb_run(tmp_path / "b", "openai/clip-vit-large-patch14"), {})
    assert real["CLIP filter"] == "ran with openai/clip-vit-large-patch14"
    off = measure(["cdb_clusters"], _cdb_run(tmp_path / "c", "tiny", "random"), {})
    assert off["CLIP filter"] == "off (filter random)"
    assert measure(["cdb_clusters"], tmp_path / "none", {}) == {}


def _scene(background: int, size: int = 16) -> Image.Image:
    """A land (green-brown) or water (blue) image with a grey square in the middle."""
    colour = (40, 140, 220) if background == 1 else (110, 150, 60)
    pixels = np.tile(np.array(colour, dtype=np.uint8), (size, size, 1))
    pixels[5:11, 5:11] = 128
    return Image.fromarray(pixels)


def test_border_background_reads_land_and_water():
    assert border_background(_scene(0)) == 0
    assert border_background(_scene(1)) == 1


def test_generated_judged_compares_the_drawn_background_with_the_request(tmp_path):
    # Asked: 2 land, 2 water; drawn: both land right, one water drawn as land.
    asked = [0, 0, 1, 1]
    drawn = {"k0": 0, "k1": 0, "k2": 1, "k3": 0}
    requests = [GenerationRequest(f"k{i}", "a photo", i, 0, a) for i, a in enumerate(asked)]
    generate_into_store(
        SyntheticStore(tmp_path / "ffr" / "synthetic"),
        requests,
        lambda batch: [_scene(drawn[r.key]) for r in batch],
        generator_name="fake",
        weights_id="fake",
    )
    columns = measure(["generated_judged"], tmp_path, SYNTHETIC)
    assert columns == {
        "generated": 4,
        "background as asked (rule)": 75.0,
        "background as asked: land": 100.0,
        "background as asked: water": 50.0,
    }
    other = {"config": {"data": {"name": "waterbirds"}}}
    assert measure(["generated_judged"], tmp_path, other) == {}  # the rule is for land/water
    four = {"config": {"data": {"name": "synthetic", "options": {"n_classes": 4}}}}
    assert measure(["generated_judged"], tmp_path, four) == {}
    assert measure(["generated_judged"], tmp_path / "ffr" / "none", SYNTHETIC) == {}
