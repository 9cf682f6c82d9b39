"""The HTML report: self-contained, rendered by a real browser, user text escaped."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import zlib
from html import escape, unescape
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest

from unspur.compare import COLUMN, DIFF_COLUMN
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
    """The DOM headless Chromium builds from ``page`` at 1280 px wide (no network,
    throwaway profile)."""
    profile = tmp_path / f"chromium-profile-{page.stem}"
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
            "--window-size=1280,2000",
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


#: Run in the page by Chromium: measures every label and writes the verdict into the DOM
#: (``<body data-layout="JSON">``), which ``--dump-dom`` hands back. Problems found:
#: SVG text boxes that overlap each other, a bar, or an error whisker; SVG text that
#: leaves its chart; HTML text cut by its box (scrollWidth > clientWidth) or running
#: past the page's right edge. ``labels`` is the text every SVG <text> shows.
LAYOUT_SCRIPT = """
<script>
(function () {
  const problems = [];
  const tol = 0.5;
  const box = (e) => e.getBoundingClientRect();
  const hit = (a, b) => a.left < b.right - tol && b.left < a.right - tol &&
                        a.top < b.bottom - tol && b.top < a.bottom - tol;
  const shown = (t) => [...t.childNodes].filter((n) => n.nodeName !== 'title')
                                        .map((n) => n.textContent).join(' ').trim();
  const labels = [];
  document.querySelectorAll('svg').forEach((svg, k) => {
    const frame = box(svg);
    const texts = [...svg.querySelectorAll('text')].filter((t) => shown(t));
    const boxes = texts.map(box);
    const solids = [...svg.querySelectorAll('rect, line.whisker')].filter((r) =>
      r.classList.contains('whisker') ||
      (!r.classList.contains('band') && r.getAttribute('fill') !== 'none'));
    texts.forEach((t, i) => {
      const a = boxes[i], name = shown(t);
      labels.push(name);
      if (a.left < frame.left - tol || a.right > frame.right + tol ||
          a.top < frame.top - tol || a.bottom > frame.bottom + tol) {
        problems.push(`svg ${k}: text "${name}" leaves the chart`);
      }
      for (let j = i + 1; j < texts.length; j++) {
        if (hit(a, boxes[j])) {
          problems.push(`svg ${k}: "${name}" overlaps "${shown(texts[j])}"`);
        }
      }
      solids.forEach((r) => {
        if (hit(a, box(r))) {
          problems.push(`svg ${k}: "${name}" overlaps a ${r.getAttribute('class') || 'rect'}`);
        }
      });
    });
  });
  const right = document.body.getBoundingClientRect().right;
  document.body.querySelectorAll('*').forEach((e) => {
    const style = getComputedStyle(e);
    const tag = e.tagName.toLowerCase();
    if (e.closest('svg') || tag === 'script' || style.display === 'none') return;
    if (style.display !== 'inline' && e.scrollWidth > e.clientWidth + 1 &&
        style.overflowX !== 'auto' && style.overflowX !== 'scroll') {
      problems.push(`<${tag}> "${e.textContent.slice(0, 60)}" is cut`);
    }
    if (box(e).right > right + 1) {
      problems.push(`<${tag}> "${e.textContent.slice(0, 60)}" runs past the page`);
    }
  });
  document.body.dataset.layout = JSON.stringify({
    problems: problems, labels: labels, width: window.innerWidth,
    svgs: [...document.querySelectorAll('svg')].map((s) => box(s).width),
  });
})();
</script>
"""


def layout(page: Path, tmp_path: Path) -> dict:
    """Chromium's measurements of ``page`` at 1280 px (see :data:`LAYOUT_SCRIPT`)."""
    probe = tmp_path / f"probe-{page.parent.name}-{page.name}"
    probe.write_text(page.read_text().replace("</body>", LAYOUT_SCRIPT + "</body>"))
    dom = dump_dom(probe, tmp_path)
    found = re.search(r'<body[^>]*data-layout="([^"]*)"', dom)
    assert found, "the layout script did not run: " + dom[:500]
    verdict = json.loads(unescape(found.group(1)))
    assert verdict["width"] == 1280
    return verdict


def assert_readable(verdict: dict, names: list[str]) -> None:
    """No overlap, nothing cut, and every name shown in full by some SVG label."""
    assert verdict["problems"] == [], "\n".join(verdict["problems"][:40])
    squashed = {label.replace(" ", "") for label in verdict["labels"]}
    missing = [n for n in names if n.replace(" ", "") not in squashed]
    assert not missing, f"not shown in full by any chart label: {missing}"


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
    write_history(tmp_path / "<b>stage", 2)
    fit = tmp_path / "<u>dfr"
    fit.mkdir()
    (fit / "dfr.json").write_text(
        json.dumps(
            {"C": EVIL, "variant": EVIL, "tuning_scores": {EVIL: 0.5}, "base_model_dir": EVIL}
        )
    )
    page = write_run_report(tmp_path, evil_results())
    html = page.read_text()
    assert EVIL not in html and "<i>fig" not in html and "&lt;i&gt;fig.png" in html
    assert "<b>stage" not in html and "<u>dfr" not in html and "&lt;u&gt;dfr" in html
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


# ------------------------------------------------------------ read by a person
LONG_NAMES = [
    "male / child (age 10 or less)",
    "male / adult (age 20 or more), photographed outdoors in daylight",
    "female / child (age 10 or less)",
    "female / Supercalifragilisticexpialidocious_attribute_name_without_any_space",
]


def stress_summary() -> dict:
    """A comparison with long group names, close values (100/98/95%) and std whiskers."""
    methods = ["erm", "groupdro", "jtt", "dfr_val", "clustered_dreambooth"]
    close = [1.0, 0.98, 0.95, 0.999, 0.0]
    aggregate = {
        m: {
            k: {"mean": close[(i + j) % len(close)], "std": 0.04 * (i + 1)}
            for j, k in enumerate(("worst_group_accuracy", "average_accuracy", "balanced_accuracy"))
        }
        for i, m in enumerate(methods)
    }
    return {
        "dataset": "utkface",
        "seeds": [0, 1, 2],
        # The columns `unspur compare` writes, with their widest realistic cells.
        "table": [
            {
                "method": m,
                "supervision": "✓✓",
                **{column: "100.0 ± 12.3" for column in COLUMN.values()},
                "n": 3,
                DIFF_COLUMN: "-" if m == "erm" else "+21.0 [-110.3, +152.3]",
            }
            for m in methods
        ],
        "aggregate": aggregate,
        "groups": {m: [close[(i + g) % 5] for g in range(4)] for i, m in enumerate(methods)},
        "group_names": LONG_NAMES,
        "group_counts": [
            {"g": g, "y": n.split(" / ")[0], "a": n.split(" / ")[1], "train": 10**g, "test": 7}
            for g, n in enumerate(LONG_NAMES)
        ],
        "definitions": DEFINITIONS,
        "runs": [
            {
                "method": m,
                "seed": 0,
                "supervision": "✓",
                "run_dir": f"cmp/{m}/seed0",
                **{k: 100.0 for k in ("worst_group_accuracy", "average_accuracy")},
                **{k: 99.5 for k in ("balanced_accuracy", "accuracy")},
            }
            for m in methods
        ],
        "command": "unspur compare --dataset utkface --methods " + ",".join(methods),
    }


def long_name_results() -> dict:
    """A run (no ERM reference) of a method trained from scratch, with long group names."""
    results = evil_results()
    results["method"], results["dataset"] = "groupdro", "utkface"
    metrics = results["metrics"]["test"]
    for group, name in zip(metrics["groups"], LONG_NAMES):
        group["name"] = name
    for record, name in zip(results["data"]["group_counts"], LONG_NAMES):
        record["y"], record["a"] = name.split(" / ")
    return results


@needs_chromium
def test_run_report_reads_well_at_1280(run_dir, tmp_path):
    """The real DFR run (before/after bars, curves, DFR's fit): no overlap, nothing cut."""
    verdict = layout(run_dir / "report.html", tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    names = [g["name"] for g in results["metrics"]["test"]["groups"]]
    assert_readable(verdict, names)
    assert max(verdict["svgs"]) >= 1000  # charts use the page's width


@needs_chromium
def test_compare_report_reads_well_at_1280(tmp_path):
    from unspur.report import write_compare_report

    page = write_compare_report(tmp_path, stress_summary())
    assert_readable(layout(page, tmp_path), LONG_NAMES)


@needs_chromium
def write_history(stage_dir: Path, epochs: int) -> None:
    """A ``history.json`` of ``epochs`` epochs, as the training loop writes it."""
    stage_dir.mkdir(parents=True)
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "train_accuracy": 1 - 1 / (e + 1),
            "seconds": 1.5,
            "val": {"accuracy": 0.9, "worst_group_accuracy": 0.5 + e / (4 * epochs)},
        }
        for e in range(1, epochs + 1)
    ]
    (stage_dir / "history.json").write_text(json.dumps(history))


@needs_chromium
def test_long_group_names_read_well_at_1280(tmp_path):
    """Long group and stage names, 120 epochs of curves, the how-to-get-ERM note."""
    write_history(tmp_path / "retrain_the_last_layer_on_group_balanced_generated_images", 120)
    write_history(tmp_path / "erm", 3)
    write_dfr_train_fit(tmp_path / "dfr_train")
    page = write_run_report(tmp_path, long_name_results())
    assert "best 10 of 42 tried" in page.read_text()
    assert_readable(layout(page, tmp_path), LONG_NAMES)


def write_dfr_train_fit(stage_dir: Path) -> None:
    """A ``dfr.json`` of DFR^Tr_Tr with tuned class weights (scores per (C, weights))."""
    stage_dir.mkdir(parents=True)
    scores = [
        {"C": c, "class_weight": [1.0, w], "score": round(0.5 + c / 3 - w / 100, 4)}
        for c in (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
        for w in (1.0, 2.0, 3.0, 10.0, 100.0, 300.0)
    ]
    info = {
        "C": 1.0,
        "class_weight": [1.0, 1.0],
        "metric": "worst_group",
        "tuning_scores": scores,
        "variant": "dfr_train",
        "num_retrains": 10,
        "base_model": "final",
        "base_model_dir": "erm/checkpoints/last",
        "val": {"worst_group_accuracy": 0.75, "accuracy": 0.9},
    }
    (stage_dir / "dfr.json").write_text(json.dumps(info))


def test_last_layer_run_says_what_was_trained(run_dir):
    html = (run_dir / "report.html").read_text()
    fit = json.loads((run_dir / "dfr_val" / "dfr.json").read_text())
    assert "No training history" not in html and "(epoch 0)" not in html
    assert "dfr_val: last-layer fit (DFR)" in html
    assert f"C = {fit['C']}, chosen by validation worst-group accuracy" in html
    assert "Only the last layer was trained" in html


def test_group_method_shows_erm_from_its_comparison(tmp_path):
    """GroupDRO in a comparison: the ERM run of the same seed is its "before"."""
    results = long_name_results()
    results["config"] = {"data": {"name": "utkface"}}
    erm = {**results, "method": "erm", "metrics": copy.deepcopy(results["metrics"])}
    erm["metrics"]["test"]["groups"][0]["accuracy"] = 0.123456
    for name, record in (("erm", erm), ("groupdro", results)):
        (tmp_path / name / "seed0").mkdir(parents=True)
        (tmp_path / name / "seed0" / "results.json").write_text(json.dumps(record))
    html = render_run_report(tmp_path / "groupdro" / "seed0", results)
    assert "before (ERM)" in html and "12.35%" in html and "No ERM" not in html
    # Another data config is no before/after pair: the report says how to get one.
    erm["config"] = {"data": {"name": "celeba"}}
    (tmp_path / "erm" / "seed0" / "results.json").write_text(json.dumps(erm))
    html = render_run_report(tmp_path / "groupdro" / "seed0", results)
    assert "before (ERM)" not in html
    assert 'No ERM "before" bars' in html and "--methods erm,groupdro" in html
