"""The HTML report: self-contained, rendered by a real browser, user text escaped."""

from __future__ import annotations

import json
import shutil
import subprocess
import zlib
from html import escape
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest

from unspur.config import load_config
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.evaluate.metrics import DEFINITIONS, group_metrics
from unspur.pipeline import run
from unspur.report import Section, register_section, render_run_report, write_run_report
from unspur.report.html import SECTION_PROVIDERS
from unspur.report.svg import percent

DEBUG = helpers.DEBUG
EVIL = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not on PATH (apt-get install -y chromium); browser rendering not checked",
)


def dump_dom(page: Path, tmp_path: Path) -> str:
    """The DOM headless Chromium builds from ``page`` (no network, throwaway profile)."""
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<body" in result.stdout, result.stderr[-2000:]
    return result.stdout


def tiny_png() -> bytes:
    """A valid 1x1 PNG, built by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """ERM, then DFR on the same directory: DFR reuses the ERM stage ("before")."""
    out = tmp_path_factory.mktemp("run")
    run(load_config(None, DEBUG), out)
    erm_history = (out / "erm" / "history.json").stat().st_mtime_ns
    results = run(load_config(None, DEBUG + ["method.name=dfr_val"]), out)
    assert (out / "erm" / "history.json").stat().st_mtime_ns == erm_history  # reused
    assert results["reference"]["model"].endswith("best")
    figures = out / "dfr_val" / "figures"
    figures.mkdir(parents=True)
    (figures / "grid.png").write_bytes(tiny_png())
    write_run_report(out, results)
    return out


def test_run_report_contents(run_dir):
    html = (run_dir / "report.html").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    test = results["metrics"]["test"]
    assert percent(test["worst_group_accuracy"]) in html
    assert percent(results["reference"]["metrics"]["test"]["worst_group_accuracy"]) in html
    for definition in DEFINITIONS.values():
        assert escape(definition) in html
    assert "before (ERM)" in html and "erm: training loss" in html
    assert "data:image/png;base64," in html and "grid.png" in html
    # Self-contained: no script, no external resource.
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert 'src="http' not in html and 'href="http' not in html


@needs_chromium
def test_report_renders_in_chromium(run_dir, tmp_path):
    dom = dump_dom(run_dir / "report.html", tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("val", "test"):
        metrics = results["metrics"][split]
        assert percent(metrics["worst_group_accuracy"]) in dom
        assert percent(metrics["balanced_accuracy"]) in dom
    assert dom.count("<svg") >= 4  # per-group bars, counts, curves
    assert "circle / land" in dom


def evil_results() -> dict:
    """results.json-shaped data whose class name, file names and config hold markup."""
    frame = pd.DataFrame(
        {
            "filename": [f"{i}.png" for i in range(8)],
            "y": [0, 0, 1, 1] * 2,
            "a": [0, 1, 0, 1] * 2,
            "split": ["train"] * 4 + ["test"] * 4,
        }
    )
    table = GroupTable(
        frame, ArrayStore(np.zeros((8, 4, 4, 3), np.uint8)), [EVIL, "dog"], ["land", "water"]
    )
    names = [table.group_name(g) for g in range(table.n_groups)]
    metrics = group_metrics(
        np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3]), 4, None, names
    )
    return {
        "method": EVIL,
        "dataset": EVIL,
        "seed": 0,
        "supervision": {"symbol": "x", "train_group_labels": False, "val_group_labels": False},
        "selection": {"rule": "last", "best_epoch": 1},
        "metrics": {"test": metrics.to_dict()},
        "definitions": DEFINITIONS,
        "data": {
            "group_counts": table.counts().reset_index().to_dict(orient="records"),
            "info": {"prompt": EVIL},
        },
        "config": {"method": {"name": EVIL}},
        "stages": [],
    }


def test_user_text_is_escaped(tmp_path):
    figures = tmp_path / "stage" / "figures"
    figures.mkdir(parents=True)
    (figures / "<i>fig.png").write_bytes(tiny_png())
    page = write_run_report(tmp_path, evil_results())
    html = page.read_text()
    assert EVIL not in html and "<i>fig" not in html and "&lt;i&gt;fig.png" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    if CHROMIUM is not None:
        dom = dump_dom(page, tmp_path)
        assert "<script" not in dom.lower()  # shown as text, never an element
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_section_hook(tmp_path):
    @register_section
    def extra(run_dir, results):
        if not (run_dir / "masks.txt").is_file():
            return []
        return [Section("Saliency", "<p>masks: 3</p>")]

    try:
        assert "Saliency" not in render_run_report(tmp_path, evil_results())
        (tmp_path / "masks.txt").write_text("x")
        assert "<p>masks: 3</p>" in render_run_report(tmp_path, evil_results())
    finally:
        SECTION_PROVIDERS.remove(extra)
