"""Where a benchmark table came from: command, commit, libraries, threads, cost, machine.

Every results file the bench writes starts with this record, so a reader can regenerate
it from a fresh clone with ``../shared`` beside it. Paths in it are relative (the
repository's own paths and the data directory's), never a machine's absolute path:
:func:`machine_paths` finds those, and the bench's test runs it over every committed file.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unspur.io import atomic_write_json

#: An absolute path of one machine: what a results file or a script must not hold.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|root|home|work|Users|mnt|scratch)/")
#: The data directory the regenerating command names: ``../shared/data`` beside the clone.
DATA_DIR = "../shared/data"


def machine_paths(text: str) -> list[str]:
    """The lines of ``text`` that hold an absolute machine path (``/tmp/...``, ``/work/...``)."""
    return [line.strip() for line in text.splitlines() if MACHINE_PATH.search(line)]


def repo_root(start: Path) -> Path | None:
    """The git work tree holding ``start``, or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=start if start.is_dir() else start.parent,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def git_state(root: Path | None, outputs: Path | None = None) -> dict[str, Any]:
    """HEAD's commit and how many tracked files differ from it (0: a clean checkout).

    Files under ``outputs`` (the suite's results folder) are not counted: the bench
    writes them itself, so an earlier ``--only`` invocation's tables are not a change to
    the code that made this one.
    """
    if root is None:
        return {"commit": "unknown (not a git checkout)", "changed_files": None}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=60
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip() or "unknown"
        # One path per changed tracked file, relative to the root (``-z``: no quoting).
        changed = git("diff", "HEAD", "--name-only", "-z").split("\0")
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "changed_files": None}
    changed = [path for path in changed if path]
    if outputs is not None and outputs.resolve().is_relative_to(root.resolve()):
        folder = outputs.resolve().relative_to(root.resolve()).as_posix() + "/"
        changed = [path for path in changed if not path.startswith(folder)]
    return {"commit": commit, "changed_files": len(changed)}


#: A run folder's record of the checkout that trained it (written by the bench).
TRAINED_AT = "trained_at.json"


def code_state(suite: Path, outputs: Path | None = None) -> dict[str, Any]:
    """The checkout's commit and changed files now (:func:`git_state` of the suite's
    repository), for the runs this invocation trains."""
    return git_state(repo_root(suite.resolve()), outputs)


def trained_at(run_dir: Path, code: dict[str, Any] | None) -> str:
    """The commit that trained ``run_dir``'s run, short (``+N changed`` for a dirty
    checkout); ``code`` given: the run was trained just now, so it is recorded first.
    Run folders are named by config fingerprint and code version, so only
    ``--reuse-other-code`` (or an unknown stamp) lets a table hold runs of several
    commits: the table says which."""
    stamp = run_dir / TRAINED_AT
    if code is not None and not stamp.is_file():
        atomic_write_json(stamp, code)
    try:
        record = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return "unknown"
    changed = record.get("changed_files")
    commit = str(record.get("commit", "unknown"))[:7]
    return commit + (f" +{changed} changed" if changed else "")


def machine() -> dict[str, Any]:
    """Platform, processor and how many cores there are and this process may use."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "usable cores": usable,
    }


def relative_command(suite: Path, root: Path | None, extra: list[str]) -> str:
    """``unspur bench <suite> --data-dir ../shared/data ...`` as run from the clone's root."""
    shown = suite.name
    if root is not None:
        try:
            shown = suite.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return shlex.join(["unspur", "bench", shown, "--data-dir", DATA_DIR, *extra])


@dataclass
class Clock:
    """Wall and CPU seconds since it was made (this process and its children)."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=lambda: Clock.cpu_now())

    @staticmethod
    def cpu_now() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def elapsed(self) -> dict[str, float]:
        return {
            "wall_seconds": round(time.perf_counter() - self.wall, 1),
            "cpu_seconds": round(self.cpu_now() - self.cpu, 1),
        }


def provenance(
    suite: Path,
    extra_args: list[str],
    clock: Clock,
    runs: list[dict[str, Any]],
    outputs: Path | None = None,
) -> dict[str, Any]:
    """The record every results file of a suite carries (``outputs``: its results
    folder, whose own files do not count as a changed checkout).

    ``runs``: the table's runs, each with ``wall_seconds``, ``cpu_seconds`` (None when
    unknown), ``threads`` and ``skipped`` (found finished, not trained by this call).
    """
    import torch

    from unspur.pipeline import library_versions

    root = repo_root(suite.resolve())
    trained = [r for r in runs if not r["skipped"]]
    commits = Counter(r.get("trained_at", "unknown") for r in runs)
    other_code = sum(bool(r.get("other_code")) for r in runs)
    cpu = [r["cpu_seconds"] for r in runs if r["cpu_seconds"] is not None]
    return {
        "command": relative_command(suite, root, extra_args),
        "git": git_state(root, outputs),
        "versions": library_versions(),
        "threads": {
            "bench process": torch.get_num_threads(),
            "runs": sorted({r["threads"] for r in runs if r["threads"] is not None}),
        },
        "cost": {
            "runs": len(runs),
            "trained by this invocation": len(trained),
            "run wall seconds (sum)": round(sum(r["wall_seconds"] or 0.0 for r in runs), 1),
            "run CPU seconds (sum, known runs)": round(sum(cpu), 1),
            "runs with known CPU seconds": len(cpu),
            "this invocation": clock.elapsed(),
        },
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs trained at": dict(sorted(commits.items())),
        "runs of other code": other_code,
    }


def provenance_lines(record: dict[str, Any]) -> list[str]:
    """The record as the markdown lines at the top of a table."""
    git = record["git"]
    changed = git["changed_files"]
    state = (
        "clean checkout"
        if changed == 0
        else f"{changed} tracked file(s) differed from it"
        if changed
        else "state unknown"
    )
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    threads = record["threads"]
    cost = record["cost"]
    call = cost["this invocation"]
    m = record["machine"]
    return [
        f"Regenerate (from a fresh clone's root, `pip install -e .`, `../shared` beside it): "
        f"`{record['command']}`",
        "",
        f"- commit: `{git['commit']}` ({state})",
        f"- libraries: {versions}",
        f"- threads: {threads['bench process']} in the bench process; runs: "
        f"{', '.join(map(str, threads['runs'])) or 'unknown'}",
        f"- cost: {cost['runs']} runs ({cost['trained by this invocation']} trained by the "
        f"invocation that wrote this file, the rest found finished); run wall time "
        f"{cost['run wall seconds (sum)']} s in all, run CPU time "
        f"{cost['run CPU seconds (sum, known runs)']} s ({cost['runs with known CPU seconds']} "
        f"runs measured); this invocation {call['wall_seconds']} s wall, "
        f"{call['cpu_seconds']} s CPU",
        f"- machine: {m['platform']} ({m['machine']}, processor {m['processor']}), "
        f"{m['cores']} cores, {m['usable cores']} usable by the process",
        f"- written: {record['date']}",
        *trained_at_line(record),
    ]


def trained_at_line(record: dict[str, Any]) -> list[str]:
    """Which commits trained the table's runs ("unknown": before the bench recorded it)."""
    commits = record.get("runs trained at")
    if not commits:
        return []
    parts = [f"`{c}` ({n})" if c != "unknown" else f"unknown ({n}: trained before the bench "
             "recorded commits, by an invocation stopped before its table (stamps were "
             "written with the table until 2026-12-08), or outside a git checkout; a run "
             "folder's name still carries its code version)"
             for c, n in commits.items()]  # fmt: skip
    lines = [f"- runs trained at: {', '.join(parts)}"]
    other = record.get("runs of other code")
    if other:
        lines.append(
            f"- **{other} run(s) trained by other code** than this commit's (taken with "
            "`--reuse-other-code`): this commit may not give their numbers"
        )
    return lines
