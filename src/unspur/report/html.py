"""One self-contained HTML file per run (``RUN/report.html``) or comparison (``DIR/report.html``).

The page has no JavaScript and loads nothing: charts are inline SVG
(:mod:`unspur.report.svg`), figures are base64 ``<img>`` data URIs, the style sheet is
inline. It opens offline in any browser, and is laid out for a 1280 px wide window:
charts span the text column (1100 px) and shrink with a narrower one, no label overlaps
another or is cut (long names wrap), tables wrap long words instead of running past the
page. ``tests/test_report.py`` checks this in headless Chromium.

Everything that comes from the user or the data — class and attribute names, file
names, prompts, config values, method names — goes through :func:`html.escape` before it
reaches the markup. Sections added by methods (see :func:`register_section`) must do the
same: they return markup, and :func:`escape` / :func:`img_tag` are the tools.

A run report holds: the headline metrics (test and validation) with the ERM reference
("before") next to the method ("after") when the run has one, or the ERM run beside it
in a comparison (:mod:`unspur.report.before`; otherwise the command that produces one);
per-group accuracy bars before/after and the per-group table; the group counts of the
data (real and, when a ``source`` column is present, synthetic); what each stage trained
(:mod:`unspur.report.training`: curves from ``RUN/<stage>/history.json``, DFR's
last-layer fit from ``RUN/<stage>/dfr.json``); group inference; figures (every PNG under
``RUN/*/figures/``) and any registered section; the metric definitions; the config and
library versions.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from unspur.io import atomic_write_text
from unspur.report.before import find_reference, how_to_get_before
from unspur.report.svg import bar_chart, percent
from unspur.report.training import LABELS, training_section

HEADLINE = ("worst_group_accuracy", "average_accuracy", "balanced_accuracy", "accuracy")
SUPERVISION = (
    "Supervision (as in the papers' tables): x no group labels; ✓ validation group labels "
    "(model selection or, for DFR, fitting); ✓✓ training group labels."
)

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; overflow-wrap: anywhere; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h3 { font-size: 1.05em; overflow-wrap: anywhere; }
p, dd, li, figcaption { overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 0.6em 0; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; }  /* long headers wrap; numbers do not */
td.l, th.l { text-align: left; white-space: normal; overflow-wrap: break-word; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.chart { display: block; max-width: 100%; height: auto; background: #fff;
         font-family: inherit; margin: 0.6em 0; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.85em; white-space: pre-wrap;
      overflow-wrap: anywhere; }
code { overflow-wrap: anywhere; }
.note { color: #555; font-size: 0.9em; }
figure { display: inline-block; margin: 0.5em; max-width: 100%; } img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
"""


# ----------------------------------------------------------------- section hook
@dataclass
class Section:
    """A block of the run report: a heading and markup (already escaped by its author)."""

    title: str
    html: str


SectionProvider = Callable[[Path, dict[str, Any]], list[Section]]
SECTION_PROVIDERS: list[SectionProvider] = []


def register_section(provider: SectionProvider) -> SectionProvider:
    """Add a section to every run report; usable as a decorator.

    ``provider(run_dir, results)`` returns a (possibly empty) list of :class:`Section`;
    it looks for its own artefacts in ``run_dir`` (sample grids of a generative method,
    saliency maps, pruning histograms) and returns nothing when they are absent. The
    markup it returns is inserted as is, so it must escape every user-derived string
    with :func:`escape` and embed images with :func:`img_tag` (the page must stay
    self-contained). Providers run in registration order, after the built-in figures.
    """
    SECTION_PROVIDERS.append(provider)
    return provider


def img_tag(path: Path, alt: str = "") -> str:
    """An ``<img>`` with the file embedded as a base64 data URI (PNG, JPEG, GIF, SVG)."""
    kind = {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".gif": "image/gif",
        ".svg": "image/svg+xml",
    }.get(path.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:{kind};base64,{data}" alt="{escape(alt or path.name)}">'


def figures_section(run_dir: Path, results: dict[str, Any]) -> list[Section]:
    """Every PNG under ``RUN/*/figures/`` (and ``RUN/figures/``), grouped by folder."""
    sections = []
    folders = sorted({p.parent for p in run_dir.glob("*/figures/*.png")})
    if (run_dir / "figures").is_dir():
        folders.insert(0, run_dir / "figures")
    for folder in folders:
        images = sorted(folder.glob("*.png"))
        if not images:
            continue
        body = "\n".join(
            f"<figure>{img_tag(p)}<figcaption>{escape(p.name)}</figcaption></figure>"
            for p in images
        )
        where = folder.relative_to(run_dir).as_posix()
        sections.append(Section(f"Figures: {where}", body))
    return sections


def generated_section(run_dir: Path, results: dict[str, Any]) -> list[Section]:
    """Sample grids of every synthetic store of the run (:mod:`unspur.report.samples`)."""
    from unspur.report.samples import run_grids

    grids = run_grids(run_dir, results)
    return [Section("Generated images (samples)", grids)] if grids else []


# ------------------------------------------------------------------ pieces
def _page(title: str, body: list[str]) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head><body>",
            *body,
            "</body></html>",
        ]
    )


def breakable(text: str, longest: int = 24) -> str:
    """``text`` escaped, with line-break opportunities (``<wbr>``) inside long words.

    A word (no spaces) longer than ``longest`` characters may break after ``/ _ . -``,
    and every ``longest`` characters where it has none of them, so a long file path or
    group name wraps inside its table cell instead of widening the table past the page.
    Shorter words never break.
    """
    out = []
    for word in text.split(" "):
        if len(word) <= longest:
            out.append(escape(word))
            continue
        pieces, run = [], 0
        for ch in word:
            pieces.append(escape(ch))
            run += 1
            if ch in "/_.-" or run >= longest:
                pieces.append("<wbr>")
                run = 0
        out.append("".join(pieces))
    return " ".join(out)


def _table(header: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """A table; the first ``left`` columns are left-aligned (and may wrap long words).

    Every cell is escaped.
    """
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{escape(str(h))}</th>' for i, h in enumerate(header)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="l">{breakable(str(c))}</td>' if i < left else f"<td>{escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _definitions(definitions: dict[str, str]) -> str:
    items = "".join(
        f"<dt><code>{escape(k)}</code></dt><dd>{escape(v)}</dd>" for k, v in definitions.items()
    )
    return f"<dl>{items}</dl><p class='note'>{escape(SUPERVISION)}</p>"


def _group_counts(records: list[dict[str, Any]]) -> list[str]:
    """Table and chart of the data's group counts (one column per split, plus ``source``)."""
    if not records:
        return ["<p>No group counts recorded.</p>"]
    label_keys = [k for k in ("g", "y", "a", "source") if k in records[0]]
    count_keys = [k for k in records[0] if k not in label_keys]
    rows = [[r.get(k, "") for k in label_keys + count_keys] for r in records]
    out = [_table(label_keys + count_keys, rows, left=len(label_keys))]
    names = [
        " / ".join(str(r[k]) for k in ("y", "a", "source") if k in r) or str(r.get("g"))
        for r in records
    ]
    series = [(k, [float(r.get(k, 0) or 0) for r in records]) for k in count_keys]
    out.append(bar_chart(names, series, title="images per group and split", y_max=None, fmt=_count))
    return out


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _headline_rows(entries: list[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for label, metrics in entries:
        for split, values in metrics.items():
            rows.append([label, split, *(percent(values.get(k)) for k in HEADLINE)])
    return rows


def _per_group(split: str, after: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """Bars and table of one split's per-group accuracy, ERM ("before") first when given."""
    groups = after["groups"]
    names = [str(g["name"]) for g in groups]
    before_by_name = {str(g["name"]): g for g in (before or {}).get("groups", [])}
    previous = [(before_by_name.get(n) or {}).get("accuracy") for n in names]
    series = []
    if before is not None:
        series.append(("before (ERM)", previous))
    series.append(("after" if before is not None else "accuracy", [g["accuracy"] for g in groups]))
    chart = bar_chart(names, series, title=f"{split}: accuracy per group")
    header = ["group", "n", "correct", "accuracy"]
    rows = []
    for i, g in enumerate(groups):
        row = [g["name"], g["n"], g["correct"], percent(g["accuracy"])]
        if before is not None:
            row.append(percent(previous[i]))
        rows.append(row)
    if before is not None:
        header.append("before (ERM)")
    worst = groups[after["worst_group"]]["name"] if "worst_group" in after else ""
    note = f"<p class='note'>worst group: {escape(str(worst))}</p>" if worst else ""
    return [f"<h3>{escape(split)}</h3>", chart, _table(header, rows), note]


def _selection(selection: dict[str, Any]) -> str:
    """ "worst_group (epoch 3)"; a method fit without epochs (a solver) says so instead."""
    text = escape(str(selection.get("rule")))
    epoch = selection.get("best_epoch")
    if isinstance(epoch, int) and epoch >= 1:
        return f"{text} (epoch {epoch})"
    return f"{text} (no epochs to choose from: see Training)"


# ------------------------------------------------------------------ run report
def render_run_report(run_dir: str | Path, results: dict[str, Any] | None = None) -> str:
    """The HTML of ``run_dir``'s report, from its ``results.json`` and stage folders."""
    run_dir = Path(run_dir)
    if results is None:
        results = json.loads((run_dir / "results.json").read_text())
    method, dataset = str(results.get("method", "?")), str(results.get("dataset", "?"))
    supervision = results.get("supervision", {})
    selection = results.get("selection", {})
    reference = find_reference(run_dir, results)
    metrics = results.get("metrics", {})
    title = f"unspur: {method} on {dataset} (seed {results.get('seed')})"
    body = [
        f"<h1>{escape(title)}</h1>",
        "<p>"
        f"method <b>{escape(method)}</b>, supervision <b>{escape(str(supervision.get('symbol')))}</b>"
        f" (train group labels: {escape(str(supervision.get('train_group_labels')))}, "
        f"val group labels: {escape(str(supervision.get('val_group_labels')))}); "
        f"model selection: {_selection(selection)}; "
        f"wall time {float(results.get('wall_seconds') or 0):.1f} s; "
        f"run directory <code>{escape(str(run_dir))}</code>.</p>",
        "<h2>Headline metrics</h2>",
    ]
    entries = []
    if reference:
        entries.append(("before: ERM reference", reference.get("metrics", {})))
    entries.append((f"after: {method}" if reference else method, metrics))
    body.append(
        _table(["model", "split", *(LABELS[k] for k in HEADLINE)], _headline_rows(entries), left=2)
    )
    if reference:
        source = reference.get("source") or "the ERM reference model"
        body.append(
            f"<p class='note'>before = {escape(str(source))}, "
            f"<code>{escape(str(reference.get('model', '')))}</code>, evaluated on the same "
            "splits.</p>"
        )
    body.append("<h2>Accuracy per group</h2>")
    if not reference and method != "erm":
        body.append(how_to_get_before(run_dir, results))
    for split, values in metrics.items():
        before = (reference or {}).get("metrics", {}).get(split) if reference else None
        body += _per_group(split, values, before)
    body.append("<h2>Data: images per group</h2>")
    body += _group_counts(results.get("data", {}).get("group_counts", []))
    info = results.get("data", {}).get("info") or {}
    if info:
        body.append(
            _table(["data info", "value"], [[k, _short(v)] for k, v in info.items()], left=2)
        )
    body.append("<h2>Training</h2>")
    body += training_section(run_dir, results)
    inference = results.get("group_inference")
    if inference:
        body.append("<h2>Group inference</h2>")
        body.append(f"<pre>{escape(json.dumps(inference, indent=2, default=str))}</pre>")
    for provider in (figures_section, generated_section, *SECTION_PROVIDERS):
        for section in provider(run_dir, results):
            body.append(f"<h2>{escape(section.title)}</h2>")
            body.append(section.html)
    body.append("<h2>Metric definitions</h2>")
    body.append(_definitions(results.get("definitions", {})))
    body.append("<h2>Config</h2>")
    body.append(
        f"<pre>{escape(json.dumps(results.get('config', {}), indent=2, default=str))}</pre>"
    )
    options = results.get("method_options")
    if options:
        body.append(
            f"<p>method options (resolved):</p><pre>{escape(json.dumps(options, indent=2))}</pre>"
        )
    versions = results.get("versions") or {}
    body.append(
        "<p class='note'>" + escape(", ".join(f"{k} {v}" for k, v in versions.items())) + "</p>"
    )
    return _page(title, body)


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_run_report(run_dir: str | Path, results: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    path = run_dir / "report.html"
    atomic_write_text(path, render_run_report(run_dir, results))
    return path


# ------------------------------------------------------------- comparison report
def render_compare_report(out_dir: str | Path, summary: dict[str, Any]) -> str:
    """The HTML of a comparison, from :func:`unspur.compare.compare`'s summary."""
    out_dir = Path(out_dir)
    rows = summary["table"]
    title = f"unspur comparison: {', '.join(r['method'] for r in rows)}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p>dataset <b>{escape(str(summary.get('dataset', '?')))}</b>; seeds "
        f"{escape(', '.join(str(s) for s in summary.get('seeds', [])))}; test split, "
        "percentages, mean ± sample std (ddof = 1) over the seeds; n per row.</p>",
        "<h2>Results</h2>",
    ]
    header = list(rows[0]) if rows else []
    body.append(_table(header, [list(r.values()) for r in rows], left=2))
    body.append(f"<p class='note'>{escape(SUPERVISION)}</p>")
    methods = [r["method"] for r in rows]
    aggregate = summary.get("aggregate", {})
    series, errors = [], []
    for key in ("worst_group_accuracy", "average_accuracy", "balanced_accuracy"):
        series.append((LABELS[key], [aggregate[m][key]["mean"] for m in methods]))
        errors.append([aggregate[m][key]["std"] for m in methods])
    body.append('<div class="charts">')
    body.append(bar_chart(methods, series, title="test metrics per method", errors=errors))
    body.append("</div>")
    groups = summary.get("groups", {})
    if groups:
        body.append("<h2>Accuracy per group (test, mean over seeds)</h2>")
        names = summary.get("group_names", [])
        ordered = (["erm"] if "erm" in groups else []) + [m for m in methods if m != "erm"]
        gseries = [
            (("before: erm" if m == "erm" else m), groups[m]) for m in ordered if m in groups
        ]
        body.append(bar_chart(names, gseries, title="test accuracy per group"))
        grows = [[name, *(percent(groups[m][i]) for m in ordered)] for i, name in enumerate(names)]
        body.append(_table(["group", *ordered], grows))
    body.append("<h2>Data: images per group</h2>")
    body += _group_counts(summary.get("group_counts", []))
    body += _generated_grids(summary)
    body.append("<h2>Runs</h2>")
    run_rows = []
    for run in summary.get("runs", []):
        link = Path(run["run_dir"]) / "report.html"
        try:
            href = link.relative_to(out_dir).as_posix()
        except ValueError:
            href = link.as_posix()
        run_rows.append(
            "<tr>"
            f"<td class='l'>{escape(str(run['method']))}</td><td>{escape(str(run['seed']))}</td>"
            f"<td>{escape(str(run['supervision']))}</td>"
            + "".join(f"<td>{escape(f'{run[k]:.2f}')}</td>" for k in HEADLINE)
            + f"<td class='l'><a href=\"{escape(href, quote=True)}\">{breakable(href)}</a></td></tr>"
        )
    body.append(
        "<table><thead><tr><th class='l'>method</th><th>seed</th><th>supervision</th>"
        + "".join(f"<th>{escape(LABELS[k])} %</th>" for k in HEADLINE)
        + "<th class='l'>report</th></tr></thead><tbody>"
        + "".join(run_rows)
        + "</tbody></table>"
    )
    body.append("<h2>Metric definitions</h2>")
    body.append(_definitions(summary.get("definitions", {})))
    if summary.get("command"):
        body.append(f"<p class='note'>command: <code>{escape(summary['command'])}</code></p>")
    return _page(title, body)


def _generated_grids(summary: dict[str, Any]) -> list[str]:
    """Per run of a generative method, a sample grid of its generated images."""
    from unspur.report.samples import run_grids

    out = []
    for run in summary.get("runs", []):
        run_dir = Path(run["run_dir"])
        results_path = run_dir / "results.json"
        try:
            results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        except ValueError:
            results = {}
        grids = run_grids(run_dir, results, per_group=6)
        if grids:
            out.append(f"<h3>{escape(str(run['method']))}, seed {escape(str(run['seed']))}</h3>")
            out.append(grids)
    return ["<h2>Generated images (samples)</h2>", *out] if out else []


def write_compare_report(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    path = out_dir / "report.html"
    atomic_write_text(path, render_compare_report(out_dir, summary))
    return path
