"""``csv``: a dataset described by a canonical ``filename,y,a,split`` CSV.

The format to use for a benchmark without a reader of its own: one row per image,
``filename`` relative to the data root, integer labels ``y`` and ``a``, ``split`` one of
train/val/test or the codes 0/1/2 (0 = train, 1 = val, 2 = test: the convention of the
group_DRO, WILDS and SpuCo metadata files, so their CSVs read unchanged), and optionally
``mask`` (a mask image, relative to the root) and ``source`` (real or synthetic). Other
columns are kept as provenance.

The metadata file itself may live anywhere (``csv=`` is relative to the root, or an
absolute path); only the image and mask paths *in* it must stay inside the root.

A typo in a label must not become a class. With ``class_names`` a label beyond the
names is refused; without them the classes are ``0..max(y)`` and every one needs
training images, so ``y=5`` among 0/1 labels is refused with its row instead of making
six classes; likewise attributes ``0..max(a)`` must each occur in some row. Our choice:
a class or attribute with a gap cannot be learned or scored per group, and it is
almost always a typo.
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
from unspur.data.store import FolderStore
from unspur.data.table import REQUIRED_COLUMNS, SPLITS, GroupTable
from unspur.errors import DataError

SOURCES = ("real", "synthetic")
#: Numeric split codes of the group_DRO / WILDS / SpuCo metadata files.
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}


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


def _require_every_label(labels: pd.Series, present: pd.Series, column: str, where: str) -> None:
    """Refuse a label id that no row of ``present`` holds: ``y=5`` among 0/1 is a typo.

    ``present`` marks the rows that must hold every id (train rows for classes, every
    row for attributes). The error names the first row with a label above the gap. Only
    for labels whose names are counted from the data: given names fix the number of
    labels, and a label beyond them is refused by :func:`_names`.
    """
    if not len(labels):
        return
    seen = set(labels[present].tolist())
    gaps = [i for i in range(int(labels.max()) + 1) if i not in seen]
    if not gaps:
        return
    what, scope = ("class", "training row") if column == "y" else ("attribute", "row")
    shown = ", ".join(map(str, gaps[:5])) + (" ..." if len(gaps) > 5 else "")
    rule = (
        f"Every label 0..{int(labels.max())} needs at least one {scope} (a {what} without "
        "them cannot be learned or scored per group)"
    )
    above = (labels > gaps[0]).to_numpy()
    if above.any():
        row = int(np.flatnonzero(above)[0])
        problem = (
            f"label {int(labels.iloc[row])} makes {int(labels.max()) + 1} {what} ids, but no "
            f"{scope} has {column}={shown} ({int(above.sum())} row(s) use a label above "
            f"{gaps[0]})"
        )
    else:  # the largest label occurs only outside the train split
        only = (labels == gaps[0]).to_numpy()
        row = int(np.flatnonzero(only)[0])
        problem = f"{what} {gaps[0]} has no {scope}, only {int(only.sum())} row(s) in other splits"
    raise DataError(
        f"{cell(where, row, column)}: {problem}. {rule}; fix the typo in that row or "
        f"renumber the labels 0..N-1 (or name them with {'class' if column == 'y' else 'attr'}"
        "_names)"
    )


@reader("csv")
def read_csv_table(
    root: Path,
    csv: str = "metadata.csv",
    class_names: list[str] | None = None,
    attr_names: list[str] | None = None,
    check_files: bool = True,
    majority: list[str] | None = None,
) -> GroupTable:
    """Read ``root/<csv>`` with columns ``filename,y,a,split`` (+ ``mask``, ``source``).

    ``class_names``/``attr_names`` name the labels in order (comma lists on the command
    line); without them the names are ``class0..`` / ``attr0..`` up to the largest
    label. ``check_files`` checks that every listed image exists under ``root``.
    ``majority`` declares each class's bias-aligned attribute (one name or id per class,
    in class order, e.g. ``majority=[child,adult]``) for ``data.bias_ratio``'s resplit,
    which refuses to guess when the data cannot tell (see :mod:`unspur.data.resplit`).
    """
    root = require_root(root, "csv")
    # The metadata file is where the user says (relative to the root, or absolute):
    # it is not an image the table lists, so it may live outside the root.
    path = root / Path(csv).expanduser()
    if not path.is_file():
        raise DataError(
            f"csv: metadata file {path} not found; write a CSV with columns "
            f"{','.join(REQUIRED_COLUMNS)} there, or point csv= at it (relative to {root}, "
            "or an absolute path)"
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
    frame["split"] = frame["split"].replace(SPLIT_CODES)
    reject_first(
        ~frame["split"].isin(SPLITS),
        where,
        "split",
        lambda row: (
            f"{frame['split'].iloc[row]!r} is not one of {'/'.join(SPLITS)} or the codes "
            "0/1/2 (train/val/test); rename it"
        ),
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
    if not class_names:
        _require_every_label(frame["y"], frame["split"] == "train", "y", where)
    if not attr_names:
        _require_every_label(frame["a"], frame["a"] >= 0, "a", where)
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
        info={
            "root": str(root),
            "csv": str(path),
            **({"majority_attr": list(majority)} if majority is not None else {}),
        },
    )
