"""The command line: inspect, train, evaluate, errors without tracebacks, shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unspur.cli import main
from unspur.config import load_config

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "--set",
    "data.options.n_train=200",
    "--set",
    "data.options.n_val=80",
    "--set",
    "data.options.n_test=80",
    "--set",
    "data.image_size=16",
    "--set",
    "data.options.size=16",
    "--set",
    "train.epochs=1",
    "--set",
    "train.progress=false",
    "--set",
    "model.options.widths=[8,8]",
]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    from unspur.methods import get_method

    get_method(config.method.name).resolve_options(config.method.options)


def test_inspect_synthetic(capsys):
    assert main(["data", "inspect", "--dataset", "synthetic", "--option", "n_train=100"]) == 0
    out = capsys.readouterr().out
    assert "circle" in out and "water" in out and "train=100" in out


def test_train_then_evaluate(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(REPO / "configs/synthetic_erm.yaml"),
                *FAST,
                "--out",
                str(run_dir),
            ]
        )
        == 0
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["metrics"]) == {"val", "test"}
    assert results["supervision"]["symbol"] == "✓"
    assert results["selection"]["rule"] == "worst_group"
    assert results["config"]["train"]["epochs"] == 1
    assert "torch" in results["versions"]
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--run", str(run_dir), "--json", str(out_json)]) == 0
    evaluated = json.loads(out_json.read_text())
    assert (
        evaluated["test"]["worst_group_accuracy"]
        == results["metrics"]["test"]["worst_group_accuracy"]
    )
    assert "worst_group_accuracy" in capsys.readouterr().out


def test_user_errors_exit_2_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.learning_rate'" in err and "Traceback" not in err
    assert main(["data", "inspect", "--dataset", "waterbirds", "--root", str(tmp_path)]) == 2
    assert "metadata.csv" in capsys.readouterr().err
    assert main(["data", "inspect", "--dataset", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["data", "inspect", "--dataset", "synthetic", "--option", "colour=red"]) == 2
    assert "has no option(s) ['colour']" in capsys.readouterr().err


def test_methods_lists_erm(capsys):
    assert main(["methods"]) == 0
    assert "erm" in capsys.readouterr().out
