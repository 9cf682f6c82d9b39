"""Measurements of a run's generated images (the legacy scripts' judging loops and sample
grids, now one place): judge assets' verdicts per requested group, a sample grid
published next to the table, and one tiny suite end to end."""

from __future__ import annotations

import csv
import json

import helpers
import numpy as np
import torch
import yaml
from PIL import Image

from unspur.bench import generated
from unspur.bench.artefacts import Artefact, publish
from unspur.bench.measurements import measure
from unspur.cli import main
from unspur.generate.store import GenerationRequest, SyntheticStore, generate_into_store

NAMES = {"data": {"group_counts": [
    {"g": 0, "y": "circle", "a": "land"}, {"g": 1, "y": "circle", "a": "water"},
    {"g": 2, "y": "cross", "a": "land"}, {"g": 3, "y": "cross", "a": "water"},
]}}  # fmt: skip


def _store(run_dir, asked, kept=None, folder="usb", name="synthetic"):
    """A store of 8 px images whose red channel encodes the index (for fake judges);
    ``kept``: the store filter's verdict per image (default: all kept)."""
    from unspur.generate.store import FilterResult

    requests = [GenerationRequest(f"k{i}", "p", i, y, a) for i, (y, a) in enumerate(asked)]

    def verdict(batch, images):
        del images
        return [FilterResult("s", 0.0, kept is None or kept[int(r.key[1:])]) for r in batch]

    generate_into_store(
        SyntheticStore(run_dir / folder / name),
        requests,
        lambda batch: [Image.new("RGB", (8, 8), (int(r.key[1:]), 0, 0)) for r in batch],
        generator_name="fake",
        weights_id="fake",
        filters=[verdict],
    )


class _Fixed(torch.nn.Module):
    """A judge that predicts ``labels[i]`` for the image whose red value is ``i``."""

    def __init__(self, labels):
        super().__init__()
        self.labels = torch.tensor(labels)

    def forward(self, x):
        index = x[:, 0, 0, 0].round().long()
        return torch.nn.functional.one_hot(self.labels[index], 2).float()


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def test_judge_verdicts_compare_each_judge_with_the_request(tmp_path, monkeypatch):
    asked = [(0, 1), (0, 1), (1, 0), (1, 0)]  # circle on water x2, cross on land x2
    _store(tmp_path, asked)
    judges = {
        "shape": (_Fixed([0, 1, 1, 1]), _to_tensor, {"target": "y", "val_accuracy": 0.9}),
        "background": (_Fixed([1, 1, 0, 1]), _to_tensor, {"target": "a"}),  # 3 of 4 right
    }
    monkeypatch.setattr(generated, "_judge", lambda folder: judges.get(folder))
    results = {**NAMES, "bench_assets": {"shape": "shape", "background": "background"}}
    columns = measure(["judge_verdicts"], tmp_path, results)
    assert columns == {
        "judged images": 4,
        "class as asked (judge)": 75.0,  # 3 of 4 right
        "class judge, real val acc.": 90.0,
        "attribute as asked (judge)": 75.0,
        "as asked: circle / water": 50.0,  # image 1: class wrong
        "as asked: cross / land": 50.0,  # image 3: background wrong
    }
    assert measure(["judge_verdicts"], tmp_path, NAMES) == {}  # no judge asset
    # a method's own filter (Clustered DreamBooth's filter.csv beside the store) counts
    (tmp_path / "usb" / "filter.csv").write_text("key,selected\nk0,True\nk1,False\nk2,1\nk3,0\n")
    columns = measure(["judge_verdicts"], tmp_path, results)
    assert columns["judged images"] == 2 and columns["as asked: circle / water"] == 100.0
    assert measure(["judge_verdicts"], tmp_path / "usb" / "none", results) == {}


def test_samples_grid_is_published_for_each_methods_first_seed(tmp_path):
    run_dir = tmp_path / "run"
    _store(run_dir, [(0, 0), (0, 0), (1, 1)])
    columns = measure(["samples"], run_dir, NAMES)
    grid = Image.open(run_dir / "samples.png")
    assert grid.size[1] == 2 * (8 * generated.GRID_SCALE + generated.GRID_PAD) + 2  # 2 groups
    assert str(columns["samples"]) == "samples.png"  # never the run directory's path
    assert measure(["samples"], tmp_path / "nothing", NAMES) == {}
    rows = [
        {"method": "usb", "seed": 0, "samples": columns["samples"]},
        {"method": "usb", "seed": 1, "samples": columns["samples"]},
        {"method": "asb/../x", "seed": 0, "samples": Artefact(tmp_path / "missing.png")},
    ]
    table = [{"method": "usb", "samples": "samples.png"}, {"method": "asb/../x", "samples": "x"}]
    out = tmp_path / "out"
    written = publish(table, rows, out, "synthetic-99")
    assert [p.name for p in written] == ["synthetic-99_usb_seed0_samples.png"]
    assert [r["samples"] for r in rows] == ["synthetic-99_usb_seed0_samples.png", "-", "-"]
    assert table[0]["samples"] == "[samples](synthetic-99_usb_seed0_samples.png)"
    assert table[1]["samples"] == "-" and sorted(p.name for p in out.iterdir()) == [
        "synthetic-99_usb_seed0_samples.png"
    ]
    # An earlier `--seeds 3,4` invocation published seed 3's grid; the full table's
    # publish replaces it with seed 0's and leaves other settings' and methods' files.
    for stale in ("synthetic-99_usb_seed3_samples.png", "synthetic-99.9_usb_seed3_samples.png",
                  "synthetic-99_usb_x_seed3_samples.png"):  # fmt: skip
        (out / stale).write_bytes(b"old")
    publish(table, [{"method": "usb", "seed": 0, "samples": columns["samples"]}], out,
            "synthetic-99")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "synthetic-99.9_usb_seed3_samples.png", "synthetic-99_usb_seed0_samples.png",
        "synthetic-99_usb_x_seed3_samples.png"]  # fmt: skip


def test_a_generating_suite_judges_and_publishes_its_images(tmp_path, capsys):
    """One tiny suite end to end: ERM and USB (a tiny in-run generator), a judge asset
    of the class, the sample grid in the results folder and linked from the table."""
    from unspur.methods import get_method

    debug = [f"method.options.{k}={json.dumps(v) if isinstance(v, dict) else v}"
             for k, v in get_method("usb").debug_options.items()]  # fmt: skip
    data = [o for o in helpers.DEBUG if o.startswith(("data.", "model.", "train."))]
    suite = {
        "seeds": [0],
        "seeds_note": "one seed: a test",
        "set": [*helpers.DEBUG, "train.epochs=1"],
        "settings": {"tiny": {"uses": ["shape_judge"]}},
        "assets": {
            "shape_judge": {
                "build": "judge",
                "options": {"target": "y"},
                "data": [*data, "data.options.bias=0.5", "data.options.seed=7", "train.epochs=1"],
            }
        },  # fmt: skip
        "methods": {"erm": None, "usb": {"set": debug}},
        "measurements": ["samples", "judge_verdicts", "generated_judged"],
    }
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", str(path), "--out", str(out), "--work", str(work), "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = {r["method"]: r for r in csv.DictReader((out / "tiny.csv").open())}
    (record,) = [json.loads(p.read_text()) for p in (work / "assets").glob("*/asset.json")]
    assert record["cost"]["threads"] == 1  # assets train with the bench's --threads
    assert "1 thread(s) (built" in (out / "tiny.md").read_text()
    assert rows["usb"]["samples"] == "[samples](tiny_usb_seed0_samples.png)"
    assert rows["erm"]["samples"] == "-" and float(rows["usb"]["judged images"]) > 0
    assert 0 <= float(rows["usb"]["class as asked (judge)"]) <= 100
    assert (out / "tiny_usb_seed0_samples.png").is_file()
    md = (out / "tiny.md").read_text()
    assert "(tiny_usb_seed0_samples.png)" in md and "judge built by this suite" in md


def test_the_generators_suite_judges_every_generator_through_one_runner():
    """bench/domain_model.py, shipped_generators.py and generation.py as one suite: each
    generator is drawn from by ASB (every group) and DBB (inpainting), judged by judge
    assets (which add no supervision), timed by generation_overhead."""
    from pathlib import Path

    from unspur.bench import load_suite

    suite = load_suite(Path(__file__).resolve().parents[1] / "bench/suites/generators.yaml")
    assert {"judge_verdicts", "generated_judged", "samples", "generation_overhead"} <= set(
        suite.measurements
    )
    judges = {a.options["target"] for a in suite.assets.values() if a.build == "judge"}
    assert judges == {"y", "a"} and set(suite.settings["synthetic-99"].uses) == {
        "shape_judge",
        "background_judge",
    }
    drawing = {v.label: v for v in suite.variants.values() if v.method != "erm"}
    for variant in drawing.values():
        generator = [o for o in variant.overrides if o.startswith("method.options.generator=")]
        assert generator, variant.label
    assert {v.method for v in drawing.values()} == {"asb", "dbb"}
    assert all(v.oracle for v in drawing.values() if v.method == "dbb")  # exact masks
    assert suite.asset_supervision("synthetic-99", "asb_shipped") == 0
    assert suite.asset_supervision("synthetic-99", "asb_recipe") == 2  # captions name a


def test_a_robust_judge_trains_on_jittered_real_images(tmp_path):
    """``view: robust`` (bench/domain_model.py's calibrated judges): blurred, noisy,
    jittered training copies, the plain view for evaluation; recorded in the asset."""
    import pytest

    from unspur.bench.assets import build_asset, check_asset_options
    from unspur.bench.judges import RobustView
    from unspur.bench.suite import Asset
    from unspur.errors import ConfigError

    plain = lambda image: _to_tensor(image)  # noqa: E731
    view = RobustView(plain)
    image = Image.new("RGB", (8, 8), (100, 150, 200))
    torch.manual_seed(0)
    outputs = [view(image) for _ in range(4)]
    assert all(o.shape == plain(image).shape for o in outputs)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])  # a new jitter each time
    data = [*helpers.DEBUG, "train.epochs=1", "data.options.bias=0.5"]
    spec = Asset("j", None, "none", "", "judge", data, 0, {"target": "a", "view": "robust"})
    folder, record = build_asset("j", spec, tmp_path, lambda _: None, {})
    assert record["view"] == "robust" and record["target"] == "a"
    assert (folder / "model" / "model.json").is_file()
    with pytest.raises(ConfigError, match="view='sharp'"):
        check_asset_options("judge", {"view": "sharp"}, "assets.j.options")


def test_a_methods_own_selection_decides_what_is_judged(tmp_path, monkeypatch):
    """DBB's store keeps what passes the paper's two conditions; under another pruning
    mode (``none``, ``psi``) its ``candidates.csv`` ``used`` column is what it trains on,
    and what the judges see."""
    asked = [(0, 1), (0, 1), (1, 0), (1, 0)]
    _store(tmp_path, asked, kept=[True, False, True, False], folder="dbb", name="store")
    judges = {"shape": (_Fixed([0, 0, 1, 1]), _to_tensor, {"target": "y"})}
    monkeypatch.setattr(generated, "_judge", lambda folder: judges.get(folder))
    results = {**NAMES, "bench_assets": {"shape": "shape"}}
    assert measure(["judge_verdicts"], tmp_path, results)["judged images"] == 2  # kept
    (tmp_path / "dbb" / "candidates.csv").write_text(
        "key,psi,used\nk0,0.1,True\nk1,0.2,True\nk2,0.9,False\nk3,0.3,True\n"
    )
    assert [row["key"] for _, row in generated.generated_rows(tmp_path)] == ["k0", "k1", "k3"]
    assert measure(["judge_verdicts"], tmp_path, results)["judged images"] == 3
