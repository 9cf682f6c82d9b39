"""``unspur bench SUITE``: every (setting, variant, seed) of a suite, one table per setting.

Each setting is an ``unspur compare`` (:func:`unspur.compare.compare`): ERM first, methods
that start from a reference model reuse that seed's ERM run, mean ± sample std with n and
the paired difference to ERM come from the same code. Runs live in
``WORK/<setting>/<label>/seed<k>-<run fingerprint>``, so a rerun skips every finished
run, and a changed suite reruns exactly the runs whose config it changes (a changed ERM
changes the reference path of the runs that reuse it, so they rerun too); directories of
older configs stay until deleted.

Writes ``OUT/<setting>.md`` (provenance, the table, every run), ``OUT/<setting>.csv``
(the table), ``OUT/<setting>_runs.csv`` (one row per run) and ``OUT/provenance.json``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unspur.bench.artefacts import publish
from unspur.bench.assets import asset_folder, build_asset, relation
from unspur.bench.measurements import measure
from unspur.bench.provenance import (
    Clock,
    code_state,
    machine_paths,
    provenance,
    provenance_lines,
    trained_at,
)
from unspur.bench.suite import (
    ASSET_REF,
    SHARED_REF,
    Suite,
    load_suite,
    oracle_mark,
    pipeline_symbol,
)
from unspur.code_version import code_version
from unspur.compare import (
    COLUMN,
    DIFF_COLUMN,
    TABLE_METRICS,
    compare,
    label_of,
    markdown_table,
    plan,
)
from unspur.config import RunConfig, apply_overrides
from unspur.errors import ConfigError, UnspurError
from unspur.io import atomic_write_json, atomic_write_text
from unspur.train.loop import apply_threads

SUPERVISION = "supervision (pipeline)"
#: Seeds a table should have where the CPU allows it (issue 19); fewer are explained.
SEEDS_WANTED = 5
ORACLE = "oracle input"


def default_out(suite_path: Path, name: str) -> Path:
    """``bench/results/<suite>`` beside a ``bench/suites/`` file, else ``bench-results/<suite>``."""
    if suite_path.parent.name == "suites":
        return suite_path.parent.parent / "results" / name
    return Path("bench-results") / name


def bench_outputs(suite_path: Path, name: str, out: Path) -> Path:
    """What the checkout's changed-file count leaves out: the results root
    (``bench/results``) when the tables go to their default folder, since every suite's
    tables there are outputs of the bench, not code (a table another suite wrote in the
    same checkout made every later table say "13 files differed"); else ``out``."""
    default = default_out(suite_path, name)
    return default.parent if out.resolve() == default.resolve() else out


def substitute(
    overrides: list[str], folders: dict[str, Path], shared: Path | None = None
) -> list[str]:
    """``overrides`` with every ``{asset:NAME}`` replaced by that asset's folder and
    ``{shared}`` by the setting's folder for what its runs share (:data:`SHARED_REF`).
    A reference to an asset not in ``folders`` stays as it is: no method of this
    invocation receives it (a setting-level ``method.options`` that only the setting's
    base method reads, while ``methods:`` lists ERM alone), so the asset is not built."""

    def folder(match: re.Match) -> str:
        found = folders.get(match.group(1))
        return match.group(0) if found is None else str(found)

    out = [ASSET_REF.sub(folder, o) for o in overrides]
    if shared is not None:
        out = [o.replace(SHARED_REF, str(shared)) for o in out]
    return out


def shared_folder(setting_work: Path) -> Path:
    """``WORK/<setting>/shared``: what the runs of one setting share (a method's
    ``shared_cache``), next to their run folders."""
    return setting_work / "shared"


def setting_base(
    suite: Suite,
    name: str,
    data_dir: Path | None,
    threads: int | None,
    folders: dict[str, Path] | None = None,
    shared: Path | None = None,
) -> tuple[dict, list[str]]:
    """The config mapping every method of a setting starts from, and the setting's
    ``LABEL:key=value`` overrides for one method or variant (``ffr:method.options.x=1``)."""
    setting = suite.settings[name]
    overrides = [*suite.overrides, *setting.overrides, "train.progress=false"]
    overrides = substitute(overrides, folders or {}, shared)
    per_label = [o for o in overrides if label_of(o) in suite.variants]
    overrides = [o for o in overrides if o not in per_label]
    if threads is not None:
        overrides.append(f"train.threads={threads}")
    for asset_name in [setting.root, *setting.uses]:
        if asset_name is None or suite.assets[asset_name].build:
            continue
        asset = suite.assets[asset_name]
        if data_dir is None:
            raise ConfigError(
                f"setting {name!r} of suite {suite.path} reads asset {asset_name!r} "
                f"({asset.path}); pass --data-dir, e.g. --data-dir ../shared/data"
            )
        if not (data_dir / asset.path).exists():
            raise ConfigError(
                f"setting {name!r} of suite {suite.path} reads asset {asset_name!r}, but "
                f"{data_dir / asset.path} does not exist; check --data-dir"
            )
    if setting.root is not None:
        overrides.append(f"data.root={data_dir / suite.assets[setting.root].path}")
    start = {}
    if setting.config is not None:
        from unspur.config import read_yaml_mapping

        start = read_yaml_mapping(suite.root / setting.config)
    try:
        return apply_overrides(start, overrides), per_label
    except ConfigError as exc:
        raise ConfigError(f"suite {suite.path}: settings.{name}: {exc}") from None


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _aggregate(values: list[Any]) -> str:
    """Numbers: mean ± sample std (ddof = 1) over seeds; anything else: the distinct values."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        array = np.asarray(present, dtype=np.float64)
        mean = float(array.mean())
        digits = 3 if abs(mean) < 10 else 1
        if array.size == 1:
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {float(array.std(ddof=1)):.{digits}f}"
    return ", ".join(dict.fromkeys(_format(v) for v in present))


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _checked(text: str, path: Path) -> str:
    found = machine_paths(text)
    if found:  # a bug of ours, never the user's input: nothing absolute goes in a table
        raise AssertionError(f"{path} would hold an absolute machine path: {found[0]}")
    return text


def variants_with(
    suite: Suite, folders: dict[str, Path], shared: Path | None = None
) -> dict[str, tuple[str, list[str]]]:
    """The suite's variants for :func:`unspur.compare.plan`, references resolved."""
    variants = suite.compare_variants().items()
    return {k: (m, substitute(o, folders, shared)) for k, (m, o) in variants}


def run_setting(
    suite: Suite,
    name: str,
    base: tuple[dict, list[str]],
    seeds: list[int],
    work: Path,
    log: Callable[[str], None],
    folders: dict[str, Path] | None = None,
    code: dict[str, Any] | None = None,
    reuse_other_code: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Run (or find finished) one setting; returns (table rows, run rows, failures).
    ``code``: the checkout's state, stamped into each run this call trains
    (:func:`~unspur.bench.provenance.trained_at`); its ``code_version`` names the run
    folders (:func:`~unspur.compare.plan`)."""
    variants = variants_with(suite, folders or {}, shared_folder(work))
    base, per_label = base
    version = (code or {}).get("code_version")
    configs: dict[tuple[str, int], RunConfig] = {
        (label, seed): config
        for label, seed, config, _ in plan(
            base,
            suite.labels_of(name),
            seeds,
            per_label,
            work,
            variants,
            True,
            version,
            reuse_other_code,
        )
    }
    failures: list[str] = []
    before = {p for p in work.glob("*/seed*/results.json")} if work.exists() else set()
    summary = compare(
        base,
        suite.labels_of(name),
        seeds,
        work,
        per_label,
        command="",
        log=log,
        variants=variants,
        fingerprinted_dirs=True,
        failures=failures,
        reports=False,
        code=version,
        reuse_other_code=reuse_other_code,
        # stamped as each run finishes: an invocation stopped before its table is written
        # (a session's end) still leaves every finished run's commit on record
        on_trained=(lambda run_dir: trained_at(run_dir, code)) if code is not None else None,
    )
    measured: dict[str, list[dict[str, Any]]] = {}
    run_rows = []
    for r in summary["runs"]:
        run_dir = Path(r["run_dir"])
        results = json.loads((run_dir / "results.json").read_text())
        assets = {n: str(folders[n]) for n in suite.assets_of(name, r["method"])
                  if n in (folders or {})}  # fmt: skip
        columns = measure(suite.measurements, run_dir, {**results, "bench_assets": assets})
        cost = run_dir / "cost.json"
        cpu = json.loads(cost.read_text()).get("cpu_seconds") if cost.is_file() else None
        skipped = (run_dir / "results.json") in before  # found finished, not trained now
        config = configs[(r["method"], r["seed"])]
        variant = suite.variants.get(r["method"])
        measured.setdefault(r["method"], []).append(columns)
        run_rows.append(
            {
                "setting": name,
                "method": r["method"],
                SUPERVISION: pipeline_symbol(
                    r["supervision"], suite.asset_supervision(name, r["method"])
                ),
                ORACLE: (oracle_mark(variant, config) if variant else "") or "-",
                "seed": r["seed"],
                **{k: f"{r[k]:.1f}" for k in (*TABLE_METRICS, "accuracy")},
                "selection": r["selection"],
                "run": f"{run_dir.parent.name}/{run_dir.name}",
                "_skipped": skipped,
                "_trained_at": trained_at(run_dir, None),  # stamped by on_trained above
                "_other_code": bool(version) and not run_dir.name.endswith(f"-{version}"),
                "_cpu": cpu,
                "_threads": results.get("threads"),
                "_wall": results.get("wall_seconds"),
                **columns,
            }
        )
    table = []
    for row in summary["table"]:
        label = row["method"]
        first = next(r for r in run_rows if r["method"] == label)
        entry = {
            "method": label,
            SUPERVISION: first[SUPERVISION],
            ORACLE: first[ORACLE],
            **{COLUMN[k]: row[COLUMN[k]] for k in TABLE_METRICS},
            "n": row["n"],
        }
        if DIFF_COLUMN in row:
            entry[DIFF_COLUMN] = row[DIFF_COLUMN]
        keys = list(dict.fromkeys(k for m in measured[label] for k in m))
        for key in keys:
            entry[key] = _aggregate([m.get(key) for m in measured[label]])
        table.append(entry)
    return table, run_rows, failures


def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            k: (_format(v) if isinstance(v, float) or v is None else v)
            for k, v in r.items()
            if k[0] != "_"
        }  # fmt: skip
        for r in rows
    ]


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "-") for k in keys} for r in rows]


def asset_lines(
    suite: Suite, name: str, records: dict[str, dict[str, Any]], base: dict[str, Any]
) -> list[str]:
    """One paragraph per asset the setting reads: what it is and, for a built one, its
    provenance record and how its data relates to the setting's."""
    lines = []
    labels = suite.labels_of(name)
    used = list(dict.fromkeys(n for label in labels for n in suite.assets_of(name, label)))
    for asset_name in used:
        asset = suite.assets[asset_name]
        if not asset.build:
            lines.append(f"- `{asset_name}`: `{asset.path}` under the data directory"
                         f"{': ' + asset.what if asset.what else ''}; labels: {asset.labels}")  # fmt: skip
            continue
        r = records[asset_name]
        groups = ", ".join(f"{g} {n}" for g, n in r["data"]["per group"].items())
        cost = r["cost"]
        step = cost.get("resumed_from_step")
        resumed = f", of the steps after {step} only (resumed from a checkpoint)" if step else ""
        lines.append(
            f"- `{asset_name}`: {r['build']} built by this suite"
            f"{' (' + asset.what + ')' if asset.what else ''} from "
            f"`{' '.join(r['data']['overrides'])}`, its {r['data']['split']} split: "
            f"{r['data']['images']} images ({groups}); "
            f"{relation(asset.data, base)}. Labels seen: "
            f"{r['labels']} (captions `{r['captions']}`); seed {r['seed']}; steps "
            + ", ".join(f"{k} {v}" for k, v in r["steps"].items())
            + f"; cost {cost['wall_seconds']} s wall, {cost['cpu_seconds']} s CPU"
            + (f", {cost['threads']} thread(s)" if "threads" in cost else "")
            + resumed
            + f" (built {cost['built']}"
            + _built_by(cost.get("code_version"))
            + ")."
        )
    return lines


def _built_by(version: str | None) -> str:
    """Whether an asset was built by this code (its folder is found by its spec alone)."""
    if version == code_version():
        return ", by this code"
    return f", **by other code** ({version or 'not recorded'}: delete its folder to rebuild)"


def seed_lines(suite: Suite, seeds: list[int]) -> list[str]:
    """Why there are fewer than :data:`SEEDS_WANTED` seeds, when there are."""
    if seeds != suite.seeds:
        return ["", f"Seeds: {len(seeds)} chosen on the command line (--seeds); the suite "
                f"names {len(suite.seeds)}."]  # fmt: skip
    if suite.seeds_note:
        return ["", f"Seeds: {suite.seeds_note}"]
    if len(seeds) < SEEDS_WANTED:
        return ["", f"Seeds: {len(seeds)}, fewer than {SEEDS_WANTED}; the suite gives no reason."]
    return []


def write_setting(
    suite: Suite,
    name: str,
    out: Path,
    table: list[dict[str, Any]],
    run_rows: list[dict[str, Any]],
    failures: list[str],
    record: dict[str, Any],
    seeds: list[int],
    assets: list[str] | None = None,
) -> Path:
    """``OUT/<setting>.md``, ``.csv`` and ``_runs.csv``; returns the markdown path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    publish(table, run_rows, out, stem)  # files a measurement made (sample grids)
    setting = suite.settings[name]
    lines = [
        f"# {suite.name}: {name}",
        "",
        *([suite.description, ""] if suite.description else []),
        *provenance_lines(record),
        "",
        f"Setting `{name}`: "
        + (f"`{setting.config}` with " if setting.config else "")
        + f"`{' '.join([*suite.overrides, *setting.overrides])}`"
        + (
            f" (data.root: `{suite.assets[setting.root].path}` under the data directory)"
            if setting.root
            else ""
        ),  # fmt: skip
        *([f"{setting.note}"] if setting.note else []),
        "",
        f"Test split, percentages, mean ± sample std (ddof = 1) over the n seeds "
        f"({', '.join(map(str, seeds))}); `{DIFF_COLUMN}`: worst-group accuracy minus ERM's "
        "of the same seed, mean with a 95% Student-t interval. Supervision of the whole "
        "pipeline (method, and any generator or asset it used): x no group labels, "
        "✓ validation group labels, ✓✓ training group labels. `oracle input`: what the run "
        "was given that a user would not have (e.g. exact object masks); such a row is a "
        "diagnostic, not a method. Model selection follows each method's own rule on the "
        "validation split (the `selection` column below); no choice was made on test.",
        *seed_lines(suite, seeds),
        "",
        markdown_table(_uniform(table)),
        "",
    ]
    notes = [f"- `{v.label}` = `{v.method}` "
             + (f"with `{' '.join(v.overrides)}`" if v.overrides else "as it stands")
             + (f": {v.note}" if v.note else "")
             for v in suite.variants.values() if v.label in suite.labels_of(name)]  # fmt: skip
    lines += ["## Methods", "", *notes, ""]
    if assets:
        lines += ["## Assets", "", *assets, ""]
    if suite.notes:
        lines += ["## Notes", "", suite.notes.strip(), ""]
    if failures:
        lines += ["## Runs that did not complete", "", *[f"- {f}" for f in failures], ""]
    lines += ["## Every run", "", markdown_table(_uniform(_public(run_rows))), ""]
    md = out / f"{stem}.md"
    atomic_write_text(md, _checked("\n".join(lines), md))
    atomic_write_text(out / f"{stem}.csv", _checked(_csv_text(_uniform(table)), md))
    atomic_write_text(out / f"{stem}_runs.csv", _checked(_csv_text(_public(run_rows)), md))
    return md


def run_suite(
    suite_path: str | Path,
    data_dir: str | Path | None = None,
    *,
    out: str | Path | None = None,
    work: str | Path | None = None,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    threads: int | None = None,
    check: bool = False,
    check_data: bool = True,
    reuse_other_code: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run a suite (resuming) and write its tables; returns the markdown files written.

    Run folders carry the code version (:mod:`unspur.code_version`): after a change of
    code every run trains again. ``reuse_other_code`` takes a finished run of the same
    config under other code instead (the tables say how many, and the command says so).

    ``check``: only read the suite, build every run's config and (``check_data``) read
    every setting's data as its first seed would (errors as for a real run); train
    nothing, write nothing."""
    clock = Clock()
    suite_path = Path(suite_path)
    suite = load_suite(suite_path)
    data_dir = Path(data_dir) if data_dir is not None else None
    seeds = seeds or suite.seeds
    names = only or list(suite.settings)
    for name in names:
        if name not in suite.settings:
            from unspur.errors import did_you_mean

            raise ConfigError(
                f"--only names setting {name!r}, which suite {suite_path} does not have"
                f"{did_you_mean(name, suite.settings)}; settings: {', '.join(suite.settings)}"
            )
    out = Path(out) if out is not None else default_out(suite_path, suite.name)
    work = Path(work) if work is not None else Path("runs") / "bench" / suite.name
    # Every setting's data and every variant's config are checked before anything trains.
    built = {n for name in names for label in suite.labels_of(name)
             for n in suite.assets_of(name, label)}  # fmt: skip
    built = [n for n in suite.assets if n in built and suite.assets[n].build]
    folders = {
        n: asset_folder(
            n, suite.assets[n].data, suite.assets[n].seed, suite.assets[n].options, work
        )
        for n in built
    }
    for n in suite.assets:  # a dataset folder named by {asset:NAME} in an override
        if n not in folders and data_dir is not None and suite.assets[n].path is not None:
            folders[n] = data_dir / str(suite.assets[n].path)
    version = code_version()
    bases = {
        name: setting_base(suite, name, data_dir, threads, folders, shared_folder(work / name))
        for name in names
    }
    for name, (base, per_label) in bases.items():
        try:
            plan(
                base,
                suite.labels_of(name),
                seeds,
                per_label,
                work / name,
                variants_with(suite, folders, shared_folder(work / name)),
                True,
                version,
                reuse_other_code,
            )
        except UnspurError as exc:
            raise ConfigError(f"suite {suite_path}: setting {name!r}: {exc}") from None
    if check and check_data:
        from unspur.config import config_from_dict
        from unspur.pipeline import prepare_table

        for name, (base, _) in bases.items():
            try:
                prepare_table(config_from_dict({**base, "seed": seeds[0]}))
            except UnspurError as exc:
                raise ConfigError(f"suite {suite_path}: setting {name!r}: {exc}") from None
    if check:
        runs = sum(len(suite.labels_of(name)) for name in names) * len(seeds)
        log(f"{suite_path}: {len(names)} setting(s), {runs} run(s) over {len(seeds)} "
            f"seed(s): every config is valid")  # fmt: skip
        return []
    extra = []
    if seeds != suite.seeds:
        extra += ["--seeds", ",".join(map(str, seeds))]
    if only:
        extra += ["--only", ",".join(only)]
    if threads is not None:
        extra += ["--threads", str(threads)]
        apply_threads(threads)  # assets train too: the same threads as the runs
    if reuse_other_code:
        extra += ["--reuse-other-code"]
    written, everything, records = [], {}, {}
    for asset in built:
        spec = suite.assets[asset]
        folder, records[asset] = build_asset(asset, spec, work, log, folders)
        assert folder == folders[asset]
    outputs = bench_outputs(suite_path, suite.name, out)
    code = {**code_state(suite_path, outputs), "code_version": version}
    for name in names:
        log(f"== {suite.name}: setting {name} (code version {version})")
        everything[name] = run_setting(
            suite, name, bases[name], seeds, work / name, log, folders, code, reuse_other_code
        )
    out.mkdir(parents=True, exist_ok=True)
    all_runs = [
        {
            "skipped": r["_skipped"],
            "trained_at": r["_trained_at"],
            "other_code": r["_other_code"],
            "cpu_seconds": r["_cpu"],
            "threads": r["_threads"],
            "wall_seconds": r["_wall"],
        }
        for table, run_rows, _ in everything.values()
        for r in run_rows
    ]
    record = provenance(suite_path, extra, clock, all_runs, outputs)
    for name, (table, run_rows, failures) in everything.items():
        assets = asset_lines(suite, name, records, bases[name][0])
        written.append(
            write_setting(suite, name, out, table, run_rows, failures, record, seeds, assets)
        )
    atomic_write_json(
        out / "provenance.json",
        merged_provenance(out / "provenance.json", suite, names, record, records),
    )
    return written


def _legacy_settings(previous: dict[str, Any], suite: Suite) -> dict[str, Any]:
    """The per-setting records of a ``provenance.json`` written before it kept them: its
    one top-level record stands for the settings its command's ``--only`` named (every
    setting without ``--only``)."""
    words = str(previous.get("command", "")).split()
    named = list(suite.settings)
    if "--only" in words[:-1]:
        named = words[words.index("--only") + 1].split(",")
    record = {k: v for k, v in previous.items() if k not in ("suite", "settings")}
    return {name: record for name in named if name in suite.settings}


def merged_provenance(
    path: Path, suite: Suite, names: list[str], record: dict[str, Any], records: dict[str, Any]
) -> dict[str, Any]:
    """``provenance.json``: this invocation's record at the top level, and under
    ``settings`` the record of the invocation that last wrote each setting's table, so
    that settings regenerated by separate ``--only`` invocations each keep theirs."""
    settings: dict[str, Any] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # an unreadable record is rewritten whole
            previous = {}
        if isinstance(previous, dict) and previous.get("suite") == suite.name:
            kept = previous.get("settings") or _legacy_settings(previous, suite)
            settings = {k: v for k, v in kept.items() if k in suite.settings and k not in names}
    for name in names:
        used = {
            n: records[n]
            for n in records
            if any(n in suite.assets_of(name, label) for label in suite.labels_of(name))
        }
        settings[name] = {**record, "assets": used}
    ordered = {name: settings[name] for name in suite.settings if name in settings}
    return {"suite": suite.name, **record, "assets": records, "settings": ordered}
