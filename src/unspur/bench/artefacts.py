"""Files a measurement makes for the results folder (sample grids), and how they get there.

A measurement returns numbers and words for the table; some things a reader needs are
images (what a generator drew). Such a measurement writes the file into the run
directory and returns it as an :class:`Artefact` column value. When the runner writes a
setting's table, :func:`publish` copies the artefact of each method's first seed into
the results folder as ``<setting>_<method>_seed<k>_<column>.<ext>`` (one file per
method keeps the folder small; the other seeds' files stay in their run directories)
and the table cell links to it. A grid an earlier invocation published for another seed of
the same method and column (a ``--seeds`` subset run first) is removed, so the folder
holds only the files its tables link. File names are made of ``[A-Za-z0-9._-]`` only, so a
label cannot reach outside the folder or into the markdown around it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Artefact:
    """A file a measurement made (in the run directory) for the results folder."""

    path: Path

    def __str__(self) -> str:  # never the run directory's (machine) path in a table
        return self.path.name


def safe_name(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._-]`` made ``_``."""
    return SAFE.sub("_", text).strip("._") or "file"


def publish(
    table: list[dict[str, Any]], run_rows: list[dict[str, Any]], out: Path, stem: str
) -> list[Path]:
    """Copy each method's first artefact per column into ``out``; rewrite the cells.

    Run rows: the copied file's name for the first seed of a method, ``"-"`` for the
    others. Table rows: a markdown link to that file. Returns the files written.
    """
    published: dict[tuple[str, str], str] = {}
    columns: set[str] = set()
    written = []
    for row in run_rows:
        for key, value in list(row.items()):
            if not isinstance(value, Artefact):
                continue
            columns.add(key)
            where = (str(row["method"]), key)
            if where in published or not value.path.is_file():
                row[key] = "-"
                continue
            name = safe_name(f"{stem}_{row['method']}_seed{row['seed']}_{key}")
            name += "." + safe_name(value.path.suffix[1:]) if value.path.suffix else ""
            out.mkdir(parents=True, exist_ok=True)
            _remove_other_seeds(out, name, str(row["seed"]))
            shutil.copyfile(value.path, out / name)
            written.append(out / name)
            published[where] = row[key] = name
    for entry in table:
        for key in columns & set(entry):
            name = published.get((str(entry["method"]), key))
            entry[key] = f"[{safe_name(key)}]({name})" if name is not None else "-"
    return written


def _remove_other_seeds(out: Path, name: str, seed: str) -> None:
    """Delete ``out``'s files named like ``name`` but for another seed (same setting,
    method and column): what an earlier ``--seeds`` subset invocation published."""
    head, _, tail = name.partition(f"_seed{seed}_")
    pattern = re.compile(re.escape(head) + r"_seed\d+_" + re.escape(tail))
    for path in out.iterdir():
        if path.name != name and pattern.fullmatch(path.name):
            path.unlink()
