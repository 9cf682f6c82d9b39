"""Helpers shared by the file readers: walking class/attribute folders, finding split
folders, a deterministic stratified split, and checking metadata paths and missing files.

Each benchmark reader is then only a mapping from its own names to ``(y, a)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from unspur.data.store import safe_join
from unspur.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# Folder names benchmarks use for their splits, mapped to the canonical names.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def require_root(root: Path | None, dataset: str) -> Path:
    """The dataset root as a directory, or an error saying what to pass."""
    if root is None:
        raise ConfigError(
            f"dataset {dataset!r} reads local files: pass the folder that holds them "
            "(--root DIR on the command line, or data.root in the config)"
        )
    root = Path(root)
    if not root.exists():
        raise DataError(f"{dataset}: data root {root} does not exist; check the path")
    if not root.is_dir():
        raise DataError(f"{dataset}: data root {root} is not a directory; pass its folder")
    return root


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(directory: Path) -> list[Path]:
    """Image files below ``directory`` (recursively), sorted so results are stable."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image(Path(f)))
    return sorted(found)


def relative(path: Path, root: Path) -> str:
    """``path`` as the POSIX path the table stores (relative to ``root``)."""
    return path.relative_to(root).as_posix()


def subdirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_split_dirs(base: Path) -> dict[str, Path]:
    """Split folders directly under ``base`` (``train``, ``val``/``valid``, ``test``)."""
    found: dict[str, Path] = {}
    for directory in subdirs(base):
        split = SPLIT_ALIASES.get(directory.name.lower())
        if split is not None and split not in found:
            found[split] = directory
    return found


def walk_class_attr(base: Path, root: Path) -> list[tuple[str, str, str]]:
    """Images in ``base/<class>/<attribute>/...`` as ``(filename, class, attribute)``.

    ``filename`` is relative to ``root`` (the store's root). Images deeper inside an
    attribute folder belong to it; images directly in a class folder are ignored.
    """
    records: list[tuple[str, str, str]] = []
    for class_dir in subdirs(base):
        for attr_dir in subdirs(class_dir):
            for path in list_images(attr_dir):
                records.append((relative(path, root), class_dir.name, attr_dir.name))
    return records


def name_index(
    found: Iterable[str], given: Sequence[str] | None, what: str, where: str
) -> dict[str, int]:
    """Map folder names to label indices: the order of ``given``, else sorted order."""
    found = sorted(set(found))
    if not given:
        return {name: i for i, name in enumerate(found)}
    index = {name: i for i, name in enumerate(given)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise DataError(
            f"{where}: {what} folder(s) {unknown} are not in the {what} names given "
            f"{list(given)}; add them to the {what}_names option or remove the folders"
        )
    return index


def check_relative(filename: str, where: str, root: Path) -> None:
    """Refuse a metadata path that is absolute or climbs out of the root.

    A lexical check (fast enough for 200k rows); :func:`safe_join` makes the error and
    FolderStore repeats the check on the resolved path when the image is opened.
    """
    path = PurePosixPath(filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", filename):
        try:
            safe_join(root, filename)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        raise DataError(
            f"{where}: path {filename!r} must be relative to the data root {root} "
            "without '..' components"
        )


def missing_files(root: Path, filenames: Iterable[str]) -> list[str]:
    """Table filenames with no file under ``root``, listing each folder only once."""
    listings: dict[str, set[str]] = {}
    missing: list[str] = []
    for name in filenames:
        parent, _, base = name.rpartition("/")
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(root / parent))
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = set()
        if base not in listings[parent]:
            missing.append(name)
    return missing


def raise_if_missing(dataset: str, root: Path, filenames: Iterable[str], hint: str) -> None:
    """A DataError with the count and first few missing images, if any are missing."""
    missing = missing_files(root, filenames)
    if missing:
        shown = ", ".join(missing[:5])
        raise DataError(
            f"{dataset}: {len(missing)} image file(s) listed in the metadata are missing "
            f"under {root} (first: {shown}). {hint} Pass check_files=false to skip this check."
        )


def check_fractions(val_fraction: float, test_fraction: float, dataset: str) -> None:
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"dataset {dataset!r}: {key}={value} must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"dataset {dataset!r}: val_fraction + test_fraction = "
            f"{val_fraction + test_fraction} leaves no training images; make them sum below 1"
        )


def assign_splits(
    frame: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    by: Sequence[str] = ("y", "a"),
) -> np.ndarray:
    """A deterministic split stratified by ``by``: the same seed gives the same split.

    Rows of each stratum are sorted by filename (so the listing order of the file system
    does not matter), shuffled with ``seed`` and cut into ``round(n * val_fraction)``
    val rows, ``round(n * test_fraction)`` test rows and the rest train.
    """
    split = np.full(len(frame), "train", dtype=object)
    rng = np.random.default_rng(seed)
    keys = np.full(len(frame), "", dtype=object)
    for column in by:
        keys = keys + "|" + frame[column].astype(str).to_numpy(dtype=object)
    keys = keys.astype(str)
    order = np.lexsort((frame["filename"].to_numpy(dtype=str), keys))
    sorted_keys = keys[order]
    for key in sorted(set(sorted_keys)):
        rows = order[sorted_keys == key]
        rows = rows[rng.permutation(len(rows))]
        n_val = int(round(len(rows) * val_fraction))
        n_test = int(round(len(rows) * test_fraction))
        split[rows[:n_val]] = "val"
        split[rows[n_val : n_val + n_test]] = "test"
    return split


def cell(where: str, row: int, column: str, first_line: int = 2) -> str:
    """Where a metadata cell is, for error messages: file, row, file line and column.

    ``first_line`` is the file line of the frame's first row (2 after a CSV header).
    """
    return f"{where}: row {row + 1} (line {row + first_line}), column {column!r}"


def reject_first(
    bad: pd.Series | np.ndarray,
    where: str,
    column: str,
    problem: Callable[[int], str],
    first_line: int = 2,
) -> None:
    """Raise a :class:`DataError` naming the first row where ``bad`` holds, if any.

    ``problem(row)`` says what is wrong with that row's value and how to fix it.
    """
    flags = np.asarray(bad, dtype=bool)
    if flags.any():
        row = int(np.flatnonzero(flags)[0])
        raise DataError(f"{cell(where, row, column, first_line)}: {problem(row)}")


def int_column(frame: pd.DataFrame, column: str, where: str, first_line: int = 2) -> pd.Series:
    """``frame[column]`` as integers; the error names the file line of the first bad value."""
    values = pd.to_numeric(frame[column], errors="coerce")
    reject_first(
        values.isna() | (values != values.round()),
        where,
        column,
        lambda row: f"{str(frame[column].iloc[row])!r} is not an integer label; fix that row",
        first_line,
    )
    return values.astype(np.int64)


def canonical_frame(records: list[tuple[str, int, int, str]]) -> pd.DataFrame:
    frame = pd.DataFrame(records, columns=["filename", "y", "a", "split"])
    return frame.astype({"y": np.int64, "a": np.int64})
