"""The engine's timings as measurements of a run (bench/dbb.py's IG throughput and
bench/generation.py's wrapper overhead, now columns the runner writes): measured once per
run and kept in its directory, and empty for runs they do not apply to."""

from __future__ import annotations

import json

import helpers
import pytest

from unspur.bench import timings
from unspur.bench.measurements import measure
from unspur.config import load_config
from unspur.pipeline import run


@pytest.fixture(scope="module")
def erm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("erm")
    results = run(load_config(None, [*helpers.DEBUG, "train.epochs=1", "seed=0"]), out)
    return out, results


def test_ig_throughput_times_loop_and_batched_once_and_they_agree(erm_run, monkeypatch):
    run_dir, results = erm_run
    monkeypatch.setattr(timings, "IG_IMAGES", 6)
    monkeypatch.setattr(timings, "IG_STEPS", 4)
    monkeypatch.setattr(timings, "IG_REPEATS", 1)
    columns = measure(["ig_throughput"], run_dir, results)
    assert columns["IG images/s (loop)"] > 0 and columns["IG images/s (batched)"] > 0
    assert columns["IG max |batched - loop|"] < 1e-4  # the same integral
    record = json.loads((run_dir / "ig_throughput.json").read_text())
    assert record["images"] == 6 and record["n_steps"] == 4
    # measured once: a second table write reads the record, not a new timing
    record["loop_seconds"] = 3.0
    (run_dir / "ig_throughput.json").write_text(json.dumps(record))
    assert measure(["ig_throughput"], run_dir, results)["IG images/s (loop)"] == 2.0
    dfr = {**results, "config": {**results["config"], "method": {"name": "dfr_val"}}}
    assert measure(["ig_throughput"], run_dir, dfr) == {}


def test_generation_overhead_compares_the_wrapper_with_bare_calls(erm_run, monkeypatch, tmp_path):
    _, results = erm_run
    assert measure(["generation_overhead"], tmp_path, results) == {}  # ERM draws nothing
    for name, value in (("GEN_IMAGES", 2), ("GEN_STEPS", 2), ("GEN_BATCH", 2), ("GEN_REPEATS", 1)):
        monkeypatch.setattr(timings, name, value)
    config = {**results["config"], "method": {"name": "usb",
              "options": {"generator": "unspur:synthetic-domain"}}}  # fmt: skip
    columns = measure(["generation_overhead"], tmp_path, {**results, "config": config})
    for task in ("t2i", "inpaint"):
        assert columns[f"{task} images/s (wrapper)"] > 0
        assert columns[f"{task} wrapper / bare"] > 0
    assert columns["t2i max pixel diff"] == 0  # the wrapper draws the bare call's pixels
    assert (tmp_path / "generation_overhead.json").is_file()


def test_cdb_cost_and_synthetic_budget_read_what_the_run_recorded(tmp_path):
    mode = tmp_path / "clustered_dreambooth" / "vanilla"
    mode.mkdir(parents=True)
    cost = {"lora_training": 0.0, "generation": {"seconds": 12.0, "images": 40,
            "seconds_per_image": 0.3}, "stage1": {"seconds": 5.0}, "stage2": {"seconds": 1.5}}  # fmt: skip
    (mode / "summary.json").write_text(json.dumps({"cost": cost}))
    assert measure(["cdb_cost"], tmp_path, {}) == {
        "LoRA training s": 0.0,
        "generation s": 12.0,
        "stage 1 s": 5.0,
        "stage 2 s": 1.5,
        "s / generated image": 0.3,
    }
    (tmp_path / "ffr").mkdir()
    groups = [{"group": 0, "name": "a", "real": 9, "synthetic": 1},
              {"group": 1, "name": "b", "real": 1, "synthetic": 9}]  # fmt: skip
    budget = {"budget": {"synthetic_total": 10, "groups": groups}}
    (tmp_path / "ffr" / "budget.json").write_text(json.dumps(budget))
    assert measure(["synthetic_budget"], tmp_path, {}) == {
        "synthetic images": 10,
        "real / synthetic per group": "a: 9 / 1, b: 1 / 9",
    }
    assert measure(["cdb_cost", "synthetic_budget"], tmp_path / "ffr", {}) == {}
