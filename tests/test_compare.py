"""`unspur compare`: methods x seeds, mean ± std table, supervision column, resumable."""

from __future__ import annotations

import csv
import json

import helpers
import numpy as np
import pytest

from unspur.cli import main
from unspur.compare import DIFF_COLUMN, RunPace, paired_difference, plan, split_overrides
from unspur.errors import ConfigError

DEBUG = [*helpers.DEBUG, "train.epochs=1"]


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_compare_two_methods_two_seeds_then_skips(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--dataset",
        "synthetic",
        "--methods",
        "erm,groupdro",
        "--seeds",
        "0,1",
        *sets(DEBUG),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    markdown = (out / "comparison.md").read_text()
    assert "| method | supervision | worst-group acc. (%)" in markdown
    assert "| erm | ✓ |" in markdown and "| groupdro | ✓✓ |" in markdown
    assert "±" in markdown and "report:" in printed and "| groupdro | ✓✓ |" in printed
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["erm", "groupdro"]
    assert all(r["n"] == "2" for r in rows)
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 4
    # The table's cell is the mean ± sample std (ddof = 1) of the runs' test numbers.
    wga = [float(r["worst_group_accuracy"]) for r in runs if r["method"] == "groupdro"]
    assert rows[1]["worst-group acc. (%)"] == f"{np.mean(wga):.1f} ± {np.std(wga, ddof=1):.1f}"
    # ... and the last column GroupDRO's worst-group gain over ERM, paired by seed.
    erm = {r["seed"]: float(r["worst_group_accuracy"]) for r in runs if r["method"] == "erm"}
    gain = [
        float(r["worst_group_accuracy"]) - erm[r["seed"]] for r in runs if r["method"] == "groupdro"
    ]
    assert rows[1][DIFF_COLUMN].startswith(f"{np.mean(gain):+.1f} [")
    assert rows[0][DIFF_COLUMN] == "-"
    for method in ("erm", "groupdro"):
        for seed in (0, 1):
            run_dir = out / method / f"seed{seed}"
            assert json.loads((run_dir / "results.json").read_text())["seed"] == seed
            assert (run_dir / "report.html").is_file()
    report = (out / "report.html").read_text()
    assert "before: erm" in report and rows[1]["worst-group acc. (%)"] in report

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/results.json")}
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/results.json")} == stamps
    assert (out / "comparison.md").read_text() == markdown

    # Found finished under other code: kept (compare's folders are not per code version),
    # and the log says so and how to train it again.
    import unspur.code_version

    monkeypatch.setattr(unspur.code_version, "code_version", lambda: "ffffffffff")
    assert main(argv) == 0
    notes = capsys.readouterr().out
    assert notes.count("finished earlier, skipped") == 4
    assert notes.count("trained by other code") == 4 and "delete the folder" in notes
    assert "**4 run(s) trained by other code**" in (out / "comparison.md").read_text()


def test_plan_reuses_the_erm_reference(tmp_path):
    runs = plan({}, ["dfr_val", "jtt"], [3], ["jtt:method.options.lambda_up=7"], tmp_path)
    names = [name for name, *_ in runs]
    assert names == ["erm", "dfr_val", "jtt"]  # ERM added first: DFR starts from it
    configs = {name: config for name, _, config, _ in runs}
    assert configs["dfr_val"].method.reference == str(tmp_path / "erm" / "seed3" / "model")
    assert configs["jtt"].method.reference is None
    assert configs["jtt"].method.options == {"lambda_up": 7}
    assert all(config.seed == 3 for config in configs.values())


def test_compare_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not compared"):
        split_overrides(["lff:method.options.q=0.5"], ["erm"])
    with pytest.raises(ConfigError, match="has no option"):
        plan({}, ["erm", "jtt"], [0], ["jtt:method.options.lamda=3"], tmp_path)
    argv = ["compare", "--dataset", "synthetic", "--methods", "erm,nope", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["compare", "--methods", "erm", "--out", str(tmp_path)]) == 2
    assert "--config BASE.yaml or --dataset NAME" in capsys.readouterr().err


def test_paired_difference_is_the_mean_seed_difference_with_a_t_interval():
    method = {0: 0.50, 1: 0.40, 2: 0.60}
    erm = {0: 0.10, 1: 0.10, 2: 0.20, 3: 0.9}  # seed 3 has no pair: ignored
    diff = paired_difference(method, erm)
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.3667, abs=1e-4)
    # differences 0.4, 0.3, 0.4: sample std 0.0577; t(0.975, 2) = 4.303
    half = 4.3027 * 0.057735 / np.sqrt(3)
    assert diff["low"] == pytest.approx(diff["mean"] - half, abs=1e-4)
    assert diff["high"] == pytest.approx(diff["mean"] + half, abs=1e-4)
    single = paired_difference({0: 0.5}, {0: 0.2})
    assert single["mean"] == pytest.approx(0.3) and single["low"] is None
    assert paired_difference({1: 0.5}, {0: 0.2}) is None


def test_run_pace_scales_priors_by_the_measured_speed():
    pace = RunPace({"erm": 10.0, "dfr_val": 2.0})
    assert pace.seconds_left(["erm", "dfr_val"]) == pytest.approx(12.0)
    pace.record("erm", 20.0)  # this machine runs at half the priors' speed
    assert pace.seconds_left(["dfr_val"]) == pytest.approx(4.0)
    assert pace.seconds_left(["groupdro"]) == pytest.approx(20.0)  # no prior: mean run cost
    assert RunPace().seconds_left(["erm"]) is None


def test_a_run_held_by_another_process_is_left_to_it(tmp_path):
    """Two `unspur bench` / `compare` processes on one folder share the runs: a run whose
    lock another process holds is skipped, and so are the runs that reuse its ERM model;
    the rest run, and a later rerun tabulates everything."""
    from unspur.compare import compare
    from unspur.io import exclusive_lock

    out = tmp_path / "cmp"
    base = {"data": {"name": "synthetic"}}
    runs = plan(base, ["erm", "dfr_val"], [0, 1], DEBUG, out)
    erm0 = next(run_dir for name, seed, _, run_dir in runs if (name, seed) == ("erm", 0))
    printed: list[str] = []
    with exclusive_lock(erm0.parent / f".{erm0.name}.lock") as held:
        assert held
        summary = compare(base, ["erm", "dfr_val"], [0, 1], out, DEBUG, log=printed.append,
                          reports=False)  # fmt: skip
    assert sorted((r["method"], r["seed"]) for r in summary["runs"]) == [
        ("dfr_val", 1),
        ("erm", 1),
    ]
    assert any("erm seed 0: running in another process" in line for line in printed)
    assert any("dfr_val seed 0: its ERM run is training in another process" in line
               for line in printed)  # fmt: skip
    assert any("2 run(s) were left to another process" in line for line in printed)
    assert not (erm0 / "results.json").exists()

    again = compare(base, ["erm", "dfr_val"], [0, 1], out, DEBUG, log=printed.append,
                    reports=False)  # fmt: skip
    assert len(again["runs"]) == 4


def test_the_lock_is_exclusive_and_released() -> None:
    import tempfile
    from pathlib import Path

    from unspur.io import exclusive_lock

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.lock"
        with exclusive_lock(path) as first:
            with exclusive_lock(path) as second:
                assert first and not second
        with exclusive_lock(path) as third:
            assert third


def test_a_changed_method_default_is_not_taken_for_a_finished_run(tmp_path, capsys, monkeypatch):
    """The run fingerprint covers the config as written; a run made under another default
    of its method is stale: compare does not skip it, and refuses to overwrite it."""
    from unspur.methods.base import get_method

    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", "synthetic", "--methods", "groupdro", "--seeds", "0",
            *sets(DEBUG), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/results.json")}
    capsys.readouterr()
    groupdro = get_method("groupdro")
    monkeypatch.setattr(groupdro, "defaults", {**groupdro.defaults, "eta": 0.5})
    assert main(argv) == 2
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "finished earlier" not in text and "running in" not in text
    assert "made with other method defaults (eta: 0.01 -> 0.5)" in text
    assert "Move or delete that folder" in text
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/results.json")} == stamps
