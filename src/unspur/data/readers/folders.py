"""Readers for benchmarks shipped as class/attribute folders, and the helpers they share.

Layouts read here:

- ``folders``: the generic ``root/<split>/<class>/<attribute>/<image>`` layout (or
  ``root/<class>/<attribute>/<image>`` with a seeded split).
- ``spuco_animals``: SpuCo's ``spuco_birds/<split>/<class>/<context>/`` and
  ``spuco_dogs/<split>/...`` folders, and the flat sample files ``{ll,lw,...}N.png``.
- ``bffhq`` and ``dogs_cats``: the DisEnt / BiasEnsemble release, where
  ``<percent>/align/<label>/`` and ``<percent>/conflict/<label>/`` hold the training images
  and every file name ends in ``_<y>_<a>.<ext>``.

Shared folder-walking and splitting helpers live in :mod:`unspur.data.layout`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from unspur.data.layout import (
    assign_splits,
    canonical_frame,
    check_fractions,
    find_split_dirs,
    list_images,
    name_index,
    relative,
    require_root,
    subdirs,
    walk_class_attr,
)
from unspur.data.registry import reader
from unspur.data.store import FolderStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError, DataError

# --------------------------------------------------------------------------- folders


@reader("folders")
def read_folders(
    root: Path,
    class_names: list[str] | None = None,
    attr_names: list[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> GroupTable:
    """Any dataset laid out as ``root/<split>/<class>/<attribute>/<image>``.

    Split folders may be named ``train``, ``val``/``valid``/``validation`` and ``test``.
    Without split folders the layout ``root/<class>/<attribute>/<image>`` is read and
    split by ``seed`` (stratified by group, ``val_fraction``/``test_fraction``).
    ``class_names``/``attr_names`` fix the label order (default: sorted folder names).
    """
    root = require_root(root, "folders")
    split_dirs = find_split_dirs(root)
    records: list[tuple[str, str, str, str]] = []
    if split_dirs:
        for split, directory in split_dirs.items():
            records += [(f, c, a, split) for f, c, a in walk_class_attr(directory, root)]
        split_source = "folders"
    else:
        check_fractions(val_fraction, test_fraction, "folders")
        records = [(f, c, a, "train") for f, c, a in walk_class_attr(root, root)]
        split_source = f"seeded (seed={seed}, val={val_fraction}, test={test_fraction})"
    if not records:
        raise DataError(
            f"folders: no images found under {root}; expected "
            "root/<split>/<class>/<attribute>/<image> or root/<class>/<attribute>/<image>"
        )
    classes = name_index((r[1] for r in records), class_names, "class", f"folders {root}")
    attrs = name_index((r[2] for r in records), attr_names, "attr", f"folders {root}")
    frame = canonical_frame([(f, classes[c], attrs[a], s) for f, c, a, s in records])
    if not split_dirs:
        frame["split"] = assign_splits(frame, val_fraction, test_fraction, seed)
    return GroupTable(
        frame=frame,
        store=FolderStore(root),
        class_names=list(class_names or sorted(classes, key=classes.get)),
        attr_names=list(attr_names or sorted(attrs, key=attrs.get)),
        name="folders",
        info={"root": str(root), "split_source": split_source},
    )


# --------------------------------------------------------------------------- SpuCo


_SPUCO_SUBSETS = {
    # subset -> (dataset folder in SpuCo's release, classes, attributes)
    "birds": ("spuco_birds", ["landbird", "waterbird"], ["land", "water"]),
    "dogs": ("spuco_dogs", ["small_dog", "big_dog"], ["indoor", "outdoor"]),
}
# Prefix letters of the flat sample files: {class letter}{attribute letter}N.png.
_SPUCO_SAMPLE = {
    "ll": ("landbird", "land"),
    "lw": ("landbird", "water"),
    "wl": ("waterbird", "land"),
    "ww": ("waterbird", "water"),
    "si": ("small_dog", "indoor"),
    "so": ("small_dog", "outdoor"),
    "bi": ("big_dog", "indoor"),
    "bo": ("big_dog", "outdoor"),
}
_SPUCO_SAMPLE_RE = re.compile(r"^(ll|lw|wl|ww|si|so|bi|bo)(\d+)$")


def _spuco_class(folder: str) -> str | None:
    """SpuCo class folder (``landbirds``, ``small_dogs``, ``small_dog_breeds``) -> name."""
    key = folder.lower().replace("-", "_").replace(" ", "_").removesuffix("_breeds")
    key = key.removesuffix("s")
    aliases = {"landbird": "landbird", "land_bird": "landbird", "waterbird": "waterbird"}
    aliases |= {"water_bird": "waterbird", "small_dog": "small_dog", "smalldog": "small_dog"}
    aliases |= {"big_dog": "big_dog", "bigdog": "big_dog", "large_dog": "big_dog"}
    return aliases.get(key)


@reader("spuco_animals")
def read_spuco_animals(
    root: Path,
    subset: str = "all",
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> GroupTable:
    """SpuCo Animals (landbirds/waterbirds x land/water, small/big dogs x indoor/outdoor).

    ``subset="all"`` is SpuCo's ``SpuCoAnimals``: 4 classes (landbird, waterbird,
    small_dog, big_dog) x 4 attributes (land, water, indoor, outdoor), so 8 of the 16
    groups are non-empty by construction. ``"birds"`` and ``"dogs"`` are ``SpuCoBirds``
    and ``SpuCoDogs`` (2 x 2 groups each).

    Layouts: SpuCo's release ``root/spuco_birds/<split>/<class>/<context>/`` and
    ``root/spuco_dogs/<split>/...``; ``root/<split>/<class>/<context>/``; or the flat
    sample files ``{ll,lw,wl,ww,si,so,bi,bo}N.png`` (first letter class, second letter
    context), which have no split: it is drawn by ``seed``, stratified by group, with
    ``val_fraction``/``test_fraction`` (the options are unused when split folders exist).
    """
    root = require_root(root, "spuco_animals")
    if subset == "all":
        parts = ["birds", "dogs"]
    elif subset in _SPUCO_SUBSETS:
        parts = [subset]
    else:
        raise ConfigError(
            f"dataset 'spuco_animals': subset={subset!r} is not one of all, birds, dogs"
        )
    class_names = [c for p in parts for c in _SPUCO_SUBSETS[p][1]]
    attr_names = [a for p in parts for a in _SPUCO_SUBSETS[p][2]]
    y_of = {c: i for i, c in enumerate(class_names)}
    a_of = {a: i for i, a in enumerate(attr_names)}

    records: list[tuple[str, int, int, str]] = []
    seen: set[str] = set()
    for part in parts:
        folder, part_classes, part_attrs = _SPUCO_SUBSETS[part]
        for base in (root / folder, root):
            for split, split_dir in find_split_dirs(base).items():
                for filename, class_dir, attr_dir in walk_class_attr(split_dir, root):
                    name = _spuco_class(class_dir)
                    if name is None:
                        raise DataError(
                            f"spuco_animals: class folder {split_dir / class_dir} is not a "
                            "SpuCo class (landbirds, waterbirds, small_dogs, big_dogs)"
                        )
                    if name not in part_classes or filename in seen:
                        continue
                    attr = attr_dir.lower()
                    if attr not in part_attrs:
                        raise DataError(
                            f"spuco_animals: context folder {split_dir / class_dir / attr_dir} "
                            f"is not one of {part_attrs} for class {name}"
                        )
                    seen.add(filename)
                    records.append((filename, y_of[name], a_of[attr], split))
    layout = "split folders"
    if not records:
        layout = "flat sample files"
        for path in list_images(root):
            match = _SPUCO_SAMPLE_RE.match(path.stem.lower())
            if path.parent != root or match is None:
                continue
            name, attr = _SPUCO_SAMPLE[match.group(1)]
            if name in y_of:
                records.append((relative(path, root), y_of[name], a_of[attr], "train"))
    if not records:
        raise DataError(
            f"spuco_animals: no images found under {root}; expected spuco_birds/<split>/"
            "<class>/<context>/ and spuco_dogs/<split>/..., <split>/<class>/<context>/, "
            "or flat files named {ll,lw,wl,ww,si,so,bi,bo}N.png"
        )
    frame = canonical_frame(records)
    info: dict[str, object] = {"root": str(root), "layout": layout, "subset": subset}
    if layout == "flat sample files":
        check_fractions(val_fraction, test_fraction, "spuco_animals")
        frame["split"] = assign_splits(frame, val_fraction, test_fraction, seed)
        info["split_source"] = f"seeded (seed={seed}, val={val_fraction}, test={test_fraction})"
    else:
        info["split_source"] = "folders"
    return GroupTable(
        frame=frame,
        store=FolderStore(root),
        class_names=class_names,
        attr_names=attr_names,
        name="spuco_animals" if subset == "all" else f"spuco_{subset}",
        info=info,
    )


# --------------------------------------------------------------------------- align/conflict


_LABELLED_NAME = re.compile(r"_(\d+)_(\d+)$")


def _labels_from_name(path: Path) -> tuple[int, int] | None:
    """``(y, a)`` from a DisEnt-style name ``<anything>_<y>_<a>.<ext>``."""
    match = _LABELLED_NAME.search(path.stem)
    return (int(match.group(1)), int(match.group(2))) if match else None


def read_align_conflict(
    root: Path,
    dataset: str,
    directories: dict[str, list[Path]],
    n_classes: int,
    n_attrs: int,
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Images in ``directories[split]`` labelled by their ``_<y>_<a>`` name suffix.

    Files whose names carry no labels are skipped and counted; labels out of range are
    an error naming the file.
    """
    records: list[tuple[str, int, int, str]] = []
    unlabelled: list[str] = []
    for split, dirs in directories.items():
        for directory in dirs:
            for path in list_images(directory):
                labels = _labels_from_name(path)
                if labels is None:
                    unlabelled.append(relative(path, root))
                    continue
                y, a = labels
                if y >= n_classes or a >= n_attrs:
                    raise DataError(
                        f"{dataset}: file {path} has labels y={y}, a={a} in its name; "
                        f"expected y < {n_classes} and a < {n_attrs}"
                    )
                records.append((relative(path, root), y, a, split))
    frame = canonical_frame(records)
    info: dict[str, object] = {
        "unlabelled_files": len(unlabelled),
        "unlabelled_examples": unlabelled[:10],
    }
    if len(frame):
        train = frame[frame["split"] == "train"]
        if len(train):
            info["train_conflict_fraction"] = float((train["y"] != train["a"]).mean())
    return frame, info


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _align_conflict_dirs(root: Path, percent: str, dataset: str) -> tuple[Path, Path, Path]:
    """(train folder holding align/ and conflict/, valid folder, test folder)."""
    train = _first_dir(root / percent, root / "train")
    if train is None or not (train / "align").is_dir():
        if (root / "align").is_dir():
            raise DataError(
                f"{dataset}: {root} looks like one bias-severity folder (it holds align/); "
                f"pass its parent, which also holds valid/ and test/, and percent={root.name}"
            )
        present = [p.name for p in subdirs(root)]
        raise DataError(
            f"{dataset}: no training folder {root / percent}/align (or {root}/train/align); "
            f"folders present: {present}. Pass the dataset folder and the bias severity, "
            "e.g. percent=0.5pct"
        )
    valid = _first_dir(train / "valid", root / "valid", root / "val")
    test = _first_dir(train / "test", root / "test")
    if valid is None or test is None:
        raise DataError(
            f"{dataset}: expected valid/ and test/ folders under {root} (or {train}); "
            "the release has <root>/valid and <root>/test next to the bias-severity folders"
        )
    return train, valid, test


@reader("bffhq")
def read_bffhq(root: Path, percent: str = "0.5pct", test_conflict_only: bool = False) -> GroupTable:
    """BFFHQ (biased FFHQ; Kim et al. 2021, released with DisEnt): age with gender bias.

    Layout as released: ``root/<percent>/align/<label>/*.png``,
    ``root/<percent>/conflict/<label>/*.png``, ``root/valid/*.png``, ``root/test/*.png``
    (``root/train/align/...`` is accepted too). Labels come from the file names
    ``<idx>_<y>_<a>.png``: y = age (0 young, 1 old), a = gender (0 female, 1 male);
    bias-aligned pairs are young women and old men. DisEnt evaluates on the
    bias-conflicting test images only; ``test_conflict_only=true`` does the same, the
    default keeps every test image so all four groups can be measured.
    """
    root = require_root(root, "bffhq")
    train, valid, test = _align_conflict_dirs(root, percent, "bffhq")
    frame, info = read_align_conflict(
        root,
        "bffhq",
        {"train": [train / "align", train / "conflict"], "val": [valid], "test": [test]},
        2,
        2,
    )
    if test_conflict_only:
        frame = frame[(frame["split"] != "test") | (frame["y"] != frame["a"])]
    if frame.empty:
        raise DataError(f"bffhq: no labelled images (<idx>_<y>_<a>.png) found under {root}")
    info |= {"root": str(root), "percent": percent, "test_conflict_only": test_conflict_only}
    return GroupTable(
        frame=frame,
        store=FolderStore(root),
        class_names=["young", "old"],
        attr_names=["female", "male"],
        name="bffhq",
        info=info,
    )


@reader("dogs_cats")
def read_dogs_cats(
    root: Path,
    percent: str = "1pct",
    csv: str | None = None,
    class_names: list[str] | None = None,
    attr_names: list[str] | None = None,
) -> GroupTable:
    """Dogs & Cats with a colour bias (Kim et al. 2019, as re-released by BiasEnsemble).

    Layouts, tried in order:

    - ``csv=<file>``: a canonical ``filename,y,a,split`` CSV relative to ``root`` (the
      ``csv`` reader's format);
    - the BiasEnsemble / DiffInject release: ``root/<percent>/align/<y>/``,
      ``root/<percent>/conflict/<y>/``, ``root/<percent>/valid/`` (or ``root/valid``) and
      ``root/test/``, file names ending in ``_<y>_<a>.<ext>``;
    - ``root/<split>/<class>/<attribute>/`` folders (the ``folders`` reader).

    y: 0 cat, 1 dog. a is the fur colour the release pairs with each class (a = y is
    bias-aligned); the release does not name the colours, so the default attribute
    names say which class each colour goes with. Override with ``attr_names``.
    """
    root = require_root(root, "dogs_cats")
    classes = list(class_names or ["cat", "dog"])
    attrs = list(attr_names or ["cat-typical colour", "dog-typical colour"])
    if csv is not None:
        from unspur.data.readers.csv_table import read_csv_table

        table = read_csv_table(root, csv=csv, class_names=classes, attr_names=attrs)
        table.name = "dogs_cats"
        return table
    if (
        (root / percent).is_dir()
        or (root / "train" / "align").is_dir()
        or (root / "align").is_dir()
    ):
        train, valid, test = _align_conflict_dirs(root, percent, "dogs_cats")
        frame, info = read_align_conflict(
            root,
            "dogs_cats",
            {"train": [train / "align", train / "conflict"], "val": [valid], "test": [test]},
            len(classes),
            len(attrs),
        )
        if frame.empty:
            raise DataError(f"dogs_cats: no labelled images (*_<y>_<a>.<ext>) under {root}")
        info |= {"root": str(root), "percent": percent, "layout": "align/conflict"}
        return GroupTable(
            frame=frame,
            store=FolderStore(root),
            class_names=classes,
            attr_names=attrs,
            name="dogs_cats",
            info=info,
        )
    if find_split_dirs(root):
        table = read_folders(root, class_names=class_names, attr_names=attr_names)
        table.name = "dogs_cats"
        return table
    raise DataError(
        f"dogs_cats: {root} has neither {percent}/align/ (the BiasEnsemble release), "
        "<split>/<class>/<attribute>/ folders, nor was csv=<file> given"
    )
