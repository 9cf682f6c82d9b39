"""Config validation and atomic writes."""

import os

import pytest

from unspur.config import dump_config, load_config
from unspur.errors import ConfigError
from unspur.io import atomic_dir, atomic_write_json, recover_dir


def test_overrides_apply_and_round_trip(tmp_path):
    config = load_config(None, ["train.lr=0.5", "data.options.bias=0.9", "seed=3"])
    assert config.train.lr == 0.5 and config.data.options == {"bias": 0.9} and config.seed == 3
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.epochz'.*did you mean 'train.epochs'"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=many", "train.epochs: expected an integer"),
        ("train.optimizer=rmsprop", "train.optimizer='rmsprop' is not one of"),
        ("data.bias_ratio=1.5", "data.bias_ratio"),
        ("trainn.lr=1", "unknown config key 'trainn'"),
        ("novalue", "expects key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_atomic_dir_keeps_old_version_on_failure(tmp_path):
    target = tmp_path / "stage"
    with atomic_dir(target) as scratch:
        (scratch / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(target) as scratch:
        (scratch / "a.txt").write_text("two")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(os.listdir(tmp_path)) == ["stage"]


def test_recover_dir_restores_interrupted_swap(tmp_path):
    target = tmp_path / "stage"
    old = tmp_path / ".stage.old"
    old.mkdir()
    (old / "a.txt").write_text("kept")
    recover_dir(target)
    assert (target / "a.txt").read_text() == "kept" and not old.exists()


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"x": 1})
    assert (tmp_path / "r.json").read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
