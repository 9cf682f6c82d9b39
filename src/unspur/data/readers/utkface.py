"""``utkface``: UTKFace faces, labels parsed from the file names.

UTKFace ships as ``UTKFace.tar.gz`` (members under ``UTKFace/``) or an extracted folder
of ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg`` files: gender 0 male / 1 female, race
0-4 = White, Black, Asian, Indian, Others. The archive is read into memory once (about
100 MB) and never extracted, so nothing is written under the data root.

A few released names are malformed (e.g. ``39_1_20170116174525125.jpg.chip.jpg`` has no
race field); they are skipped and reported in ``info`` instead of failing the load.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pandas as pd

from unspur.data.layout import (
    assign_splits,
    check_fractions,
    is_image,
    list_images,
    relative,
)
from unspur.data.registry import reader
from unspur.data.store import BytesStore, FolderStore, ImageStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError, DataError

RACES = ["White", "Black", "Asian", "Indian", "Others"]
ATTRIBUTES = ("gender", "age", "race")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def parse_name(name: str) -> tuple[int, int, int] | None:
    """``(age, gender, race)`` from ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg``, or None."""
    parts = name.rsplit("/", 1)[-1].split("_")
    if len(parts) < 4:
        return None
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if age < 0 or gender not in (0, 1) or not 0 <= race < len(RACES):
        return None
    return age, gender, race


def _names(attribute: str, child_max_age: int, adult_min_age: int) -> list[str]:
    if attribute == "gender":
        return ["male", "female"]
    if attribute == "age":
        return [f"child (age<={child_max_age})", f"adult (age>={adult_min_age})"]
    return list(RACES)


def _label(attribute: str, age: int, gender: int, race: int, child: int, adult: int):
    if attribute == "gender":
        return gender
    if attribute == "race":
        return race
    return 0 if age <= child else 1 if age >= adult else None


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


@reader("utkface")
def read_utkface(
    root: Path,
    target: str = "gender",
    bias: str = "age",
    child_max_age: int = 10,
    adult_min_age: int = 20,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    archive: str = "UTKFace.tar.gz",
) -> GroupTable:
    """UTKFace with y = ``target`` and a = ``bias``, each one of gender, age and race.

    The default (gender with an age bias) follows the seed papers: age is binary, child
    (age <= ``child_max_age``, 10) vs adult (age >= ``adult_min_age``, 20), and the ages
    in between are dropped (counted in ``info["dropped_by_age"]``) whenever age is the
    target or the bias.

    ``root`` is a folder holding ``archive`` (``UTKFace.tar.gz``), a folder holding
    ``UTKFace/`` or the images, or the archive itself. UTKFace has no official split: a
    split is drawn by ``seed``, stratified by group (y, a) so every group keeps
    ``val_fraction`` (0.1) and ``test_fraction`` (0.2) of its images; resplit to a given
    bias ratio downstream if a protocol needs one.
    """
    if root is None:
        raise ConfigError(
            "dataset 'utkface' reads local files: pass the folder holding UTKFace.tar.gz "
            "or the extracted UTKFace/ images"
        )
    for option, value in (("target", target), ("bias", bias)):
        if value not in ATTRIBUTES:
            raise ConfigError(
                f"dataset 'utkface': {option}={value!r} is not one of {', '.join(ATTRIBUTES)}"
            )
    if target == bias:
        raise ConfigError(f"dataset 'utkface': target and bias are both {target!r}; pick two")
    if child_max_age >= adult_min_age:
        raise ConfigError(
            f"dataset 'utkface': child_max_age={child_max_age} must be below "
            f"adult_min_age={adult_min_age}"
        )
    check_fractions(val_fraction, test_fraction, "utkface")
    root = Path(root)

    names: list[str]
    store: ImageStore
    if _is_archive(root) or _is_archive(root / archive):
        path = root if _is_archive(root) else root / archive
        members = _read_archive(path)
        names = sorted(members)
        source = str(path)
    elif root.is_dir():
        folder = root / "UTKFace" if (root / "UTKFace").is_dir() else root
        names = [relative(p, root) for p in list_images(folder)]
        members = None
        source = str(folder)
    else:
        raise DataError(
            f"utkface: {root} is neither a folder nor a .tar.gz archive; pass the folder "
            "holding UTKFace.tar.gz or the extracted images"
        )
    if not names:
        raise DataError(
            f"utkface: no images found in {source}; expected {archive} or files named "
            "AGE_GENDER_RACE_DATETIME.jpg.chip.jpg"
        )

    records: list[tuple[str, int, int, int, int, int]] = []
    malformed: list[str] = []
    dropped = 0
    for name in names:
        parsed = parse_name(name)
        if parsed is None:
            malformed.append(name)
            continue
        age, gender, race = parsed
        y = _label(target, age, gender, race, child_max_age, adult_min_age)
        a = _label(bias, age, gender, race, child_max_age, adult_min_age)
        if y is None or a is None:
            dropped += 1
            continue
        records.append((name, y, a, age, gender, race))
    frame = pd.DataFrame(records, columns=["filename", "y", "a", "age", "gender", "race"])
    frame = frame.astype({"y": "int64", "a": "int64"})
    frame.insert(3, "split", assign_splits(frame, val_fraction, test_fraction, seed))

    if members is not None:
        kept = set(frame["filename"])
        store = BytesStore({k: v for k, v in members.items() if k in kept}, origin=source)
    else:
        store = FolderStore(root)
    info = {
        "source": source,
        "n_files": len(names),
        "malformed_files": len(malformed),
        "malformed_examples": malformed[:10],
        "dropped_by_age": dropped,
        "split_source": f"seeded (seed={seed}, val={val_fraction}, test={test_fraction})",
    }
    return GroupTable(
        frame=frame,
        store=store,
        class_names=_names(target, child_max_age, adult_min_age),
        attr_names=_names(bias, child_max_age, adult_min_age),
        name="utkface",
        info=info,
    )


def _read_archive(path: Path) -> dict[str, bytes]:
    """Every image member of the archive, read in one pass (a .tar.gz is sequential)."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile() or not is_image(Path(member.name)):
                    continue
                handle = archive.extractfile(member)
                if handle is not None:
                    members[member.name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"utkface: cannot read archive {path} ({exc}); the download is incomplete or "
            "corrupted, fetch it again"
        ) from exc
    return members
