"""Every user mistake gets a clear answer: exit status 2, one paragraph naming the key or
file and the fix, no traceback (issue 21, section 3)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import typing
from pathlib import Path

import numpy as np
import pytest

import unspur
from unspur.cli import build_parser, main
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


# --- the same data flags on every command; messages name only flags that exist ---------

FAST = [
    "--set",
    "data.image_size=16",
    "--set",
    "train.epochs=1",
    "--set",
    "train.progress=false",
    "--set",
    "train.augment=false",
    "--set",
    "model.options.widths=[4,4]",
]


def make_csv_data(root: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """A tiny ``filename,y,a,split`` dataset: 8 images per split, every group twice."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["filename,y,a,split"]
    for split in splits:
        for i in range(8):
            name = f"{split}{i}.png"
            pixels = (rng.random((16, 16, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / name)
            rows.append(f"{name},{i % 2},{(i // 2) % 2},{split}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def command_flags(command: list[str]) -> set[str]:
    """The option strings the (sub)command ``command`` accepts."""
    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {flag for action in parser._actions for flag in action.option_strings}


def recipe_flags(package: Path) -> set[str]:
    """Every option string an ``add_argument`` call in ``package`` declares."""
    flags = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                flags |= {
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                }
    return flags


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
DATA_FLAGS = {"--dataset", "--root", "--option", "--on-bad-image"}
DATA_COMMANDS = [["run"], ["train"], ["compare"], ["evaluate"], ["data", "inspect"]]


@pytest.mark.parametrize("command", DATA_COMMANDS, ids=" ".join)
def test_every_command_that_reads_data_takes_the_same_data_flags(command):
    assert DATA_FLAGS <= command_flags(command)


def test_run_reads_data_from_the_data_flags(tmp_path, capsys):
    data = make_csv_data(tmp_path / "data")
    (data / "train3.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    argv = ["run", "--dataset", "csv", "--root", str(data), "--option", "csv=metadata.csv"]
    assert main([*argv, "--on-bad-image", "skip", *FAST, "--out", str(out)]) == 0
    config = json.loads((out / "results.json").read_text())["config"]["data"]
    assert config["name"] == "csv" and config["root"] == str(data)
    assert config["on_bad_image"] == "skip" and config["options"] == {"csv": "metadata.csv"}
    capsys.readouterr()


def test_every_flag_named_in_an_error_message_is_accepted_where_it_is_printed(tmp_path, capsys):
    # Printed at run time: no data root; an image that does not decode.
    for command, argv in [
        (["run"], ["run", "--dataset", "csv", "--out", str(tmp_path / "r")]),
        (["train"], ["train", "--dataset", "csv", "--out", str(tmp_path / "r")]),
        (["compare"], ["compare", "--dataset", "csv", "--methods", "erm", "--out", str(tmp_path)]),
        (["data", "inspect"], ["data", "inspect", "--dataset", "csv"]),
    ]:
        message = fails_clearly(argv, capsys)
        assert "--root" in message
        assert set(FLAG.findall(message)) <= command_flags(command), (command, message)
    data = make_csv_data(tmp_path / "data")
    (data / "train3.png").write_bytes(b"not an image")
    message = fails_clearly(
        ["run", "--dataset", "csv", "--root", str(data), *FAST, "--out", str(tmp_path / "r")],
        capsys,
    )
    assert "train3.png" in message and "on_bad_image" in message
    assert set(FLAG.findall(message)) <= command_flags(["run"])

    # Every flag any library message names: the commands that train take it, and
    # `evaluate` (which reads data and configs, but trains nothing) takes those it can.
    pipeline_flags = set.intersection(
        *(command_flags(c) for c in (["run"], ["train"], ["compare"]))
    )
    assert DATA_FLAGS | {"--set"} <= command_flags(["evaluate"])
    source = Path(unspur.__file__).parent
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source).as_posix()
        if relative in ("cli.py", "compare.py", "demo.py") or relative.startswith("bench/"):
            continue  # messages of one command (compare, demo, bench), not of a run
        # The recipes' messages are printed by `unspur pretrain` or the recipe module's own
        # command line (python -m unspur.pretrain.NAME) and name the flags those declare.
        recipe = relative.startswith("pretrain/")
        allowed = recipe_flags(source / "pretrain") if recipe else pipeline_flags
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = [
                    n.value
                    for n in ast.walk(node.exc)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)
                ]
                named = set(FLAG.findall(" ".join(texts)))
                assert named <= allowed, f"{path.name}:{node.lineno} names {named}"


# --- a failed run leaves nothing the user did not have ---------------------------------


def test_a_run_that_fails_before_training_leaves_nothing(tmp_path, capsys):
    data = make_csv_data(tmp_path / "data")
    (data / "train3.png").write_bytes(b"not an image")  # found in the first batch
    out = tmp_path / "new" / "deeper" / "run"
    argv = ["run", "--dataset", "csv", "--root", str(data), *FAST]
    fails_clearly([*argv, "--out", str(out)], capsys)
    assert not (tmp_path / "new").exists()

    mine = tmp_path / "mine"  # a folder the user made, with a file of theirs
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    fails_clearly([*argv, "--out", str(mine)], capsys)
    fails_clearly(["run", "--dataset", "csv", "--out", str(mine)], capsys)  # no root
    fails_clearly(["run", "--set", "method.name=jt", "--out", str(mine)], capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_failed_rerun_keeps_the_finished_run_intact(tmp_path, capsys):
    data = make_csv_data(tmp_path / "data")
    out = str(tmp_path / "run")
    argv = ["run", "--dataset", "csv", "--root", str(data), *FAST, "--out", out]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    capsys.readouterr()
    message = fails_clearly([*argv, "--set", "train.lr=0.5"], capsys)  # stage 'erm' differs
    assert "stage 'erm'" in message and "new --out directory" in message
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before
    assert main(argv) == 0
    assert "finished earlier with this config" in capsys.readouterr().out


# --- missing evaluation splits ---------------------------------------------------------


def test_only_train_rows_is_refused_before_any_work(tmp_path, capsys):
    data = make_csv_data(tmp_path / "data", splits=("train",))
    out = tmp_path / "run"
    message = fails_clearly(
        ["run", "--dataset", "csv", "--root", str(data), *FAST, "--out", str(out)], capsys
    )
    assert "metadata.csv" in message and "only train rows" in message
    assert "val" in message and "test" in message
    assert not out.exists()


@pytest.mark.parametrize(
    "splits, missing", [(("train", "val"), "test"), (("train", "test"), "val")]
)
def test_a_missing_val_or_test_split_is_warned(tmp_path, capsys, splits, missing):
    data = make_csv_data(tmp_path / "data", splits=splits)
    out = tmp_path / "run"
    assert main(["run", "--dataset", "csv", "--root", str(data), *FAST, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("unspur: warning: ")]
    assert len(warned) == 1 and f"no {missing} rows" in warned[0] and "metadata.csv" in warned[0]
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == set(splits) - {"train"}
    assert results["warnings"] and f"no {missing} rows" in results["warnings"][0]


def test_a_method_options_train_settings_are_named_as_written():
    from unspur.config import TrainConfig, train_config_with

    with pytest.raises(ConfigError, match=r"method.options.pretrain.lr=-1.0 is out of range"):
        train_config_with(TrainConfig(), {"lr": -1}, "pretrain")
    with pytest.raises(ConfigError, match=r"did you mean 'method.options.pretrain.lr'"):
        train_config_with(TrainConfig(), {"lr_rate": 0.1}, "pretrain")
    assert train_config_with(TrainConfig(), {"lr": "1e-3"}, "pretrain").lr == 1e-3


def test_compare_takes_a_config_and_data_flags_together_like_run(tmp_path, capsys):
    from unspur.cli import _compare_base

    config = tmp_path / "base.yaml"
    config.write_text("data:\n  name: synthetic\n  options: {bias: 0.9}\ntrain:\n  lr: 1e-3\n")
    argv = ["compare", "--config", str(config), "--dataset", "csv", "--root", "d"]
    args = build_parser().parse_args(
        [*argv, "--option", "csv=m.csv", "--methods", "erm", "--out", "x"]
    )
    base = _compare_base(args)
    assert base["data"] == {"name": "csv", "root": "d", "options": {"csv": "m.csv"}}
    assert base["train"] == {"lr": 1e-3}
    message = fails_clearly(["compare", "--methods", "erm", "--out", str(tmp_path)], capsys)
    assert "--config BASE.yaml or --dataset NAME" in message
