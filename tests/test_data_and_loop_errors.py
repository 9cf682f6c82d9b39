"""User mistakes in data and training get one clear message (issue 21, sections 3 and 5).

CSV metadata as other toolkits write it (split codes 0/1/2, the file outside the image
root), label typos caught where they are read, damaged checkpoints, unreadable images
behind DataLoader workers, ``unspur data inspect`` verdicts, thread settings and wall
time summed over resumed invocations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from unspur.data import load_dataset
from unspur.errors import DataError


def write_images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i % 256, 90, 30)).save(path)


def write_csv(root: Path, rows: list[str], name: str = "metadata.csv") -> Path:
    """Images for every row plus ``root/name`` with a ``filename,y,a,split`` header."""
    write_images(root, [row.split(",")[0] for row in rows])
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("filename,y,a,split\n" + "\n".join(rows) + "\n")
    return path


FOUR_GROUPS = [
    f"img/{s}{y}{a}.png,{y},{a},{s}"
    for s in ("train", "val", "test")
    for y in (0, 1)
    for a in (0, 1)
]


# ------------------------------------------------------------------ section 5: CSV metadata
def test_csv_split_codes_0_1_2_read_as_train_val_test(tmp_path: Path) -> None:
    rows = [
        f"img/{code}{y}{a}.png,{y},{a},{code}" for code in (0, 1, 2) for y in (0, 1) for a in (0, 1)
    ]
    write_csv(tmp_path, rows)
    table = load_dataset("csv", tmp_path)
    assert table.frame["split"].value_counts().to_dict() == {"train": 4, "val": 4, "test": 4}
    assert table.frame.loc[table.frame["filename"] == "img/100.png", "split"].item() == "val"
    with pytest.raises(DataError, match=r"'3' is not one of train/val/test or the codes 0/1/2"):
        write_csv(tmp_path, rows + ["img/x.png,0,0,3"])
        load_dataset("csv", tmp_path)


def test_csv_metadata_outside_the_root_is_allowed_but_its_paths_stay_inside(
    tmp_path: Path,
) -> None:
    root = tmp_path / "images"
    write_images(root, [row.split(",")[0] for row in FOUR_GROUPS])
    outside = tmp_path / "meta" / "spuco.csv"
    outside.parent.mkdir()
    outside.write_text("filename,y,a,split\n" + "\n".join(FOUR_GROUPS) + "\n")
    for csv in (str(outside), "../meta/spuco.csv"):
        table = load_dataset("csv", root, csv=csv)
        assert len(table.frame) == 12 and table.info["csv"] == str(root / csv)
    # The image paths inside the file must still stay inside the root.
    (tmp_path / "secret.png").write_bytes(b"")
    outside.write_text(
        "filename,y,a,split\n" + "\n".join(FOUR_GROUPS + ["../secret.png,0,0,train"])
    )
    with pytest.raises(
        DataError, match=r"row 13 \(line 14\), column 'filename'.*escapes the data root"
    ):
        load_dataset("csv", root, csv=str(outside))


# ------------------------------------------------------------------ section 3: label typos
def test_label_typo_is_caught_where_it_is_read(tmp_path: Path) -> None:
    write_csv(tmp_path, FOUR_GROUPS + ["img/typo.png,5,0,train"])
    with pytest.raises(DataError) as error:
        load_dataset("csv", tmp_path)
    message = str(error.value)
    assert "row 13 (line 14), column 'y': label 5 makes 6 class ids" in message
    assert "no training row has y=2, 3, 4" in message and "fix the typo" in message


def test_class_without_training_images_is_refused(tmp_path: Path) -> None:
    rows = [r for r in FOUR_GROUPS if not r.startswith("img/train1")]
    write_csv(tmp_path, rows)
    with pytest.raises(
        DataError,
        match=r"row 5 \(line 6\), column .y.: class 1 has no training row, only 4 row\(s\)",
    ):
        load_dataset("csv", tmp_path)


def test_attribute_typo_is_caught(tmp_path: Path) -> None:
    write_csv(tmp_path, FOUR_GROUPS + ["img/typo.png,0,7,val"])
    with pytest.raises(
        DataError, match=r"column 'a': label 7 makes 8 attribute ids.*a=2, 3, 4, 5, 6"
    ):
        load_dataset("csv", tmp_path)
