"""The demo's plan: what it runs, that it says so at once, and that ``--full`` is the long one."""

from __future__ import annotations

import pytest

import unspur.demo as demo
from unspur.cli import main


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def fake_compare(base, methods, seeds, out, overrides, **kwargs):
        kwargs["log"]("(fake compare ran)")
        calls.append({"methods": methods, "seeds": seeds, "overrides": overrides, **kwargs})
        return {"aggregate": {}, "markdown": "", "report": "r.html", "table": []}

    monkeypatch.setattr(demo, "compare", fake_compare)
    monkeypatch.setattr("unspur.cli._print_comparison", lambda summary: None)
    return calls


def test_quick_demo_announces_its_plan_and_cost_before_any_work(recorded, capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The plan and the expected time come before the comparison starts.
    assert lines[0].startswith("unspur demo:") and "about" in lines[1]
    assert lines.index("(fake compare ran)") == 2
    (call,) = recorded
    assert call["methods"] == ["erm", "groupdro", "resample_group", "dfr_val"]
    assert call["seeds"] == [0]
    # Seeds, sizes and threads fixed, so a rerun prints the same table.
    assert (
        "train.threads=2" in call["overrides"] and "data.options.n_test=1200" in call["overrides"]
    )
    assert call["estimate"] == demo.QUICK.seconds


def test_full_demo_adds_jtt_and_three_seeds(recorded, tmp_path):
    assert main(["demo", "--full", "--out", str(tmp_path), "--set", "train.epochs=1"]) == 0
    (call,) = recorded
    assert call["methods"] == ["erm", "groupdro", "resample_group", "jtt", "dfr_val"]
    assert call["seeds"] == [0, 1, 2] and call["overrides"][-1] == "train.epochs=1"
    assert call["command"] == "unspur demo --full"


def test_verdict_names_the_shortcut_and_the_best_method():
    summary = {
        "aggregate": {
            "erm": {"worst_group_accuracy": {"mean": 0.0}, "average_accuracy": {"mean": 0.98}},
            "dfr_val": {"worst_group_accuracy": {"mean": 0.6}, "average_accuracy": {"mean": 0.7}},
        }
    }
    assert demo.verdict(summary).endswith("Best worst-group accuracy: dfr_val, 60.0%.")
    assert demo.verdict({"aggregate": {}}) is None
