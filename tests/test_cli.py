"""The command line: inspect, train, evaluate, errors without tracebacks, shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
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


def test_methods_shows_the_supervision_a_default_run_records(capsys):
    """DiffInject selects by validation accuracy by default, so its runs record x; the
    listing said ✓ (its worst-group option's supervision)."""
    from unspur.methods.base import get_method

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["diffinject", "x"] for line in lines)
    assert any(line.split()[:2] == ["groupdro", "✓✓"] for line in lines)
    diffinject = get_method("diffinject")
    assert diffinject.supervision.given_selection("average").symbol == "x"
    assert diffinject.supervision.given_selection("worst_group").symbol == "✓"


DEBUG = helpers.DEBUG


def sets(values):
    return [arg for value in values for arg in ("--set", value)]


def test_run_interrupted_mid_stage_resumes_to_the_same_results(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a stage; the same command again ends as if never stopped."""
    from unspur.train.objectives import Objective

    config = str(REPO / "configs/synthetic_erm.yaml")
    argv = ["run", config, *sets(DEBUG)]
    assert main([*argv, "--out", str(tmp_path / "once")]) == 0

    original = Objective.__call__
    calls = {"n": 0}

    def interrupt_at_seventh_batch(self, logits, y, g, index):
        calls["n"] += 1
        if calls["n"] > 7:  # 5 batches per epoch: in the middle of epoch 2
            raise KeyboardInterrupt
        return original(self, logits, y, g, index)

    with monkeypatch.context() as patch:
        patch.setattr(Objective, "__call__", interrupt_at_seventh_batch)
        assert main([*argv, "--out", str(tmp_path / "twice")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    history = json.loads((tmp_path / "twice" / "erm" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert not (tmp_path / "twice" / "results.json").exists()

    assert main([*argv, "--out", str(tmp_path / "twice")]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    once = json.loads((tmp_path / "once" / "results.json").read_text())
    twice = json.loads((tmp_path / "twice" / "results.json").read_text())
    assert twice["metrics"] == once["metrics"]
    assert twice["fingerprint"] == once["fingerprint"]
    assert (tmp_path / "twice" / "report.html").is_file()


def test_rerun_with_a_changed_config_fails_clearly(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    argv = ["run", "--config", str(REPO / "configs/synthetic_erm.yaml"), *sets(DEBUG)]
    assert main([*argv, "--out", run_dir]) == 0
    assert (tmp_path / "run" / "run.json").is_file()
    capsys.readouterr()
    # Same config (progress is cosmetic): nothing retrained.
    assert main([*argv, "--set", "train.progress=true", "--out", run_dir]) == 0
    assert "finished earlier with this config" in capsys.readouterr().out
    assert main([*argv, "--set", "train.lr=0.5", "--out", run_dir]) == 2
    err = capsys.readouterr().err
    assert "stage 'erm'" in err and "train.lr: 0.05 -> 0.5" in err
    assert "new --out directory" in err and "Traceback" not in err
    assert main(["run", "--set", "train.lr_rate=0.1", "--out", run_dir]) == 2
    assert "unknown config key 'train.lr_rate'" in capsys.readouterr().err


def test_demo_compares_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--methods", "erm,resample_group", "--seeds", "0"]
    assert main([*argv, *sets(DEBUG + ["train.epochs=1"])]) == 0
    printed = capsys.readouterr().out
    assert "| erm | ✓ |" in printed and "| resample_group | ✓✓ |" in printed
    assert f"report: {out / 'report.html'}" in printed
    assert "ERM's worst-group accuracy" in printed
    assert (out / "erm" / "seed0" / "report.html").is_file()
