"""Run and stage fingerprints: the same inputs spelled differently are one run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unspur.config import config_from_dict
from unspur.stages import run_fingerprint, run_inputs


def test_relative_and_absolute_data_root_are_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    relative = config_from_dict({"data": {"name": "synthetic", "root": os.path.join("..", "data")}})
    absolute = config_from_dict({"data": {"name": "synthetic", "root": str(data)}})
    assert run_fingerprint(relative) == run_fingerprint(absolute)
    assert run_inputs(relative)["data"]["root"] == str(data.resolve())


def test_another_data_root_is_another_run(tmp_path: Path) -> None:
    first = config_from_dict({"data": {"name": "synthetic", "root": str(tmp_path / "a")}})
    second = config_from_dict({"data": {"name": "synthetic", "root": str(tmp_path / "b")}})
    assert run_fingerprint(first) != run_fingerprint(second)


def test_a_shared_cache_is_not_an_input_of_a_run() -> None:
    """``shared_cache`` says where finished work may be shared, nothing about results:
    setting it keeps the run (and its stages) as they were; a real option does not."""
    dbb = {"data": {"name": "synthetic"}, "method": {"name": "dbb", "options": {"k": 5}}}
    shared = {**dbb, "method": {"name": "dbb", "options": {"k": 5, "shared_cache": "here"}}}
    other = {**dbb, "method": {"name": "dbb", "options": {"k": 6, "shared_cache": "here"}}}
    fingerprint = run_fingerprint(config_from_dict(dbb))
    assert run_fingerprint(config_from_dict(shared)) == fingerprint
    assert run_fingerprint(config_from_dict(other)) != fingerprint
