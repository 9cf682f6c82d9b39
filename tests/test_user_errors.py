"""Every user mistake gets a clear answer: exit status 2, one paragraph naming the key or
file and the fix, no traceback (issue 21, section 3)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from unspur.cli import main
from unspur.config import RANGES, RunConfig, load_config
from unspur.errors import ConfigError


def fails_clearly(argv: list[str], capsys) -> str:
    """Run the CLI, check exit 2 with a one-paragraph message, return the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unspur: error: "), err
    return lines[0]


# --- numbers in scientific notation ----------------------------------------------------


def test_scientific_notation_in_set_and_yaml(tmp_path):
    config = load_config(None, ["train.lr=1e-4", "train.weight_decay=5E-4", "train.epochs=1e1"])
    assert config.train.lr == 1e-4 and config.train.weight_decay == 5e-4
    assert config.train.epochs == 10 and isinstance(config.train.epochs, int)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  momentum: 9e-1\nmethod:\n  options: {eta: 1e-2}\n")
    config = load_config(path)
    assert config.train.lr == 1e-4 and config.train.momentum == 0.9
    assert config.method.options == {"eta": 0.01}  # options are numbers too, not '1e-2'


def test_not_a_number_still_fails(tmp_path):
    with pytest.raises(ConfigError, match=r"train.lr: expected a number .*1e-4"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["train.epochs=2.5"])


# --- ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.image_size=0", "data.image_size"),
        ("data.image_size=-3", "data.image_size"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("data.crop_ratio=0", "data.crop_ratio"),
        ("data.crop_ratio=1.2", "data.crop_ratio"),
        ("train.epochs=-1", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("train.momentum=1", "train.momentum"),
        ("train.weight_decay=-1e-4", "train.weight_decay"),
        ("train.step_size=0", "train.step_size"),
        ("train.gamma=0", "train.gamma"),
        ("train.num_workers=-1", "train.num_workers"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.augment_scale=[0.9,0.5]", "train.augment_scale"),
        ("train.augment_scale=[0,1]", "train.augment_scale"),
        ("data.bias_ratio=1", "data.bias_ratio"),
        ("seed=-1", "seed"),
        ("train.lr=.nan", "train.lr"),
    ],
)
def test_out_of_range_values_fail_when_the_config_loads(override, key):
    with pytest.raises(ConfigError, match=rf"{key}=.* is out of range: it must be .*--set {key}="):
        load_config(None, [override])


def test_every_number_in_the_config_has_a_range():
    """A new numeric field must say what values it allows."""
    numeric = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif {int, float} & {hint, *typing.get_args(hint)}:
                numeric.append(f"{prefix}{f.name}")

    walk(RunConfig, "")
    assert "train.lr" in numeric and "seed" in numeric
    assert sorted(set(numeric) - set(RANGES)) == []
    defaults = load_config(None)  # the defaults are in range
    assert defaults.train.lr > 0


@pytest.mark.parametrize(
    "override",
    ["data.image_size=0", "train.lr=-1", "data.crop_ratio=0", "train.batch_size=0"],
)
def test_bad_ranges_exit_2_from_the_cli_before_anything_is_written(override, tmp_path, capsys):
    out = tmp_path / "run"
    message = fails_clearly(["run", "--set", override, "--out", str(out)], capsys)
    assert override.split("=")[0] in message and "--set" in message
    assert not out.exists()


# --- unknown keys suggest the key meant ------------------------------------------------


@pytest.mark.parametrize(
    "override, unknown, meant",
    [
        ("train.lr_rate=0.1", "train.lr_rate", "train.lr"),
        ("train.learning_rate=0.1", "train.learning_rate", "train.lr"),
        ("train.num_epochs=3", "train.num_epochs", "train.epochs"),
        ("train.epochz=3", "train.epochz", "train.epochs"),
        ("train.image_size=64", "train.image_size", "data.image_size"),  # wrong section
        ("lr=0.1", "lr", "train.lr"),
        ("trainn.lr=0.1", "trainn", "train"),
        ("data.imagesize=64", "data.imagesize", "data.image_size"),
        ("model.option={}", "model.option", "model.options"),
    ],
)
def test_unknown_keys_suggest_the_key_meant(override, unknown, meant):
    with pytest.raises(
        ConfigError, match=rf"unknown config key '{unknown}' \(did you mean '{meant}'"
    ):
        load_config(None, [override])


def test_unknown_method_and_reader_options_suggest_the_key_meant():
    from unspur.data.registry import load_dataset
    from unspur.methods import get_method

    with pytest.raises(
        ConfigError, match=r"\['lambda_upp'\] \(did you mean 'method.options.lambda_up'"
    ):
        get_method("jtt").resolve_options({"lambda_upp": 20})
    with pytest.raises(ConfigError, match=r"unknown method 'jt' \(did you mean 'jtt'"):
        get_method("jt")
    with pytest.raises(ConfigError, match=r"\['biass'\] \(did you mean 'data.options.bias'"):
        load_dataset("synthetic", None, biass=0.9)


def test_bad_choices_suggest_the_choice_meant():
    with pytest.raises(ConfigError, match=r"train.optimizer='adamm' .*did you mean 'adam'"):
        load_config(None, ["train.optimizer=adamm"])
    with pytest.raises(ConfigError, match=r"train.device='gpu' .*did you mean 'cuda'"):
        load_config(None, ["train.device=gpu"])


def test_lr_rate_from_the_cli_gets_a_suggestion(tmp_path, capsys):
    message = fails_clearly(["run", "--set", "train.lr_rate=0.1", "--out", str(tmp_path)], capsys)
    assert "did you mean 'train.lr'?" in message
