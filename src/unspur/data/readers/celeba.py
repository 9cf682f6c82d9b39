"""``celeba`` and ``celeba_hq``: any two of the 40 CelebA attributes as target and bias.

CelebA is read as its owners ship it: ``list_attr_celeba.txt`` (a count line, a line
with the 40 attribute names, then ``filename v1 ... v40`` with values -1/1),
``list_eval_partition.txt`` (``filename 0|1|2`` = train/val/test) and the images in
``img_align_celeba/``. The Kaggle re-release (``list_attr_celeba.csv``,
``list_eval_partition.csv``, images in ``img_align_celeba/img_align_celeba/``) and the
Google Drive folders (``Anno/``, ``Eval/``, ``Img/``) are accepted too.

CelebA-HQ is read as CelebAMask-HQ ships it: ``CelebAMask-HQ-attribute-anno.txt`` (the
same format, 30,000 rows) and ``CelebA-HQ-img/``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unspur.data.layout import (
    assign_splits,
    check_fractions,
    raise_if_missing,
    relative,
    require_root,
)
from unspur.data.registry import reader
from unspur.data.store import FolderStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError, DataError

PARTITIONS = {0: "train", 1: "val", 2: "test"}

#: The bias-aligned (majority) bias value of each class, in class order (not target,
#: target), for the (target, bias) pairs the papers use; ``resplit_bias`` reads it.
#: Blond_Hair/Male: Clustered DreamBooth A.6 ("blond males from blond female models, and
#: non-blond females from non-blond male models": blond -> women, non-blond -> men; the
#: group_DRO minority is blond men). Smiling/Male: the official FFR code's rule
#: (``datasets/celeba.py``: the smaller group of the positive class is its minority and
#: the negative class takes the other bias value as minority), and the release's own
#: splits (``data/celeba_Smiling_train_*.pkl``, read without unpickling: 5335 not-smiling
#: men and 7797 smiling women kept at every level): Smiling -> women, not Smiling -> men.
MAJORITY_PRESETS: dict[tuple[str, str], tuple[str, str]] = {
    ("Blond_Hair", "Male"): ("Male", "not Male"),
    ("Smiling", "Male"): ("Male", "not Male"),
}
MAJORITY_SOURCES = {
    ("Blond_Hair", "Male"): "celeba preset (Clustered DreamBooth A.6)",
    ("Smiling", "Male"): "celeba preset (official FFR code, datasets/celeba.py)",
}


def _first_file(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def read_attribute_file(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """CelebA attribute annotations as ``filename`` + one 0/1 column per attribute.

    Reads the original whitespace format (count line, names line, rows) and the Kaggle
    CSV (``image_id,5_o_Clock_Shadow,...``). Values -1/1 (or 0/1) become 0/1.
    """
    where = str(path)
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path)
            frame = frame.rename(columns={frame.columns[0]: "filename"})
            names = [str(c).strip() for c in frame.columns[1:]]
            frame.columns = ["filename", *names]
            first_line = 2
        else:
            with open(path, encoding="utf-8") as handle:
                count_line = handle.readline().strip()
                names = handle.readline().split()
            if not names:
                raise DataError(
                    f"{where}: line 2 must list the attribute names; the file is empty or truncated"
                )
            frame = pd.read_csv(
                path,
                sep=r"\s+",
                skiprows=2,
                header=None,
                names=["filename", *names],
                dtype={"filename": str},
                engine="c",
            )
            first_line = 3
            if count_line.isdigit() and int(count_line) != len(frame):
                raise DataError(
                    f"{where}: line 1 says {count_line} images but {len(frame)} rows follow; "
                    "the file is truncated or corrupted, re-extract it"
                )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: cannot parse the attribute table ({exc})") from exc
    values = frame[names].apply(pd.to_numeric, errors="coerce")
    bad = values.isna() | ~values.isin([-1, 0, 1])
    if bad.any().any():
        row, col = (int(i[0]) for i in np.nonzero(bad.to_numpy()))
        raise DataError(
            f"{where}: row {row + 1} (line {row + first_line}) ({frame['filename'].iloc[row]}), "
            f"attribute {names[col]!r}: {str(frame[names[col]].iloc[row])!r} is not -1/1; "
            "fix or re-extract the file"
        )
    frame[names] = (values.to_numpy() == 1).astype(np.int64)
    return frame, names


def pick_attribute(name: str, names: list[str], option: str, dataset: str) -> str:
    """``name`` if it is an attribute, else an error with close matches and all names."""
    if name in names:
        return name
    lowered = {n.lower(): n for n in names}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"dataset {dataset!r}: {option}={name!r} is not a CelebA attribute.{hint} "
        f"Attributes: {', '.join(names)}"
    )


def _target_bias(frame: pd.DataFrame, names: list[str], target: str, bias: str, dataset: str):
    target = pick_attribute(target, names, "target", dataset)
    bias = pick_attribute(bias, names, "bias", dataset)
    if target == bias:
        raise ConfigError(f"dataset {dataset!r}: target and bias are both {target!r}; pick two")
    return target, bias


def read_partition_file(path: Path) -> pd.DataFrame:
    """``filename, split`` from ``list_eval_partition.txt`` (or the Kaggle ``.csv``)."""
    where = str(path)
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str)
            first_line = 2
        else:
            frame = pd.read_csv(path, sep=r"\s+", header=None, dtype=str, engine="c")
            first_line = 1
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: cannot parse the partition file ({exc})") from exc
    if frame.shape[1] < 2:
        raise DataError(f"{where}: expected two columns (filename, partition 0/1/2)")
    frame = frame.iloc[:, :2]
    frame.columns = ["filename", "partition"]
    split = pd.to_numeric(frame["partition"], errors="coerce").map(PARTITIONS)
    if split.isna().any():
        row = int(np.flatnonzero(split.isna().to_numpy())[0])
        raise DataError(
            f"{where}: row {row + 1} (line {row + first_line}): partition "
            f"{frame['partition'].iloc[row]!r} is not 0, 1 or 2 (train/val/test)"
        )
    return pd.DataFrame({"filename": frame["filename"], "split": split})


def _images_dir(root: Path) -> Path | None:
    for candidate in (
        root / "img_align_celeba" / "img_align_celeba",
        root / "img_align_celeba",
        root / "Img" / "img_align_celeba",
    ):
        if candidate.is_dir():
            return candidate
    return None


def majority_info(target: str, bias: str, majority: Any, dataset: str) -> dict[str, Any]:
    """``info`` entries declaring each class's majority bias value for ``resplit_bias``.

    ``majority``: ``None`` takes :data:`MAJORITY_PRESETS` for a known (target, bias)
    pair (else the data decide); ``"data"`` always lets the data decide; a list of two
    bias names or ids (for class "not target", then "target") declares it.
    """
    if majority is None:
        preset = MAJORITY_PRESETS.get((target, bias))
        if preset is None:
            return {}
        return {"majority_attr": list(preset), "majority_source": MAJORITY_SOURCES[(target, bias)]}
    if majority == "data":
        return {}
    if not isinstance(majority, list | tuple) or len(majority) != 2:
        raise ConfigError(
            f"dataset {dataset!r}: majority={majority!r} must be null (preset), 'data', or "
            f"two bias values (for 'not {target}' and '{target}'), e.g. "
            f"[{bias}, not {bias}]"
        )
    return {"majority_attr": list(majority), "majority_source": "data.options.majority"}


def _table(
    frame: pd.DataFrame,
    target: str,
    bias: str,
    images: Path,
    root: Path,
    name: str,
    info: dict,
    check_files: bool,
) -> GroupTable:
    prefix = relative(images, root)
    table = pd.DataFrame(
        {
            "filename": prefix + "/" + frame["filename"].str.strip(),
            "y": frame[target].to_numpy(),
            "a": frame[bias].to_numpy(),
            "split": frame["split"].to_numpy(),
        }
    )
    if check_files:
        raise_if_missing(name, root, table["filename"], f"Extract all images into {images}.")
    return GroupTable(
        frame=table,
        store=FolderStore(root),
        class_names=[f"not {target}", target],
        attr_names=[f"not {bias}", bias],
        name=name,
        info={"root": str(root), "target": target, "bias": bias, **info},
    )


@reader("celeba")
def read_celeba(
    root: Path,
    target: str = "Blond_Hair",
    bias: str = "Male",
    check_files: bool = True,
    majority: Any = None,
) -> GroupTable:
    """CelebA with y = ``target`` and a = ``bias`` (default Blond_Hair x Male, as in
    group_DRO), split by the official ``list_eval_partition``.

    ``check_files`` checks that every image is in the image folder (one listing).
    ``majority`` declares each class's bias-aligned value for a bias-ratio resplit
    (:func:`majority_info`; default: the preset of the pair, if any).
    """
    root = require_root(root, "celeba")
    attr_path = _first_file(
        root / "list_attr_celeba.txt",
        root / "Anno" / "list_attr_celeba.txt",
        root / "list_attr_celeba.csv",
    )
    part_path = _first_file(
        root / "list_eval_partition.txt",
        root / "Eval" / "list_eval_partition.txt",
        root / "list_eval_partition.csv",
    )
    if attr_path is None or part_path is None:
        missing = "list_attr_celeba.txt" if attr_path is None else "list_eval_partition.txt"
        raise DataError(
            f"celeba: {missing} (or its Kaggle .csv) not found in {root}; the root must hold "
            "list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/ as "
            "CelebA ships them"
        )
    images = _images_dir(root)
    if images is None:
        raise DataError(
            f"celeba: image folder {root / 'img_align_celeba'} not found; extract "
            "img_align_celeba.zip into the root"
        )
    frame, names = read_attribute_file(attr_path)
    target, bias = _target_bias(frame, names, target, bias, "celeba")
    partition = read_partition_file(part_path)
    duplicated = partition["filename"].duplicated()
    if duplicated.any():
        name = partition["filename"][duplicated].iloc[0]
        raise DataError(f"{part_path}: {name} is listed twice; each image needs one partition")
    merged = frame.merge(partition, on="filename", how="left")
    unsplit = merged["split"].isna()
    if unsplit.any():
        examples = ", ".join(merged.loc[unsplit, "filename"].head(5))
        raise DataError(
            f"celeba: {int(unsplit.sum())} image(s) in {attr_path.name} have no row in "
            f"{part_path.name} (first: {examples}); use the two files from one release"
        )
    info = {
        "attributes": names,
        "attr_file": str(attr_path),
        "partition_file": str(part_path),
        **majority_info(target, bias, majority, "celeba"),
    }
    return _table(merged, target, bias, images, root, "celeba", info, check_files)


@reader("celeba_hq")
def read_celeba_hq(
    root: Path,
    target: str = "Blond_Hair",
    bias: str = "Male",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    check_files: bool = True,
    majority: Any = None,
) -> GroupTable:
    """CelebA-HQ as released in CelebAMask-HQ: y = ``target``, a = ``bias`` (FFR:
    Smiling x Male, section 4; ``majority`` as for ``celeba``).

    ``root`` holds ``CelebAMask-HQ-attribute-anno.txt`` and ``CelebA-HQ-img/`` (or a
    ``CelebAMask-HQ/`` folder that does). CelebA-HQ has no split of its own: when the
    root also holds ``CelebA-HQ-to-CelebA-mapping.txt`` and CelebA's
    ``list_eval_partition.txt``, each image takes the split of its CelebA original (no
    identity leaks from CelebA's split); otherwise a split is drawn by ``seed``,
    stratified by group, with ``val_fraction``/``test_fraction``.
    """
    root = require_root(root, "celeba_hq")
    base = root
    if not (root / "CelebAMask-HQ-attribute-anno.txt").is_file():
        if (root / "CelebAMask-HQ" / "CelebAMask-HQ-attribute-anno.txt").is_file():
            base = root / "CelebAMask-HQ"
        else:
            raise DataError(
                f"celeba_hq: CelebAMask-HQ-attribute-anno.txt not found in {root}; pass the "
                "CelebAMask-HQ folder that holds it and CelebA-HQ-img/"
            )
    images = base / "CelebA-HQ-img"
    if not images.is_dir():
        raise DataError(f"celeba_hq: image folder {images} not found; extract CelebA-HQ-img/")
    frame, names = read_attribute_file(base / "CelebAMask-HQ-attribute-anno.txt")
    target, bias = _target_bias(frame, names, target, bias, "celeba_hq")
    mapping = _first_file(base / "CelebA-HQ-to-CelebA-mapping.txt")
    part_path = _first_file(
        base / "list_eval_partition.txt",
        root / "list_eval_partition.txt",
        base / "list_eval_partition.csv",
        root / "list_eval_partition.csv",
    )
    if mapping is not None and part_path is not None:
        links = pd.read_csv(mapping, sep=r"\s+", dtype=str, engine="c")
        if not {"idx", "orig_file"} <= set(links.columns):
            raise DataError(f"{mapping}: expected columns idx, orig_idx, orig_file")
        links["filename"] = links["idx"].str.strip() + ".jpg"
        partition = read_partition_file(part_path).rename(columns={"filename": "orig_file"})
        links = links.merge(partition, on="orig_file", how="left")
        frame = frame.merge(links[["filename", "split"]], on="filename", how="left")
        if frame["split"].isna().any():
            examples = ", ".join(frame.loc[frame["split"].isna(), "filename"].head(5))
            raise DataError(
                f"celeba_hq: {int(frame['split'].isna().sum())} image(s) have no CelebA "
                f"partition through {mapping.name} (first: {examples})"
            )
        split_source = f"CelebA partition via {mapping.name}"
    else:
        check_fractions(val_fraction, test_fraction, "celeba_hq")
        keyed = frame.assign(y=frame[target], a=frame[bias])
        frame["split"] = assign_splits(keyed, val_fraction, test_fraction, seed)
        split_source = f"seeded (seed={seed}, val={val_fraction}, test={test_fraction})"
    info = {
        "attributes": names,
        "split_source": split_source,
        **majority_info(target, bias, majority, "celeba_hq"),
    }
    return _table(frame, target, bias, images, root, "celeba_hq", info, check_files)
