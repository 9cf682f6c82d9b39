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
    # The plan, the expected time, the shipped assets and every speed option come before
    # the comparison starts.
    assert lines[0].startswith("unspur demo:") and "about" in lines[1]
    started = lines.index("(fake compare ran)")
    plan = "\n".join(lines[:started])
    assert demo.BACKBONE in plan and demo.GENERATOR in plan
    assert "  mac: speed options views=4" in plan and "the paper draws fresh ones" in plan
    (call,) = recorded
    assert call["methods"] == ["erm", "dfr_val", "mac", "dbb"]
    assert call["seeds"] == [0]
    # Seeds, sizes and threads fixed, so a rerun prints the same table.
    assert (
        "train.threads=2" in call["overrides"] and "data.options.n_test=1200" in call["overrides"]
    )
    assert call["estimate"] == demo.QUICK.seconds


def test_quick_demo_shows_two_seed_methods_on_the_shipped_assets(recorded, tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    (call,) = recorded
    seed = [m for m in call["methods"] if m in demo.SEED_METHODS]
    assert len(seed) >= 2 and {"erm", "dfr_val"} <= set(call["methods"])
    overrides = call["overrides"]
    # Every model starts from the shipped backbone, with its architecture.
    for setting in ("model.arch=resnet18", "model.options.width=16",
                    "model.options.small_images=true",
                    "model.pretrained=unspur:cifar10-resnet18"):  # fmt: skip
        assert setting in overrides
    # Every generative seed method in the plan draws with the shipped generator, and
    # never trains a domain model of its own (an hour on a CPU).
    generative = [m for m in seed if m != "mac"]
    assert generative
    for name in generative:
        assert f"{name}:method.options.generator=unspur:synthetic-domain" in overrides
    # Per-method settings only for the methods that run (compare refuses the others).
    heads = {o.split(":")[0] for o in overrides if ":" in o.split("=")[0]}
    assert heads <= set(call["methods"])


def test_demo_settings_follow_the_methods_asked_for(recorded, tmp_path):
    argv = [
        "demo",
        "--out",
        str(tmp_path),
        "--methods",
        "erm,mac",
        "--set",
        "mac:method.options.views=0",
    ]
    assert main(argv) == 0
    (call,) = recorded
    assert not any(o.startswith("dbb:") for o in call["overrides"])
    # The user's --set comes last, so it wins over the demo's speed option.
    assert call["overrides"].index("mac:method.options.views=0") > call["overrides"].index(
        "mac:method.options.views=4"
    )


def test_full_demo_reuses_the_quick_demos_runs():
    # Same settings for every method both run: `unspur demo --full` after `unspur demo`
    # (same --out) skips those runs instead of training them again with other settings.
    for name in demo.QUICK.methods.split(","):
        assert name in demo.FULL.methods.split(",")
        assert demo.QUICK.settings.get(name) == demo.FULL.settings.get(name)


def test_another_architecture_drops_the_backbones_settings(recorded, tmp_path):
    argv = ["demo", "--out", str(tmp_path), "--methods", "erm", "--set", "model.arch=small_cnn"]
    assert main(argv) == 0
    (call,) = recorded
    model = [o for o in call["overrides"] if o.startswith("model.")]
    assert model == ["model.arch=small_cnn"]
    assert "train.threads=2" in call["overrides"]


def test_full_demo_runs_all_five_seed_methods_and_the_baselines(recorded, tmp_path):
    assert main(["demo", "--full", "--out", str(tmp_path), "--set", "train.epochs=1"]) == 0
    (call,) = recorded
    assert set(demo.SEED_METHODS) <= set(call["methods"])
    assert {"erm", "groupdro", "dfr_val"} <= set(call["methods"])
    assert call["overrides"][-1] == "train.epochs=1"
    assert call["command"] == "unspur demo --full"
    for name in ("dbb", "ffr", "clustered_dreambooth"):
        assert f"{name}:method.options.generator=unspur:synthetic-domain" in call["overrides"]


def test_verdict_names_the_shortcut_and_the_best_method():
    summary = {
        "aggregate": {
            "erm": {"worst_group_accuracy": {"mean": 0.0}, "average_accuracy": {"mean": 0.98}},
            "dfr_val": {"worst_group_accuracy": {"mean": 0.6}, "average_accuracy": {"mean": 0.7}},
        }
    }
    assert demo.verdict(summary).endswith("Best worst-group accuracy: dfr_val, 60.0%.")
    summary["aggregate"]["mac"] = {
        "worst_group_accuracy": {"mean": 0.25},
        "average_accuracy": {"mean": 0.9},
    }
    assert demo.verdict(summary).endswith("Seed methods, worst-group vs ERM (points): mac +25.0.")
    assert demo.verdict({"aggregate": {}}) is None


def test_no_demo_method_is_given_an_oracle_input() -> None:
    """The demo shows methods as a user can run them: no exact object masks (an oracle
    input: the benchmark's own masks), neither as DBB's masker nor as MaC's saliency."""
    from unspur.demo import FULL, QUICK

    for plan in (QUICK, FULL):
        for method, settings in plan.settings.items():
            for setting in settings:
                assert "ground_truth" not in setting, (method, setting)
