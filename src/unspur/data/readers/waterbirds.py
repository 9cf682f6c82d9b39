"""``waterbirds``: Waterbirds as group_DRO releases it (Sagawa et al. 2020).

The folder ``waterbird_complete95_forest2water2/`` holds ``metadata.csv``
(``img_id,img_filename,y,split,place,place_filename``) and the images at
``<img_filename>``. ``y`` is 0 landbird / 1 waterbird, ``place`` (the background, our
``a``) is 0 land / 1 water, ``split`` is 0/1/2 = train/val/test.
"""

from __future__ import annotations

from pathlib import Path

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
from unspur.data.table import GroupTable
from unspur.errors import DataError

METADATA_COLUMNS = ("img_filename", "y", "split", "place")
SPLIT_CODES = {0: "train", 1: "val", 2: "test"}


@reader("waterbirds")
def read_waterbirds(
    root: Path, metadata: str = "metadata.csv", check_files: bool = True
) -> GroupTable:
    """Read group_DRO's ``metadata.csv``; a = place (the background).

    ``root`` is the folder with ``metadata.csv`` and the species folders
    (``waterbird_complete95_forest2water2``). ``check_files`` checks that every image
    the metadata lists is there (one directory listing per species folder).
    """
    root = require_root(root, "waterbirds")
    path = safe_join(root, metadata)
    if not path.is_file():
        nested = sorted(p.parent.name for p in root.glob(f"*/{metadata}"))
        hint = f" It is in {root}/{nested[0]}: pass that folder as the root." if nested else ""
        raise DataError(
            f"waterbirds: metadata file {path} not found.{hint} The dataset root must be the "
            "folder from group_DRO's waterbird_complete95_forest2water2.tar.gz that holds "
            "metadata.csv and the images (or set metadata= to the CSV's path in the root)"
        )
    where = str(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot parse as CSV ({exc}); fix or re-extract it") from exc
    missing = [c for c in METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; group_DRO's Waterbirds metadata has "
            f"img_id,img_filename,y,split,place,place_filename (found {list(frame.columns)})"
        )
    if frame.empty:
        raise DataError(f"{where}: has no rows")

    for row, name in enumerate(frame["img_filename"]):
        check_relative(name, cell(where, row, "img_filename"), root)
    columns = {c: int_column(frame, c, where) for c in ("y", "place", "split")}
    allowed = {"y": {0, 1}, "place": {0, 1}, "split": set(SPLIT_CODES)}
    for column, values in columns.items():
        reject_first(
            ~values.isin(allowed[column]),
            where,
            column,
            lambda row, v=values, c=column: f"{v.iloc[row]} is not one of {sorted(allowed[c])}",
        )

    table = pd.DataFrame(
        {
            "filename": frame["img_filename"].str.strip(),
            "y": columns["y"],
            "a": columns["place"],
            "split": columns["split"].map(SPLIT_CODES),
        }
    )
    if "place_filename" in frame.columns:
        table["place_filename"] = frame["place_filename"]
    if check_files:
        raise_if_missing(
            "waterbirds",
            root,
            table["filename"],
            "Extract the images next to metadata.csv (the species folders 001.Black_footed_"
            "Albatross/ ...), or pass the folder that holds both.",
        )
    return GroupTable(
        frame=table,
        store=FolderStore(root),
        class_names=["landbird", "waterbird"],
        attr_names=["land", "water"],
        name="waterbirds",
        info={"root": str(root), "metadata": str(path)},
    )
