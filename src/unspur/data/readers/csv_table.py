"""``csv``: a dataset described by a canonical ``filename,y,a,split`` CSV.

The format to use for a benchmark without a reader of its own: one row per image,
``filename`` relative to the data root, integer labels ``y`` and ``a``, ``split`` one of
train/val/test, and optionally ``mask`` (a mask image, relative to the root) and
``source`` (real or synthetic). Other columns are kept as provenance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from unspur.data.layout import (
    cell,
    check_relative,
    int_column,
    raise_if_missing,
    reject_first,
    require_root,
)
from unspur.data.registry import reader
from unspur.data.store import FolderStore, safe_join
from unspur.data.table import REQUIRED_COLUMNS, SPLITS, GroupTable
from unspur.errors import DataError

SOURCES = ("real", "synthetic")


def _names(given: list[str] | None, labels: pd.Series, prefix: str, option: str, where: str):
    """The label names: ``given``, else ``prefix0..prefixK`` up to the largest label."""
    if given:
        if len(labels) and int(labels.max()) >= len(given):
            row = int(np.flatnonzero((labels >= len(given)).to_numpy())[0])
            raise DataError(
                f"{where}: row {row + 1} (line {row + 2}) has label {int(labels.iloc[row])} but "
                f"{option} lists only {len(given)} name(s) {given}; add names or fix the row"
            )
        return list(given)
    top = int(labels.max()) if len(labels) else 0
    return [f"{prefix}{i}" for i in range(top + 1)]


@reader("csv")
def read_csv_table(
    root: Path,
    csv: str = "metadata.csv",
    class_names: list[str] | None = None,
    attr_names: list[str] | None = None,
    check_files: bool = True,
) -> GroupTable:
    """Read ``root/<csv>`` with columns ``filename,y,a,split`` (+ ``mask``, ``source``).

    ``class_names``/``attr_names`` name the labels in order (comma lists on the command
    line); without them the names are ``class0..`` / ``attr0..`` up to the largest
    label. ``check_files`` checks that every listed image exists under ``root``.
    """
    root = require_root(root, "csv")
    path = safe_join(root, csv)
    if not path.is_file():
        raise DataError(
            f"csv: metadata file {path} not found; write a CSV with columns "
            f"{','.join(REQUIRED_COLUMNS)} there, or point csv= at it (relative to {root})"
        )
    where = str(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot parse as CSV ({exc}); fix the file") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; the header must include "
            f"{','.join(REQUIRED_COLUMNS)} (found {list(frame.columns)})"
        )
    if frame.empty:
        raise DataError(f"{where}: has a header but no rows; list one image per row")

    for column in ("filename", "split"):
        frame[column] = frame[column].str.strip()
    reject_first(
        frame["filename"] == "",
        where,
        "filename",
        lambda row: "empty; give the image path relative to the root",
    )
    for row, name in enumerate(frame["filename"]):
        check_relative(name, cell(where, row, "filename"), root)

    frame["y"] = int_column(frame, "y", where)
    frame["a"] = int_column(frame, "a", where)
    for column in ("y", "a"):
        reject_first(
            frame[column] < 0,
            where,
            column,
            lambda row, c=column: f"{frame[c].iloc[row]} is negative; labels start at 0",
        )
    reject_first(
        ~frame["split"].isin(SPLITS),
        where,
        "split",
        lambda row: f"{frame['split'].iloc[row]!r} is not one of {'/'.join(SPLITS)}; rename it",
    )
    if "source" in frame.columns:
        frame["source"] = frame["source"].str.strip().replace("", "real")
        reject_first(
            ~frame["source"].isin(SOURCES),
            where,
            "source",
            lambda row: f"{frame['source'].iloc[row]!r} is not one of {'/'.join(SOURCES)}",
        )
    mask_store = None
    if "mask" in frame.columns:
        frame["mask"] = frame["mask"].str.strip()
        for row, name in enumerate(frame["mask"]):
            if name:
                check_relative(name, cell(where, row, "mask"), root)
        mask_store = FolderStore(root)

    classes = _names(class_names, frame["y"], "class", "class_names", where)
    attrs = _names(attr_names, frame["a"], "attr", "attr_names", where)
    if check_files:
        hint = f"Check that filenames in {path.name} are relative to {root}."
        raise_if_missing("csv", root, frame["filename"], hint)
        if "mask" in frame.columns:
            masks = frame.loc[frame["mask"] != "", "mask"]
            raise_if_missing("csv (masks)", root, masks, hint)
    return GroupTable(
        frame=frame,
        store=FolderStore(root),
        class_names=classes,
        attr_names=attrs,
        name=root.name or "csv",
        mask_store=mask_store,
        info={"root": str(root), "csv": str(path)},
    )
