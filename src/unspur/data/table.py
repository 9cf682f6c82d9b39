"""The canonical table: one row per image, the only thing downstream code sees.

Columns: ``filename, y, a, split`` and optionally ``mask`` (a filename in the mask
store), ``source`` (``real`` or ``synthetic``) and any provenance columns. The group of
a row is ``g = y * n_attrs + a``, i.e. the pair ``(y, a)``. Readers translate each
benchmark's native format into a :class:`GroupTable`; nothing after them knows which
benchmark it is looking at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from unspur.data.store import ImageStore
from unspur.errors import DataError

REQUIRED_COLUMNS = ("filename", "y", "a", "split")
SPLITS = ("train", "val", "test")


@dataclass
class GroupTable:
    """A dataset as a canonical table plus the store that holds its pixels.

    ``class_names[y]`` and ``attr_names[a]`` name the labels; ``info`` carries reader
    facts worth reporting (skipped files, the bias ratio, the source archive).
    """

    frame: pd.DataFrame
    store: ImageStore
    class_names: list[str]
    attr_names: list[str]
    name: str = "dataset"
    mask_store: ImageStore | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.frame = self.frame.reset_index(drop=True)
        validate_frame(self.frame, len(self.class_names), len(self.attr_names), self.name)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_attrs(self) -> int:
        return len(self.attr_names)

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attrs

    @property
    def groups(self) -> np.ndarray:
        """Group id of every row, ``y * n_attrs + a``."""
        return group_ids(self.frame["y"].to_numpy(), self.frame["a"].to_numpy(), self.n_attrs)

    def group_name(self, g: int) -> str:
        y, a = divmod(int(g), self.n_attrs)
        return f"{self.class_names[y]} / {self.attr_names[a]}"

    def split(self, name: str) -> GroupTable:
        """The rows of one split, as a table of its own."""
        if name not in set(self.frame["split"]):
            raise DataError(
                f"{self.name} has no rows in split {name!r} (splits present: "
                f"{sorted(set(self.frame['split']))})"
            )
        return self.subset(self.frame["split"].to_numpy() == name)

    def subset(self, keep: np.ndarray | Sequence[bool] | Sequence[int]) -> GroupTable:
        """Rows selected by a boolean mask or integer positions."""
        keep = np.asarray(keep)
        frame = self.frame[keep] if keep.dtype == bool else self.frame.iloc[keep]
        return replace(self, frame=frame.reset_index(drop=True), info=dict(self.info))

    def with_frame(self, frame: pd.DataFrame) -> GroupTable:
        return replace(self, frame=frame.reset_index(drop=True), info=dict(self.info))

    def counts(self) -> pd.DataFrame:
        """Rows per group (rows) and split (columns), with every group listed."""
        frame = self.frame.assign(group=self.groups)
        table = frame.pivot_table(
            index="group", columns="split", values="filename", aggfunc="count", fill_value=0
        )
        table = table.reindex(index=range(self.n_groups), fill_value=0)
        ordered = [s for s in SPLITS if s in table.columns] + [
            s for s in table.columns if s not in SPLITS
        ]
        table = table[ordered].astype(int)
        table.insert(0, "a", [self.attr_names[g % self.n_attrs] for g in table.index])
        table.insert(0, "y", [self.class_names[g // self.n_attrs] for g in table.index])
        table.index.name = "g"
        return table


def group_ids(y: np.ndarray, a: np.ndarray, n_attrs: int) -> np.ndarray:
    return np.asarray(y, dtype=np.int64) * n_attrs + np.asarray(a, dtype=np.int64)


def validate_frame(frame: pd.DataFrame, n_classes: int, n_attrs: int, name: str) -> None:
    """Check the canonical columns and label ranges; errors name the offending row."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{name}: table is missing column(s) {missing}; need {REQUIRED_COLUMNS}")
    for column, bound in (("y", n_classes), ("a", n_attrs)):
        values = frame[column]
        if not pd.api.types.is_integer_dtype(values):
            raise DataError(f"{name}: column {column!r} must hold integers, got {values.dtype}")
        bad = (values < 0) | (values >= bound)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{name}: row {row} ({frame['filename'].iloc[row]}) has {column}="
                f"{values.iloc[row]}, outside 0..{bound - 1}; fix the label or the list "
                f"of {'class' if column == 'y' else 'attribute'} names"
            )
    unknown = sorted(set(frame["split"]) - set(SPLITS))
    if unknown:
        raise DataError(f"{name}: unknown split value(s) {unknown}; use {SPLITS}")
    duplicated = frame["filename"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(
            f"{name}: filename {frame['filename'].iloc[row]!r} appears twice (row {row}); "
            "each image must have exactly one row"
        )


def require_nonempty_groups(table: GroupTable, split: str) -> None:
    """Fail when a split lacks a group that group-robust training or evaluation needs."""
    part = table.frame[table.frame["split"] == split]
    present = set(group_ids(part["y"], part["a"], table.n_attrs).tolist())
    empty = [g for g in range(table.n_groups) if g not in present]
    if empty:
        names = ", ".join(f"g{g} ({table.group_name(g)})" for g in empty)
        raise DataError(
            f"{table.name}: split {split!r} has no samples of group(s) {names}; "
            "worst-group metrics need every group present (choose another bias ratio, "
            f"split or attribute){rare_label_hint(table, empty)}"
        )


#: A class or attribute with at most this many rows in all splits looks like a typo.
RARE_LABEL_ROWS = 3


def rare_label_hint(table: GroupTable, groups: list[int]) -> str:
    """Name the rows of a class or attribute of ``groups`` that (almost) never occurs.

    An empty group is often a typo'd label (``a=2`` in one row makes a third attribute
    whose groups are empty everywhere else); pointing at that row is the useful fix.
    """
    frame = table.frame
    hints = []
    for column, values, names in (
        ("y", sorted({g // table.n_attrs for g in groups}), table.class_names),
        ("a", sorted({g % table.n_attrs for g in groups}), table.attr_names),
    ):
        for value in values:
            rows = frame.index[frame[column] == value]
            if 0 < len(rows) <= RARE_LABEL_ROWS:
                files = ", ".join(str(frame["filename"].iloc[r]) for r in rows)
                hints.append(f"{column}={value} ({names[value]}) occurs only in {files}")
    if not hints:
        return ""
    return f". A label typo? {'; '.join(hints)}: fix those rows if so"
