"""bench/ffr.py's UTKFace universe as a suite (bench/suites/ffr_utkface.yaml): the
generator's held-out draw (``train_skip``) never shares an image with the benchmark's, and
the (B, G) probe table per group is a measurement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unspur.bench import load_suite
from unspur.bench.measurements import measure
from unspur.data import load_dataset
from unspur.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _faces(root: Path, per_group: int = 20) -> Path:
    """``per_group`` fake faces per (gender, child/adult) group, UTKFace's file names."""
    folder = root / "UTKFace"
    folder.mkdir(parents=True)
    i = 0
    for gender in (0, 1):
        for age in (5, 30):
            for _ in range(per_group):
                pixels = np.full((8, 8, 3), i % 255, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{age}_{gender}_0_2017{i:011d}.jpg.chip.jpg")
                i += 1
    return root


def _train(table) -> set[str]:
    return set(table.frame.loc[table.frame["split"] == "train", "filename"])


def test_train_skip_draws_a_held_out_set_disjoint_from_the_benchmarks(tmp_path):
    root = _faces(tmp_path)  # 14 training images per group (70%)
    bench = load_dataset("utkface", root, train_groups=[3, 5, 2, 4], majority="ffr")
    held = load_dataset(
        "utkface", root, train_groups=[6, 6, 6, 6], train_skip=[3, 5, 2, 4], majority="ffr"
    )
    both = load_dataset("utkface", root, train_groups=[9, 11, 8, 10], majority="ffr")
    assert not _train(bench) & _train(held)
    assert _train(bench) | _train(held) == _train(both)  # the same draw, taken further
    evaluation = set(bench.frame.loc[bench.frame["split"] != "train", "filename"])
    assert not _train(held) & evaluation
    assert held.info["train_skip"] == [3, 5, 2, 4]
    with pytest.raises(DataError, match="after skipping 10"):
        load_dataset("utkface", root, train_groups=[6, 6, 6, 6], train_skip=[10, 0, 0, 0])
    with pytest.raises(ConfigError, match="train_skip needs 4"):
        load_dataset("utkface", root, train_groups=[1, 1, 1, 1], train_skip=[1])
    with pytest.raises(ConfigError, match="train_skip needs train_groups"):
        load_dataset("utkface", root, train_skip=[1, 1, 1, 1])


def test_the_suite_trains_its_generator_and_judges_on_images_outside_the_benchmark():
    suite = load_suite(REPO / "bench" / "suites" / "ffr_utkface.yaml")
    taken = [o for o in suite.overrides if "train_groups" in o]
    assert taken == ["data.options.train_groups=[108, 718, 118, 619]"]
    for name in ("external_generator", "gender_judge", "age_judge"):
        data = suite.assets[name].data
        assert "data.options.train_skip=[108, 718, 118, 619]" in data
        assert "data.root={asset:utkface}" in data
    assert suite.assets["external_generator"].labels == "train_groups"  # captions: age
    assert suite.asset_supervision("utkface-99.9", "ffr_erm") == 2
    assert suite.asset_supervision("utkface-99.9", "erm") == 0  # judges feed no method


def test_bg_probe_reports_each_group(tmp_path):
    (tmp_path / "ffr").mkdir()
    groups = [
        {"name": "male / child", "accuracy": 0.75},
        {"name": "male / adult", "accuracy": None},  # a group without real images
        {"name": "female / adult", "accuracy": 0.5},
    ]
    record = {"mean_accuracy": 0.625, "groups": groups}
    (tmp_path / "ffr" / "probe.json").write_text(json.dumps(record))
    assert measure(["bg_probe"], tmp_path, {}) == {
        "real-vs-synthetic probe": 0.625,
        "probe: male / child": 0.75,
        "probe: female / adult": 0.5,
    }
