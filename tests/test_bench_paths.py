"""No committed file under bench/ or configs/ holds an absolute path of one machine, and
every committed suite parses (its methods, variants, measurements and assets exist)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from unspur.bench import load_suite, run_suite
from unspur.bench.provenance import machine_paths

REPO = Path(__file__).resolve().parents[1]


def test_machine_paths_are_found():
    assert machine_paths("Command: `python x.py --out /tmp/macx`") != []
    assert machine_paths("generator /work/cache/domain") != []
    assert machine_paths("--data-dir ../shared/data and bench/results/work/x.md") == []


def test_no_committed_bench_or_config_file_holds_an_absolute_machine_path():
    listed = subprocess.run(
        ["git", "ls-files", "bench", "configs"], cwd=REPO, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = {}
    for name in listed.stdout.split():
        path = REPO / name
        if path.suffix in {".png", ".jpg", ".pt", ".safetensors"} or not path.is_file():
            continue
        found = machine_paths(path.read_text(errors="replace"))
        if found:
            offenders[name] = found[0]
    assert not offenders, offenders


def test_bench_holds_suites_and_their_results_not_scripts():
    """Every benchmark is a suite run by `unspur bench`: no loop script under bench/."""
    listed = subprocess.run(["git", "ls-files", "bench"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    names = listed.stdout.split()
    assert any(n.startswith("bench/suites/") for n in names)
    stray = [n for n in names if not n.startswith(("bench/suites/", "bench/results/"))]
    scripts = [n for n in names if n.endswith((".py", ".sh"))]
    assert not stray and not scripts, stray + scripts


def test_committed_suites_are_valid(tmp_path):
    """Every committed suite's methods, measurements and configs check out (no training)."""
    suites = sorted((REPO / "bench" / "suites").glob("*.yaml"))
    assert {"smoke", "baselines", "mac"} <= {p.stem for p in suites}
    for path in suites:
        suite = load_suite(path)
        for asset in suite.assets.values():  # the runner only checks that folders exist
            if asset.build:
                continue
            (tmp_path / asset.path).mkdir(parents=True, exist_ok=True)
        checked = run_suite(
            path, tmp_path, work=tmp_path / "w", check=True, check_data=False, log=str
        )
        assert checked == []
    assert not (tmp_path / "w").exists()
