"""Compare methods over seeds on one dataset, like the papers' tables.

Every (method, seed) runs in ``OUT/<method>/seed<k>/`` through :func:`unspur.pipeline.run`
(resumable; a finished run of the same config is skipped). Methods that start from an
ERM reference model (DFR, last-layer retraining, or any method with
``method.group_inference``) reuse the ERM run of the same seed, ``OUT/erm/seed<k>/model``,
passed as ``method.reference``; ERM is added to the comparison when such a method asks
for it and it was not listed.

Outputs in ``OUT``: ``comparison.md`` and ``comparison.csv`` (worst-group, average and
balanced test accuracy, mean ± std over seeds, with the supervision column: x / ✓ / ✓✓),
``runs.csv`` (one row per run), ``comparison.json`` and ``report.html``.

Overrides: ``--set key=value`` applies to every method; ``--set METHOD:key=value`` to one
method only (``--set jtt:method.options.lambda_up=20``). The base config's
``method.options`` apply only to the method that config names.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unspur.config import RunConfig, apply_overrides, config_from_dict
from unspur.errors import ConfigError, UnspurError
from unspur.evaluate.metrics import DEFINITIONS
from unspur.io import atomic_write_json, atomic_write_text, exclusive_lock, lock_beside

TABLE_METRICS = ("worst_group_accuracy", "average_accuracy", "balanced_accuracy")
COLUMN = {
    "worst_group_accuracy": "worst-group acc. (%)",
    "average_accuracy": "average acc. (%)",
    "balanced_accuracy": "balanced acc. (%)",
}
DIFF_COLUMN = "worst-group vs ERM (paired, 95% CI)"


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what} is empty; give a comma-separated list")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in parse_list(text, "--seeds"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise ConfigError(f"--seeds expects integers like 0,1,2; got {item!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def label_of(override: str) -> str | None:
    """The method (or variant) a ``METHOD:key=value`` override is for; None for
    ``key=value``."""
    head, sep, _ = override.partition(":")
    return head if sep and "=" not in head and "." not in head else None


def receives_base_options(method: str, base_method: str) -> bool:
    """Whether ``method`` keeps the base config's ``method.options``: only the method that
    config names does (:func:`plan` resets them for every other one)."""
    return method == base_method


def split_overrides(overrides: list[str], methods: list[str]) -> tuple[list[str], dict]:
    """``key=value`` for every method; ``METHOD:key=value`` for one."""
    common: list[str] = []
    per_method: dict[str, list[str]] = {}
    for text in overrides:
        head = label_of(text)
        rest = text.partition(":")[2]
        if head is not None:
            if head not in methods:
                raise ConfigError(
                    f"--set {text!r} names method {head!r}, which is not compared "
                    f"({', '.join(methods)})"
                )
            per_method.setdefault(head, []).append(rest)
        else:
            common.append(text)
    return common, per_method


def uses_reference(config: RunConfig) -> bool:
    from unspur.methods.base import get_method

    method = get_method(config.method.name)
    return method.uses_reference or config.method.group_inference is not None


def spelled_from_cwd(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it. A run's config
    holds its ERM reference's path, so the same folder spelled absolutely or relatively
    must give the same paths, or a rerun would not find its finished runs."""
    if not path.is_absolute():
        return path
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def other_code_run(config: RunConfig, folder: Path, stem: str) -> Path | None:
    """The newest finished run of ``config`` in ``folder`` named ``<stem>`` (before code
    versions named folders) or ``<stem>-<code version>``; None when there is none."""
    from unspur.stages import is_finished

    found = [
        d for d in folder.glob(f"{stem}*")
        if (d.name == stem or d.name.startswith(stem + "-")) and is_finished(config, d)
    ]  # fmt: skip
    return max(found, key=lambda d: (d / "results.json").stat().st_mtime, default=None)


def other_code(results: dict[str, Any]) -> str:
    """A note for a finished run trained by other code than the installed one (its
    numbers may not be what this code gives: delete the folder to train it again)."""
    from unspur.code_version import code_version

    used = results.get("code_version")
    if used == code_version():
        return ""
    return (
        f"; trained by other code ({used or 'code version not recorded'}, now "
        f"{code_version()}): delete the folder to train it again"
    )


def plan(
    base: dict[str, Any],
    methods: list[str],
    seeds: list[int],
    overrides: list[str],
    out_dir: Path,
    variants: dict[str, tuple[str, list[str]]] | None = None,
    fingerprinted_dirs: bool = False,
    code: str | None = None,
    reuse_other_code: bool = False,
) -> list[tuple[str, int, RunConfig, Path]]:
    """Every (method, seed, config, run dir), ERM first; all configs validated up front.

    ``variants`` maps a label used in ``methods`` to ``(method name, overrides)``: a named
    variant of a method (``mac_views4 -> ("mac", ["method.options.views=4"])``) that runs
    in its own directory and has its own row. With ``fingerprinted_dirs`` a run lives in
    ``OUT/<label>/seed<k>-<run fingerprint>``: a changed config (or a changed ERM
    reference, whose directory is part of the config that reuses it) gets a new directory
    and runs again, an unchanged one is found finished (the bench's exact invalidation).
    ``code`` (with ``fingerprinted_dirs``; :func:`~unspur.code_version.code_version`)
    appends the code version, ``seed<k>-<fingerprint>-<code>``: a change of code trains
    again in new folders. ``reuse_other_code``: a run not finished under this code takes
    a finished run of the same config under another code version (the newest), or of a
    folder named before code versions were, when there is one (:func:`other_code_run`).
    """
    from unspur.methods.base import get_method
    from unspur.stages import is_finished, run_fingerprint

    variants = variants or {}
    out_dir = spelled_from_cwd(out_dir)

    def method_of(label: str) -> str:
        return variants[label][0] if label in variants else label

    for name in methods:
        get_method(method_of(name))
    common, per_method = split_overrides(overrides, methods)
    values = apply_overrides(copy.deepcopy(base), common)
    base_method = (values.get("method") or {}).get("name", "erm")

    def config_for(label: str, seed: int, reference: Path | None) -> RunConfig:
        name = method_of(label)
        v = copy.deepcopy(values)
        section = v.setdefault("method", {}) or {}
        v["method"] = section
        if not receives_base_options(name, base_method):
            section["options"] = {}
        section["name"] = name
        v["seed"] = seed
        v = apply_overrides(v, [*variants.get(label, (name, []))[1], *per_method.get(label, [])])
        if reference is not None and not v["method"].get("reference"):
            v["method"]["reference"] = str(reference)
        try:
            config = config_from_dict(v)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from exc
        get_method(name).resolve_options(config.method.options)
        return config

    order = list(methods)
    needs_erm = [m for m in methods if m != "erm" and uses_reference(config_for(m, seeds[0], None))]
    if needs_erm and "erm" not in order:
        order.insert(0, "erm")
    elif "erm" in order:
        order.remove("erm")
        order.insert(0, "erm")
    runs = []
    erm_dirs: dict[int, Path] = {}
    for name in order:
        for seed in seeds:
            erm_dir = erm_dirs.get(seed, out_dir / "erm" / f"seed{seed}")
            reference = erm_dir / "model" if name in needs_erm else None
            config = config_for(name, seed, reference)
            run_dir = out_dir / name / f"seed{seed}"
            if fingerprinted_dirs:
                stem = f"seed{seed}-{run_fingerprint(config)[:12]}"
                run_dir = run_dir.with_name(f"{stem}-{code}" if code else stem)
                if reuse_other_code and not is_finished(config, run_dir):
                    run_dir = other_code_run(config, run_dir.parent, stem) or run_dir
            if name == "erm":
                erm_dirs[seed] = run_dir
            runs.append((name, seed, config, run_dir))
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (ddof = 1; 0.0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def _cell(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def paired_difference(
    values: dict[int, float], reference: dict[int, float], confidence: float = 0.95
) -> dict[str, Any] | None:
    """Mean of ``values[s] - reference[s]`` over the seeds both have, with a t interval.

    Pairing by seed removes the spread both runs share (same data draw, same start), which is
    what a reader of "method vs ERM" wants; the interval is Student's t on the n - 1 degrees
    of freedom of the n paired differences (None for n < 2: no spread to estimate).
    """
    from scipy.stats import t as student_t

    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = np.asarray([values[s] - reference[s] for s in seeds], dtype=np.float64)
    mean, std = _mean_std(list(diffs))
    result: dict[str, Any] = {"mean": mean, "std": std, "n": len(seeds), "low": None, "high": None}
    if len(seeds) > 1:
        half = (
            float(student_t.ppf(0.5 + confidence / 2, len(seeds) - 1)) * std / np.sqrt(len(seeds))
        )
        result["low"], result["high"] = mean - half, mean + half
    return result


def _difference_cell(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    text = f"{100 * diff['mean']:+.1f}"
    if diff["low"] is not None:
        text += f" [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"
    return text


def summarise(runs: list[dict[str, Any]], methods: list[str], seeds: list[int]) -> dict[str, Any]:
    """The comparison table (mean ± sample std over seeds, with n), per-group means, and each
    method's worst-group difference to ERM paired by seed (95% t interval)."""
    table, aggregate, groups = [], {}, {}
    erm_worst = {
        r["seed"]: r["results"]["metrics"]["test"]["worst_group_accuracy"]
        for r in runs
        if r["method"] == "erm"
    }
    for name in methods:
        members = [r for r in runs if r["method"] == name]
        if not members:
            continue
        row: dict[str, Any] = {
            "method": name,
            "supervision": members[0]["supervision"],
        }
        aggregate[name] = {}
        for key in TABLE_METRICS:
            mean, std = _mean_std([m["results"]["metrics"]["test"][key] for m in members])
            aggregate[name][key] = {"mean": mean, "std": std, "n": len(members)}
            row[COLUMN[key]] = _cell(mean, std, len(members))
        row["n"] = len(members)
        if erm_worst and name != "erm":
            diff = paired_difference(
                {
                    m["seed"]: m["results"]["metrics"]["test"]["worst_group_accuracy"]
                    for m in members
                },
                erm_worst,
            )
            aggregate[name]["worst_group_vs_erm"] = diff
            row[DIFF_COLUMN] = _difference_cell(diff)
        elif erm_worst:
            row[DIFF_COLUMN] = "-"
        table.append(row)
        per_group = [m["results"]["metrics"]["test"]["groups"] for m in members]
        means = []
        for g in range(len(per_group[0])):
            values = [p[g]["accuracy"] for p in per_group if p[g]["accuracy"] is not None]
            means.append(float(np.mean(values)) if values else None)
        groups[name] = means
    first = runs[0]["results"]
    return {
        "dataset": first.get("dataset"),
        "seeds": seeds,
        "table": table,
        "aggregate": aggregate,
        "groups": groups,
        "group_names": [g["name"] for g in first["metrics"]["test"]["groups"]],
        "group_counts": first.get("data", {}).get("group_counts", []),
        "definitions": DEFINITIONS,
        "runs": [
            {
                "method": r["method"],
                "seed": r["seed"],
                "supervision": r["supervision"],
                "run_dir": str(r["run_dir"]),
                **{
                    k: 100 * r["results"]["metrics"]["test"][k]
                    for k in (*TABLE_METRICS, "accuracy")
                },
                "selection": r["results"]["selection"]["rule"],
                "wall_seconds": round(float(r["results"].get("wall_seconds") or 0.0), 1),
            }
            for r in runs
        ],
    }


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class RunPace:
    """Estimates the time left from the runs measured so far.

    A method measured in this comparison costs what its mean run cost; a method not yet run
    costs its prior (``priors``) scaled by how fast this machine ran the priors it has seen, or
    the mean run cost when there is no prior. None until something is known.
    """

    def __init__(self, priors: dict[str, float] | None = None) -> None:
        self.priors = dict(priors or {})
        self.measured: dict[str, list[float]] = {}

    def record(self, method: str, seconds: float) -> None:
        self.measured.setdefault(method, []).append(seconds)

    def _cost(self, method: str) -> float | None:
        if method in self.measured:
            return float(np.mean(self.measured[method]))
        seen = [m for m in self.measured if m in self.priors]
        speed = (
            sum(sum(self.measured[m]) for m in seen)
            / sum(self.priors[m] * len(self.measured[m]) for m in seen)
            if seen
            else 1.0
        )
        if method in self.priors:
            return self.priors[method] * speed
        every = [t for times in self.measured.values() for t in times]
        return float(np.mean(every)) if every else None

    def seconds_left(self, methods: list[str]) -> float | None:
        costs = [self._cost(m) for m in methods]
        return None if any(c is None for c in costs) else float(sum(costs))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no runs)"
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def compare(
    base: dict[str, Any],
    methods: list[str],
    seeds: list[int],
    out_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    command: str = "",
    log: Callable[[str], None] = print,
    estimate: dict[str, float] | None = None,
    variants: dict[str, tuple[str, list[str]]] | None = None,
    fingerprinted_dirs: bool = False,
    failures: list[str] | None = None,
    reports: bool = True,
    code: str | None = None,
    reuse_other_code: bool = False,
    on_trained: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Run every (method, seed) (skipping finished runs), then write the tables and report.

    ``base`` is a config mapping (a YAML file's content, or ``{}`` for the defaults).
    ``estimate`` (method -> seconds) seeds the time-left estimate before any run has finished
    (the demo passes its measured costs); afterwards the estimate follows the measured pace.
    ``variants``, ``fingerprinted_dirs``, ``code`` and ``reuse_other_code`` go to
    :func:`plan` (``unspur bench`` uses them). With a ``failures`` list, a run that
    refuses its data or options (an :class:`UnspurError`) is recorded there as
    ``"label seed k: reason"`` and left out of the table instead of stopping the
    comparison. ``reports=False`` writes no HTML. Every
    run that trains here leaves ``cost.json`` (wall and CPU seconds of this process), and
    ``on_trained`` (if given) is called with its folder at once, so what it records
    survives an interruption later in the comparison (the bench stamps the commit).
    Returns the summary written to ``comparison.json``.
    """
    from unspur.pipeline import run
    from unspur.report.html import write_compare_report, write_run_report
    from unspur.stages import changed_defaults, is_finished

    out_dir = Path(out_dir)
    runs = plan(
        base,
        methods,
        seeds,
        overrides or [],
        out_dir,
        variants,
        fingerprinted_dirs,
        code,
        reuse_other_code,
    )
    order = list(dict.fromkeys(name for name, *_ in runs))
    done = []
    elsewhere: list[Path] = []  # runs another process holds (a second bench on this folder)
    pace = RunPace(estimate)
    for i, (name, seed, config, run_dir) in enumerate(runs, 1):
        step = f"[{i}/{len(runs)}] {name} seed {seed}"
        reference = config.method.reference
        if reference and Path(reference).parent in elsewhere:
            log(f"{step}: its ERM run is training in another process; left for that process")
            elsewhere.append(run_dir)
            continue
        with exclusive_lock(lock_beside(run_dir)) as mine:
            if not mine:
                log(f"{step}: running in another process ({run_dir}); left for that process")
                elsewhere.append(run_dir)
                continue
            finished = is_finished(config, run_dir)
            if finished and not changed_defaults(config, run_dir):
                results = json.loads((run_dir / "results.json").read_text())
                log(f"{step}: finished earlier, skipped ({run_dir}){other_code(results)}")
            else:
                left = pace.seconds_left([n for n, *_ in runs[i - 1 :]])
                eta = f"; about {format_duration(left)} left in all" if left is not None else ""
                if not finished:  # else run() refuses the stale run and says why
                    log(f"{step}: running in {run_dir}{eta}")
                started, cpu = time.perf_counter(), time.process_time()
                try:
                    results = run(config, run_dir)
                except UnspurError as exc:
                    if failures is None:
                        raise
                    failures.append(f"{name} seed {seed}: {str(exc).splitlines()[0]}")
                    log(f"{step}: FAILED: {exc}")
                    continue
                wall = time.perf_counter() - started
                pace.record(name, wall)
                atomic_write_json(
                    run_dir / "cost.json",
                    {"wall_seconds": wall, "cpu_seconds": time.process_time() - cpu},
                )
                if on_trained is not None:
                    on_trained(run_dir)
                if reports:
                    write_run_report(run_dir, results)
        done.append(
            {
                "method": name,
                "seed": seed,
                "supervision": results["supervision"]["symbol"],
                "run_dir": run_dir,
                "results": results,
            }
        )
        if "test" not in results["metrics"]:
            raise ConfigError(f"{name} seed {seed}: the data has no test split to compare on")
    if elsewhere:
        log(
            f"{len(elsewhere)} run(s) were left to another process on {out_dir}; the tables "
            "below leave them out: rerun this command after it ends to include them"
        )
    if not done:
        reasons = (failures or []) + [f"{p} is running in another process" for p in elsewhere]
        raise UnspurError("no run finished: " + "; ".join(reasons))
    summary = summarise(done, order, seeds)
    summary["command"] = command
    out_dir.mkdir(parents=True, exist_ok=True)
    table_md = markdown_table(summary["table"])
    header = [
        "# unspur comparison",
        "",
        f"Dataset: {summary['dataset']}; seeds: {', '.join(map(str, seeds))}; test split, "
        "percentages, mean ± sample std (ddof = 1) over the n seeds; the last column is the "
        "worst-group accuracy minus ERM's, paired by seed, with a 95% Student-t interval.",
        "Supervision: x no group labels, ✓ validation group labels, ✓✓ training group labels.",
        "",
    ]
    if command:
        header += [f"Command: `{command}`", ""]
    other = [f"{r['method']} seed {r['seed']}" for r in done if other_code(r["results"])]
    if other:
        summary["runs_of_other_code"] = other
        header += [
            f"**{len(other)} run(s) trained by other code** than the installed version "
            f"({', '.join(other)}): this code may not give their numbers; delete their "
            "folders to train them again.",
            "",
        ]
    definitions = ["", "Definitions:", ""] + [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    atomic_write_text(
        out_dir / "comparison.md", "\n".join(header + [table_md] + definitions) + "\n"
    )
    atomic_write_text(out_dir / "comparison.csv", _csv(summary["table"]))
    atomic_write_text(out_dir / "runs.csv", _csv(summary["runs"]))
    atomic_write_json(out_dir / "comparison.json", summary)
    summary["markdown"] = table_md
    if reports:
        summary["report"] = str(write_compare_report(out_dir, summary))
    return summary
