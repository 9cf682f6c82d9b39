"""``metashift``: MetaShift cat-vs-dog with context shift, as set up in the DBB paper.

MetaShift (Liang & Zou 2022) groups Visual Genome images by (class, context). The
folder layout read here is ``root/<class>/<context>/*.jpg``; context folders may be
named ``sofa`` or MetaShift's ``cat(sofa)``. A pre-split ``root/<split>/<class>/
<context>/`` is read as given.

Default protocol (DBB, following MetaShift's subpopulation-shift task): train on
cat(sofa), cat(bed), dog(bench), dog(bike); evaluate on cat(shelf) and dog(shelf), with
``val_fraction`` of each shelf group moved to val by ``seed``.

The attribute ``a`` is where the context sits on the spurious axis, not the raw context:
``indoor`` (sofa, bed, shelf) = 0, ``outdoor`` (bench, bike) = 1. Training is then fully
spurious (cats indoor, dogs outdoor) and on the shelf test set cat(shelf) is the
bias-aligned group and dog(shelf) the bias-conflicting one, so test worst-group accuracy
is the dog(shelf) vs cat(shelf) minimum that the protocol is about. Giving shelf its own
attribute instead would leave every test group without a training counterpart and make
group labels uninformative about the bias; set ``attr_groups`` to change the mapping
(``name=context+context``, one entry per attribute).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from unspur.data.layout import (
    assign_splits,
    find_split_dirs,
    list_images,
    relative,
    require_root,
    subdirs,
    walk_class_attr,
)
from unspur.data.registry import reader
from unspur.data.store import FolderStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError, DataError

_CONTEXT_IN_PARENS = re.compile(r"^[^()]*\(([^()]+)\)$")


def context_name(folder: str) -> str:
    """``cat(sofa)`` -> ``sofa``; ``sofa`` -> ``sofa``."""
    match = _CONTEXT_IN_PARENS.match(folder.strip())
    return (match.group(1) if match else folder).strip().lower()


def parse_assignments(entries: list[str], option: str) -> list[tuple[str, list[str]]]:
    """``["cat=sofa+bed", "dog=bench"]`` -> ``[("cat", ["sofa", "bed"]), ("dog", ["bench"])]``."""
    parsed: list[tuple[str, list[str]]] = []
    for entry in entries:
        name, sep, rest = entry.partition("=")
        values = [v.strip().lower() for v in rest.split("+") if v.strip()]
        if not sep or not name.strip() or not values:
            raise ConfigError(
                f"dataset 'metashift': {option} entry {entry!r} must look like "
                "'name=context+context' (e.g. cat=sofa+bed)"
            )
        parsed.append((name.strip(), values))
    return parsed


@reader("metashift")
def read_metashift(
    root: Path,
    train_contexts: list[str] = ["cat=sofa+bed", "dog=bench+bike"],  # noqa: B006
    test_contexts: list[str] = ["cat=shelf", "dog=shelf"],  # noqa: B006
    attr_groups: list[str] = ["indoor=sofa+bed+shelf", "outdoor=bench+bike"],  # noqa: B006
    val_fraction: float = 0.5,
    seed: int = 0,
) -> GroupTable:
    """MetaShift cat/dog by context; defaults reproduce the DBB protocol (see module doc).

    ``train_contexts``/``test_contexts`` are ``class=context+context`` entries (their
    class order sets y); ``attr_groups`` maps contexts to attributes (its order sets a);
    ``val_fraction`` of each test-context group goes to val, drawn by ``seed``. Images
    in contexts the protocol does not name are ignored and counted in ``info``.
    """
    root = require_root(root, "metashift")
    train = parse_assignments(train_contexts, "train_contexts")
    test = parse_assignments(test_contexts, "test_contexts")
    groups = parse_assignments(attr_groups, "attr_groups")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"dataset 'metashift': val_fraction={val_fraction} must be in [0, 1)")

    class_names: list[str] = []
    for name, _ in train + test:
        if name not in class_names:
            class_names.append(name)
    attr_of: dict[str, int] = {}
    for index, (_, contexts) in enumerate(groups):
        for context in contexts:
            if context in attr_of:
                raise ConfigError(
                    f"dataset 'metashift': context {context!r} is in two attr_groups entries"
                )
            attr_of[context] = index
    attr_names = [name for name, _ in groups]
    role: dict[tuple[str, str], str] = {}
    for split, assignment in (("train", train), ("test", test)):
        for name, contexts in assignment:
            for context in contexts:
                if (name, context) in role:
                    raise ConfigError(
                        f"dataset 'metashift': {name}({context}) is in both train_contexts "
                        "and test_contexts; an image can only be in one split"
                    )
                if context not in attr_of:
                    raise ConfigError(
                        f"dataset 'metashift': context {context!r} has no attribute; add it "
                        f"to attr_groups (now {attr_groups})"
                    )
                role[(name, context)] = split

    split_dirs = find_split_dirs(root)
    ignored: dict[str, int] = {}
    records: list[tuple[str, int, int, str, str]] = []
    if split_dirs:
        layout = "split folders"
        for split, directory in split_dirs.items():
            for filename, class_dir, context_dir in walk_class_attr(directory, root):
                context = context_name(context_dir)
                if class_dir not in class_names or context not in attr_of:
                    key = f"{class_dir}({context})"
                    ignored[key] = ignored.get(key, 0) + 1
                    continue
                records.append(
                    (filename, class_names.index(class_dir), attr_of[context], split, context)
                )
    else:
        layout = "class/context folders"
        for class_dir in subdirs(root):
            for context_dir in subdirs(class_dir):
                context = context_name(context_dir.name)
                split = role.get((class_dir.name, context))
                if split is None:
                    key = f"{class_dir.name}({context})"
                    ignored[key] = ignored.get(key, 0) + len(list_images(context_dir))
                    continue
                y = class_names.index(class_dir.name)
                for path in list_images(context_dir):
                    records.append((relative(path, root), y, attr_of[context], split, context))
        absent = sorted(
            f"{name}({context})"
            for (name, context) in role
            if not any(r[4] == context and class_names[r[1]] == name for r in records)
        )
        if absent:
            raise DataError(
                f"metashift: no images for {', '.join(absent)} under {root}; expected "
                "folders root/<class>/<context>/ (or <class>(<context>)) with images. "
                f"Class folders present: {[p.name for p in subdirs(root)]}"
            )
    if not records:
        raise DataError(
            f"metashift: no images found under {root} for classes {class_names}; expected "
            "root/<class>/<context>/*.jpg or root/<split>/<class>/<context>/*.jpg"
        )
    frame = pd.DataFrame(records, columns=["filename", "y", "a", "split", "context"])
    frame = frame.astype({"y": np.int64, "a": np.int64})
    if layout == "class/context folders":
        test_rows = frame["split"].to_numpy() == "test"
        part = frame[test_rows]
        frame.loc[test_rows, "split"] = assign_splits(
            part, val_fraction, 0.0, seed, by=("y", "a", "context")
        )
        frame.loc[test_rows, "split"] = frame.loc[test_rows, "split"].map(
            {"val": "val", "train": "test"}
        )
    return GroupTable(
        frame=frame,
        store=FolderStore(root),
        class_names=class_names,
        attr_names=attr_names,
        name="metashift",
        info={
            "root": str(root),
            "layout": layout,
            "ignored_contexts": ignored,
            "split_source": "folders"
            if layout == "split folders"
            else f"train/test by context; val = {val_fraction} of test contexts (seed={seed})",
        },
    )
