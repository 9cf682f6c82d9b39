"""Sample grids of generated images in run and comparison reports (issue 20, item 5)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from unspur.generate.store import SyntheticStore, find_stores
from unspur.report import render_compare_report, render_run_report
from unspur.report.samples import run_grids

EVIL = "<script>alert(1)</script>"


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_store(
    root: Path, per_group: int = 3, prompt: str | None = "a photo of a cross on land"
) -> None:
    """A store as the generative methods leave it: images plus manifest rows."""
    store = SyntheticStore(root)
    part = store.part_path(0)
    part.parent.mkdir(parents=True)
    rows = []
    for g, (y, a) in enumerate([(0, 1), (1, 0)]):
        for i in range(per_group):
            key = f"g{g}/{i:06d}"
            filename = store.image_filename(key)
            store.path(filename).parent.mkdir(parents=True, exist_ok=True)
            store.path(filename).write_bytes(png((40 * g, 10 * i, 200)))
            rows.append(
                {"key": key, "index": g * per_group + i, "filename": filename, "y": y, "a": a,
                 "prompt": prompt, "kept": i != 0, "reason": "" if i else "filtered"}
            )  # fmt: skip
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))


RESULTS = {
    "metrics": {},
    "data": {
        "group_counts": [
            {"g": 0, "y": "circle", "a": "land"},
            {"g": 1, "y": "circle", "a": EVIL},
            {"g": 2, "y": "cross", "a": "land"},
            {"g": 3, "y": "cross", "a": EVIL},
        ]
    },
}


def test_run_report_shows_the_kept_generated_images_per_group_escaped(tmp_path):
    fake_store(tmp_path / "ffr" / "synthetic", prompt=EVIL)
    assert find_stores(tmp_path) == [tmp_path / "ffr" / "synthetic"]
    grids = run_grids(tmp_path, RESULTS)
    # Two groups, named by the run's group names; only kept images (2 of 3 per group).
    assert grids.count("<tr>") == 2 and grids.count("<img") == 4
    assert "circle / &lt;script&gt;" in grids and "cross / land" in grids
    assert EVIL not in grids and "&lt;script&gt;alert(1)&lt;/script&gt;" in grids
    html = render_run_report(tmp_path, {**RESULTS, "method": "ffr", "dataset": "synthetic"})
    assert "Generated images (samples)" in html and html.count('src="data:image/png') >= 4
    assert EVIL not in html


def test_images_without_a_prompt_are_shown_without_one(tmp_path):
    fake_store(tmp_path / "diffinject_synthetic", prompt=None)
    grids = run_grids(tmp_path, RESULTS)
    assert grids.count("<img") == 4 and "None" not in grids


def test_run_without_generated_images_has_no_grid(tmp_path):
    assert run_grids(tmp_path, RESULTS) == ""
    html = render_run_report(tmp_path, {**RESULTS, "method": "erm", "dataset": "synthetic"})
    assert "Generated images" not in html


def test_comparison_report_shows_each_generative_runs_grid(tmp_path):
    gen, plain = tmp_path / "dbb" / "seed0", tmp_path / "erm" / "seed0"
    fake_store(gen / "dbb" / "store", per_group=8)
    plain.mkdir(parents=True)
    (gen / "results.json").write_text(json.dumps(RESULTS))
    metrics = {"mean": 0.5, "std": 0.0}
    summary = {
        "table": [{"method": "erm"}, {"method": "dbb"}],
        "aggregate": {
            m: {
                k: metrics
                for k in ("worst_group_accuracy", "average_accuracy", "balanced_accuracy")
            }
            for m in ("erm", "dbb")
        },  # fmt: skip
        "runs": [
            {
                "method": m,
                "seed": 0,
                "run_dir": str(d),
                "supervision": "✓",
                **dict.fromkeys(
                    ("worst_group_accuracy", "average_accuracy", "balanced_accuracy", "accuracy"),
                    50.0,
                ),
            }
            for m, d in (("erm", plain), ("dbb", gen))
        ],  # fmt: skip
    }
    html = render_compare_report(tmp_path, summary)
    section = html.split("Generated images (samples)")[1].split("<h2>Runs")[0]
    assert "<h3>dbb, seed 0</h3>" in section and "erm, seed" not in section
    assert section.count("<img") == 2 * 6  # 7 kept per group, the first 6 shown
