"""The run report's "Training" section: what each stage of the run trained, and how.

A stage trained by the training loop leaves ``RUN/<stage>/history.json`` (one entry per
epoch): its loss and accuracy curves are drawn. A last-layer method fit by a solver
rather than by epochs (DFR's L1 logistic regression, ``RUN/<stage>/dfr.json``) has no
history: the section says what was fit, on which features and data, and the
hyperparameter chosen on validation, instead of "no training history". A method that
starts from an ERM model trained elsewhere (``method.reference``, as ``unspur compare``
passes it) says which model that is. Every string read from the run goes through
:func:`html.escape`.
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path
from typing import Any

from unspur.report.svg import bar_chart, line_chart, percent

LABELS = {
    "worst_group_accuracy": "worst-group",
    "average_accuracy": "average",
    "balanced_accuracy": "balanced",
    "accuracy": "accuracy",
}
#: What DFR's tuning metric (``dfr.json``'s ``metric``) scores on validation.
DFR_METRIC = {"worst_group": "worst-group accuracy", "average": "average accuracy"}


def read_json(path: Path) -> Any:
    """The parsed JSON file, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def method_class(name: str) -> Any:
    """The registered method class ``name``, or ``None`` (the report of an unknown or
    removed method still renders)."""
    try:
        from unspur.methods.base import get_method

        return get_method(name)
    except Exception:  # noqa: BLE001 - any failure only drops the method's summary line
        return None


def run_stages(run_dir: Path, results: dict[str, Any]) -> list[str]:
    """The stages with a training history: those the run lists first, then any other."""
    listed = [str(s) for s in results.get("stages") or []]
    found = sorted(p.parent.name for p in run_dir.glob("*/history.json"))
    return list(dict.fromkeys([*listed, *found]))


def stage_curves(run_dir: Path, stage: str) -> list[str]:
    """Loss and accuracy curves of ``RUN/<stage>/history.json`` ([] when it has none)."""
    history = read_json(run_dir / stage / "history.json")
    if not history or not isinstance(history, list):
        return []
    epochs = [float(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    loss = [("train loss", list(zip(epochs, [h.get("train_loss") for h in history])))]
    accuracy = [("train acc", list(zip(epochs, [h.get("train_accuracy") for h in history])))]
    if any("val" in h for h in history):
        for key in ("accuracy", "worst_group_accuracy"):
            values = [(h.get("val") or {}).get(key) for h in history]
            accuracy.append((f"val {LABELS[key]}", list(zip(epochs, values))))
    seconds = sum(float(h.get("seconds", 0.0)) for h in history)
    return [
        f"<h3>{escape(stage)}</h3>",
        f"<p class='note'>{len(history)} epoch(s), {seconds:.1f} s of training "
        f"(from {escape(stage)}/history.json)</p>",
        '<div class="charts">',
        line_chart(loss, title=f"{stage}: training loss"),
        line_chart(accuracy, title=f"{stage}: accuracy", y_range=(0.0, 1.0), fmt=percent),
        "</div>",
    ]


def dfr_fit(stage: str, info: dict[str, Any], features_of: str) -> list[str]:
    """What DFR fit in ``stage`` (from its ``dfr.json``): the head, its data, the choices.

    ``features_of`` names the reference model (HTML); the base model DFR actually
    embedded with (``base_model_dir``, e.g. the ERM run's final checkpoint) wins when
    ``dfr.json`` records it.
    """
    variant = str(info.get("variant") or stage)
    data = "validation" if "val" in variant else "training"
    metric = DFR_METRIC.get(str(info.get("metric")), str(info.get("metric")))
    refits = info.get("num_retrains")
    if info.get("base_model_dir"):
        features_of = (
            f"the ERM model <code>{escape(str(info['base_model_dir']))}</code> "
            f"(base_model: {escape(str(info.get('base_model', '?')))})"
        )
    weights = info.get("class_weight")
    text = (
        "Only the last layer was trained: an L1-regularised logistic regression on the "
        f"frozen penultimate features of {features_of}, fit on group-balanced subsets of "
        f"the {data} set"
        + (f" and averaged over {escape(str(refits))} such fits" if refits else "")
        + f"; C = {escape(str(info.get('C')))}"
        + (f" and class weights {escape(_ratio(weights))}" if weights else "")
        + f", chosen by validation {escape(metric)}. A solver, not epochs: no training curves."
    )
    out = [f"<h3>{escape(stage)}: last-layer fit (DFR)</h3>", f"<p>{text}</p>"]
    out += _dfr_tuning(stage, info, metric)
    val = info.get("val") or {}
    if val:
        cells = "".join(
            f"<td>{escape(percent(_number(val.get(k))))}</td>" for k in LABELS if k in val
        )
        head = "".join(f"<th>{escape(LABELS[k])}</th>" for k in LABELS if k in val)
        out.append(
            "<table><thead><tr><th class='l'>after the fit</th>"
            f"{head}</tr></thead><tbody><tr><td class='l'>validation</td>{cells}</tr>"
            "</tbody></table>"
        )
    return out


def _dfr_tuning(stage: str, info: dict[str, Any], metric: str) -> list[str]:
    """The tuning scores: a chart over C, or (C, class weights) pairs, best first."""
    scores = info.get("tuning_scores")
    what = f"validation {metric} while tuning"
    if isinstance(scores, dict) and scores:
        names = [f"C = {c}" + (" (chosen)" if _same(c, info.get("C")) else "") for c in scores]
        values = [_number(v) for v in scores.values()]
        return [bar_chart(names, [(what, values)], title=f"{stage}: choice of C")]
    if isinstance(scores, list) and scores:
        rows = [r for r in scores if isinstance(r, dict)]
        rows.sort(key=lambda r: -(_number(r.get("score")) or 0.0))
        shown = rows[:10]
        names = [
            f"C = {r.get('C')}, class weights {_ratio(r.get('class_weight'))}"
            + (
                " (chosen)"
                if _same(r.get("C"), info.get("C"))
                and r.get("class_weight") == info.get("class_weight")
                else ""
            )
            for r in shown
        ]
        title = f"{stage}: choice of C and class weights"
        if len(rows) > len(shown):
            title += f" (best {len(shown)} of {len(rows)} tried)"
        return [bar_chart(names, [(what, [_number(r.get("score")) for r in shown])], title=title)]
    return []


def _ratio(weights: Any) -> str:
    if isinstance(weights, (list, tuple)):
        return ":".join(f"{w:g}" if isinstance(w, (int, float)) else str(w) for w in weights)
    return str(weights)


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def training_section(run_dir: Path, results: dict[str, Any]) -> list[str]:
    """The markup of the "Training" section of ``run_dir``'s report."""
    method = str(results.get("method", "?"))
    out = []
    cls = method_class(method)
    if cls is not None and cls.summary:
        out.append(f"<p><b>{escape(method)}</b>: {escape(cls.summary)}.</p>")
    reference = results.get("reference") or {}
    model = str(reference.get("model", ""))
    features_of = (
        f"the ERM model <code>{escape(model)}</code>" if model else "the reference ERM model"
    )
    starts_from = bool(getattr(cls, "uses_reference", False)) or _fits(run_dir)
    if model and starts_from and not Path(model).is_relative_to(run_dir):
        report = Path(model).parent / "report.html"
        where = "that run's report"
        if report.is_file():
            href = escape(Path(os.path.relpath(report, run_dir)).as_posix(), quote=True)
            where = f'<a href="{href}">that run\'s report</a>'
        out.append(
            f"<p class='note'>It starts from the ERM model <code>{escape(model)}</code>, "
            f"trained by another run (its training curves are in {where}).</p>"
        )
    shown = False
    for stage in run_stages(run_dir, results):
        curves = stage_curves(run_dir, stage)
        out += curves
        shown = shown or bool(curves)
    for path in sorted(run_dir.glob("*/dfr.json")):
        info = read_json(path)
        if isinstance(info, dict):
            out += dfr_fit(path.parent.name, info, features_of)
            shown = True
    if not shown:
        out.append(
            "<p>No stage of this run left a training record (<code>STAGE/history.json</code> "
            "or <code>STAGE/dfr.json</code>) in this directory.</p>"
        )
    return out


def _fits(run_dir: Path) -> bool:
    return any(run_dir.glob("*/dfr.json"))
