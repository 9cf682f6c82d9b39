"""Readers for benchmarks shipped as files: native-format fixtures, errors, real data.

Each fixture writes a few tiny images per group in the benchmark's own layout under
``tmp_path``; the real-data tests use ``../shared/data`` and skip when it is absent.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unspur.data import GroupTable, load_dataset
from unspur.data.store import BytesStore
from unspur.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNSPUR_SHARED_DATA", REPO.parent / "shared" / "data"))


def write_image(path: Path, colour: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (colour % 256, 40, 90)).save(path, format=fmt)
    return path


def image_bytes(colour: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour % 256, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime, to prove nothing was written."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def group_counts(table: GroupTable, split: str | None = None) -> dict[tuple[int, int], int]:
    frame = table.frame if split is None else table.frame[table.frame["split"] == split]
    return {k: int(v) for k, v in frame.groupby(["y", "a"]).size().items()}


def assert_images_open(table: GroupTable, n: int = 3) -> None:
    for name in table.frame["filename"].head(n):
        assert table.store.open(name).size == (8, 8)


# --------------------------------------------------------------------------- waterbirds


def make_waterbirds(root: Path, per_cell: int = 2) -> Path:
    rows = []
    i = 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for _ in range(per_cell):
                    i += 1
                    name = f"{y:03d}.Species_{y}/Bird_{i:04d}.jpg"
                    write_image(root / name, i)
                    rows.append((i, name, y, split, place, f"/b/bamboo/{i}.jpg"))
    columns = ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "metadata.csv", index=False)
    return root


def test_waterbirds_reads_group_dro_metadata(tmp_path: Path) -> None:
    root = make_waterbirds(tmp_path / "waterbird_complete95_forest2water2")
    before = snapshot(root)
    table = load_dataset("waterbirds", root)
    assert table.class_names == ["landbird", "waterbird"]
    assert table.attr_names == ["land", "water"]
    assert table.frame["split"].value_counts().to_dict() == {"train": 8, "val": 8, "test": 8}
    assert group_counts(table, "train") == {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2}
    assert "place_filename" in table.frame.columns
    assert_images_open(table)
    assert snapshot(root) == before


def test_waterbirds_missing_images_are_counted(tmp_path: Path) -> None:
    root = make_waterbirds(tmp_path / "wb")
    removed = sorted(root.rglob("Bird_000[12].jpg"))
    for path in removed:
        path.unlink()
    with pytest.raises(DataError, match=r"2 image file\(s\).*Bird_0001\.jpg.*check_files"):
        load_dataset("waterbirds", root)
    assert len(load_dataset("waterbirds", root, check_files="false").frame) == 24


def test_waterbirds_missing_metadata_says_how_to_fix(tmp_path: Path) -> None:
    make_waterbirds(tmp_path / "waterbird_complete95_forest2water2")
    with pytest.raises(DataError, match=r"metadata\.csv.*waterbird_complete95_forest2water2"):
        load_dataset("waterbirds", tmp_path)


def test_waterbirds_path_escaping_root_is_refused(tmp_path: Path) -> None:
    root = make_waterbirds(tmp_path / "wb")
    frame = pd.read_csv(root / "metadata.csv")
    frame.loc[3, "img_filename"] = "../../etc/passwd"
    frame.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"row 4 .*escapes the data root"):
        load_dataset("waterbirds", root, check_files=False)


def test_waterbirds_bad_split_code_names_row_and_column(tmp_path: Path) -> None:
    root = make_waterbirds(tmp_path / "wb")
    frame = pd.read_csv(root / "metadata.csv")
    frame.loc[5, "split"] = 3
    frame.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"row 6 \(line 7\), column 'split': 3"):
        load_dataset("waterbirds", root)


def test_waterbirds_real_metadata(shared_data: Path) -> None:
    table = load_dataset("waterbirds", shared_data / "waterbirds", check_files=False)
    assert table.frame["split"].value_counts().to_dict() == {
        "train": 4795,
        "val": 1199,
        "test": 5794,
    }
    assert group_counts(table, "train") == {(0, 0): 3525, (0, 1): 186, (1, 0): 54, (1, 1): 1030}


# --------------------------------------------------------------------------- celeba

ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Smiling"]
# filename -> (Blond_Hair, Male, partition); two images per (y, a) in train.
CELEBA_ROWS = {
    f"{i:06d}.jpg": (blond, male, part)
    for i, (blond, male, part) in enumerate(
        [(b, m, 0) for b in (0, 1) for m in (0, 1) for _ in range(2)]
        + [(0, 0, 1), (1, 1, 1), (0, 1, 2), (1, 0, 2)],
        start=1,
    )
}


def make_celeba(root: Path, kaggle: bool = False) -> Path:
    images = root / "img_align_celeba"
    if kaggle:
        images = images / "img_align_celeba"
    for i, name in enumerate(CELEBA_ROWS):
        write_image(images / name, i, fmt="JPEG")

    def pm(v: int) -> int:
        return 1 if v else -1

    if kaggle:
        rows = [[name, -1, pm(b), pm(m), 1] for name, (b, m, _) in CELEBA_ROWS.items()]
        pd.DataFrame(rows, columns=["image_id", *ATTRS]).to_csv(
            root / "list_attr_celeba.csv", index=False
        )
        parts = [[name, p] for name, (_, _, p) in CELEBA_ROWS.items()]
        pd.DataFrame(parts, columns=["image_id", "partition"]).to_csv(
            root / "list_eval_partition.csv", index=False
        )
    else:
        lines = [str(len(CELEBA_ROWS)), " ".join(ATTRS) + " "]
        for name, (b, m, _) in CELEBA_ROWS.items():
            lines.append(f"{name} -1  {pm(b):2d} {pm(m):2d}  1")
        (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        partition = "".join(f"{name} {p}\n" for name, (_, _, p) in CELEBA_ROWS.items())
        (root / "list_eval_partition.txt").write_text(partition)
    return root


@pytest.mark.parametrize("kaggle", [False, True])
def test_celeba_reads_original_and_kaggle_layouts(tmp_path: Path, kaggle: bool) -> None:
    root = make_celeba(tmp_path, kaggle=kaggle)
    before = snapshot(root)
    table = load_dataset("celeba", root)
    assert table.class_names == ["not Blond_Hair", "Blond_Hair"]
    assert table.attr_names == ["not Male", "Male"]
    assert group_counts(table, "train") == {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2}
    assert table.frame["split"].value_counts().to_dict() == {"train": 8, "val": 2, "test": 2}
    first = table.frame.iloc[0]
    assert (first["filename"].split("/")[-1], first["y"], first["a"]) == ("000001.jpg", 0, 0)
    assert_images_open(table)
    assert snapshot(root) == before


def test_celeba_other_attributes(tmp_path: Path) -> None:
    table = load_dataset("celeba", make_celeba(tmp_path), target="Smiling", bias="blond_hair")
    assert table.class_names == ["not Smiling", "Smiling"]
    assert table.attr_names == ["not Blond_Hair", "Blond_Hair"]
    assert set(table.frame["y"]) == {1}


def test_celeba_unknown_attribute_lists_close_matches(tmp_path: Path) -> None:
    root = make_celeba(tmp_path)
    with pytest.raises(ConfigError, match=r"Blond_Hiar.*Did you mean Blond_Hair.*Attributes: "):
        load_dataset("celeba", root, target="Blond_Hiar")
    with pytest.raises(ConfigError, match="both 'Male'"):
        load_dataset("celeba", root, target="Male")


def test_celeba_missing_partition_file_names_it(tmp_path: Path) -> None:
    root = make_celeba(tmp_path)
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match=r"list_eval_partition\.txt.*not found"):
        load_dataset("celeba", root)


def test_celeba_bad_attribute_value_names_row(tmp_path: Path) -> None:
    root = make_celeba(tmp_path)
    path = root / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace(" -1 ", " 7 ", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 3 \(line 5\).*'5_o_Clock_Shadow': '?7"):
        load_dataset("celeba", root)


def make_celeba_hq(root: Path, n: int = 40) -> Path:
    lines = [str(n), " ".join(ATTRS)]
    for i in range(n):
        b, m = (i // 2) % 2, i % 2
        lines.append(f"{i}.jpg -1 {1 if b else -1} {1 if m else -1} 1")
        write_image(root / "CelebA-HQ-img" / f"{i}.jpg", i, fmt="JPEG")
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(lines) + "\n")
    return root


def test_celeba_hq_seeded_split(tmp_path: Path) -> None:
    root = make_celeba_hq(tmp_path / "CelebAMask-HQ")
    table = load_dataset("celeba_hq", root, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert len(table.frame) == 40
    assert group_counts(table) == {(0, 0): 10, (0, 1): 10, (1, 0): 10, (1, 1): 10}
    # 10 per group: 1 val, 2 test, 7 train, in every group
    for split, n in (("train", 7), ("val", 1), ("test", 2)):
        assert set(group_counts(table, split).values()) == {n}
    again = load_dataset("celeba_hq", root, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert again.frame["split"].tolist() == table.frame["split"].tolist()
    assert table.info["split_source"].startswith("seeded")
    assert_images_open(table)
    # the zip's own top folder is accepted as root too
    assert len(load_dataset("celeba_hq", tmp_path).frame) == 40


def test_celeba_hq_split_from_celeba_mapping(tmp_path: Path) -> None:
    root = make_celeba_hq(tmp_path, n=8)
    mapping = ["idx orig_idx orig_file"] + [
        f"{i} {100 + i} {100 + i + 1:06d}.jpg" for i in range(8)
    ]
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(mapping) + "\n")
    parts = [0, 0, 0, 0, 1, 1, 2, 2]
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{100 + i + 1:06d}.jpg {p}\n" for i, p in enumerate(parts))
    )
    table = load_dataset("celeba_hq", root)
    assert table.frame["split"].tolist() == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    assert "mapping" in table.info["split_source"]


# --------------------------------------------------------------------------- utkface

UTK_NAMES = [
    # age, gender, race
    *(
        f"{age}_{g}_{r}_2017010{i}000000000.jpg.chip.jpg"
        for i, (age, g, r) in enumerate(
            [
                (5, 0, 0),
                (8, 0, 1),
                (3, 1, 2),
                (10, 1, 3),
                (25, 0, 0),
                (40, 0, 4),
                (30, 1, 1),
                (64, 1, 2),
                (15, 0, 0),
                (19, 1, 0),
            ]
        )
    ),
    "39_1_20170116174525125.jpg.chip.jpg",  # no race: malformed, as in the release
]


def make_utkface_folder(root: Path) -> Path:
    for i, name in enumerate(UTK_NAMES):
        write_image(root / "UTKFace" / name, i, fmt="JPEG")
    return root


def make_utkface_archive(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "UTKFace.tar.gz", "w:gz") as archive:
        directory = tarfile.TarInfo("UTKFace")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for i, name in enumerate(UTK_NAMES):
            data = image_bytes(i)
            info = tarfile.TarInfo(f"UTKFace/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return root


@pytest.mark.parametrize("make", [make_utkface_folder, make_utkface_archive])
def test_utkface_gender_with_age_bias(tmp_path: Path, make) -> None:
    root = make(tmp_path / "utk")
    before = snapshot(root)
    table = load_dataset("utkface", root, val_fraction=0, test_fraction=0)
    assert table.class_names == ["male", "female"]
    assert table.attr_names == ["child (age<=10)", "adult (age>=20)"]
    assert group_counts(table) == {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2}
    assert table.info["malformed_files"] == 1
    assert table.info["malformed_examples"] == ["UTKFace/39_1_20170116174525125.jpg.chip.jpg"]
    assert table.info["dropped_by_age"] == 2  # ages 15 and 19
    assert table.info["n_files"] == len(UTK_NAMES)
    if make is make_utkface_archive:
        assert isinstance(table.store, BytesStore)
    assert_images_open(table, n=8)
    assert snapshot(root) == before


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_a_truncated_utkface_archive_is_named(tmp_path: Path, cut: float) -> None:
    """A download cut short (inside the gzip stream, or in its trailer) is a DataError
    that names the archive and says to fetch it again, not a zlib traceback."""
    root = make_utkface_archive(tmp_path / "utk")
    archive = root / "UTKFace.tar.gz"
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(DataError, match=r"UTKFace\.tar\.gz.*fetch it again"):
        load_dataset("utkface", root)


def test_utkface_race_target_and_split_options(tmp_path: Path) -> None:
    root = make_utkface_folder(tmp_path)
    table = load_dataset("utkface", root, target="race", bias="gender")
    assert table.class_names == ["White", "Black", "Asian", "Indian", "Others"]
    assert len(table.frame) == 10 and table.info["dropped_by_age"] == 0
    split = load_dataset("utkface", root, target="race", bias="gender", seed=1)
    assert (
        split.frame["split"].tolist()
        == load_dataset("utkface", root, target="race", bias="gender", seed=1)
        .frame["split"]
        .tolist()
    )
    with pytest.raises(ConfigError, match="target='ethnicity' is not one of gender, age, race"):
        load_dataset("utkface", root, target="ethnicity")
    with pytest.raises(ConfigError, match="leaves no training images"):
        load_dataset("utkface", root, val_fraction=0.5, test_fraction=0.5)


def test_utkface_stratified_split_keeps_every_group(tmp_path: Path) -> None:
    root = tmp_path / "UTKFace"
    for i in range(80):
        age, gender = (5 if i % 2 else 30), (i // 2) % 2
        write_image(root / f"{age}_{gender}_0_20170101{i:09d}.jpg.chip.jpg", i, fmt="JPEG")
    table = load_dataset("utkface", root)
    for split, n in (("train", 14), ("val", 2), ("test", 4)):
        assert group_counts(table, split) == {g: n for g in [(0, 0), (0, 1), (1, 0), (1, 1)]}
    other = load_dataset("utkface", root, seed=1)
    assert other.frame["split"].tolist() != table.frame["split"].tolist()


@pytest.fixture(scope="module")
def real_utkface() -> GroupTable:
    archive_dir = SHARED_DATA / "utkface"
    if not (archive_dir / "UTKFace.tar.gz").is_file():
        pytest.skip(f"real data not found at {archive_dir}")
    return load_dataset("utkface", archive_dir)


def test_utkface_real_archive(real_utkface: GroupTable) -> None:
    info = real_utkface.info
    # The archive holds 23,708 members: the UTKFace/ directory and 23,707 JPEGs. Three
    # names lack the race field (39_1_..., 61_1_... twice) and are reported, not fatal.
    assert info["n_files"] == 23707
    assert info["malformed_files"] == 3
    assert "UTKFace/39_1_20170116174525125.jpg.chip.jpg" in info["malformed_examples"]
    kept = len(real_utkface.frame) + info["dropped_by_age"] + info["malformed_files"]
    assert kept == 23707
    assert set(group_counts(real_utkface)) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert real_utkface.store.open(real_utkface.frame["filename"].iloc[0]).size == (200, 200)


# --------------------------------------------------------------------------- metashift


def make_metashift(root: Path, per_context: int = 4, parens: bool = False) -> Path:
    contexts = {"cat": ["sofa", "bed", "shelf", "computer"], "dog": ["bench", "bike", "shelf"]}
    for cls, names in contexts.items():
        for context in names:
            folder = f"{cls}({context})" if parens else context
            for i in range(per_context):
                write_image(root / cls / folder / f"{cls}_{context}_{i}.jpg", i, fmt="JPEG")
    return root


@pytest.mark.parametrize("parens", [False, True])
def test_metashift_dbb_protocol(tmp_path: Path, parens: bool) -> None:
    root = make_metashift(tmp_path / "ms", parens=parens)
    before = snapshot(root)
    table = load_dataset("metashift", root)
    assert table.class_names == ["cat", "dog"]
    assert table.attr_names == ["indoor", "outdoor"]
    assert group_counts(table, "train") == {(0, 0): 8, (1, 1): 8}
    assert group_counts(table, "val") == {(0, 0): 2, (1, 0): 2}
    assert group_counts(table, "test") == {(0, 0): 2, (1, 0): 2}
    test = table.frame[table.frame["split"] != "train"]
    assert set(test["context"]) == {"shelf"}
    assert table.info["ignored_contexts"] == {"cat(computer)": 4}
    assert_images_open(table)
    assert snapshot(root) == before


def test_metashift_options_and_errors(tmp_path: Path) -> None:
    root = make_metashift(tmp_path / "ms")
    table = load_dataset(
        "metashift",
        root,
        attr_groups="sofa=sofa,bed=bed,bench=bench,bike=bike,shelf=shelf",
        val_fraction="0",
    )
    assert table.n_attrs == 5 and "val" not in set(table.frame["split"])
    with pytest.raises(ConfigError, match="must look like 'name=context"):
        load_dataset("metashift", root, train_contexts="cat-sofa")
    with pytest.raises(ConfigError, match="'computer' has no attribute"):
        load_dataset("metashift", root, train_contexts="cat=sofa+computer,dog=bench")
    with pytest.raises(DataError, match=r"no images for dog\(table\)"):
        load_dataset(
            "metashift",
            root,
            test_contexts="cat=shelf,dog=table",
            attr_groups="indoor=sofa+bed+shelf+table,outdoor=bench+bike",
        )


def test_metashift_presplit_folders(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        make_metashift(tmp_path / split, per_context=1)
    table = load_dataset("metashift", tmp_path)
    assert table.info["layout"] == "split folders"
    assert table.frame["split"].value_counts().to_dict() == {"train": 6, "val": 6, "test": 6}


# --------------------------------------------------------------------------- folders


def test_generic_folders_with_splits(tmp_path: Path) -> None:
    for split in ("train", "valid", "test"):
        for cls in ("cat", "dog"):
            for attr in ("indoor", "outdoor"):
                for i in range(2):
                    write_image(tmp_path / split / cls / attr / f"{i}.png", i)
    table = load_dataset("folders", tmp_path, attr_names="outdoor,indoor")
    assert table.class_names == ["cat", "dog"]
    assert table.attr_names == ["outdoor", "indoor"]
    assert table.frame["split"].value_counts().to_dict() == {"train": 8, "val": 8, "test": 8}
    row = table.frame[table.frame["filename"] == "train/dog/indoor/0.png"].iloc[0]
    assert (row["y"], row["a"]) == (1, 1)
    assert_images_open(table)
    with pytest.raises(DataError, match=r"attr folder\(s\) \['outdoor'\]"):
        load_dataset("folders", tmp_path, attr_names="indoor")


def test_generic_folders_without_splits_are_split_by_seed(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for attr in ("x", "y"):
            for i in range(10):
                write_image(tmp_path / cls / attr / f"{i}.png", i)
    table = load_dataset("folders", tmp_path, val_fraction=0.2, test_fraction=0.3)
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        assert set(group_counts(table, split).values()) == {n}


def test_spuco_animals_released_layout(tmp_path: Path) -> None:
    layout = {
        "spuco_birds": {"landbirds": ["land", "water"], "waterbirds": ["land", "water"]},
        "spuco_dogs": {"small_dogs": ["indoor", "outdoor"], "big_dogs": ["indoor", "outdoor"]},
    }
    for dataset, classes in layout.items():
        for split in ("train", "val", "test"):
            for cls, contexts in classes.items():
                for context in contexts:
                    write_image(tmp_path / dataset / split / cls / context / "0.jpg", fmt="JPEG")
    table = load_dataset("spuco_animals", tmp_path)
    assert table.class_names == ["landbird", "waterbird", "small_dog", "big_dog"]
    assert table.attr_names == ["land", "water", "indoor", "outdoor"]
    assert len(group_counts(table, "train")) == 8 and len(table.frame) == 24
    row = table.frame[table.frame["filename"] == "spuco_dogs/val/big_dogs/indoor/0.jpg"].iloc[0]
    assert (row["y"], row["a"], row["split"]) == (3, 2, "val")
    birds = load_dataset("spuco_animals", tmp_path, subset="birds")
    assert birds.class_names == ["landbird", "waterbird"] and len(birds.frame) == 12
    with pytest.raises(ConfigError, match="subset='cats'"):
        load_dataset("spuco_animals", tmp_path, subset="cats")


def test_spuco_animals_flat_sample(tmp_path: Path) -> None:
    for prefix in ("ll", "lw", "wl", "ww", "si", "so", "bi", "bo"):
        for i in range(1, 5):
            write_image(tmp_path / f"{prefix}{i}.png", i)
    write_image(tmp_path / "notes.png")  # not a sample name: ignored
    table = load_dataset("spuco_animals", tmp_path)
    assert len(table.frame) == 32
    assert set(group_counts(table).values()) == {4} and len(group_counts(table)) == 8
    assert table.frame["split"].value_counts().to_dict() == {"train": 16, "val": 8, "test": 8}
    dogs = load_dataset("spuco_animals", tmp_path, subset="dogs")
    assert group_counts(dogs) == {(0, 0): 4, (0, 1): 4, (1, 0): 4, (1, 1): 4}
    row = dogs.frame[dogs.frame["filename"] == "bi2.png"].iloc[0]
    assert (dogs.class_names[row["y"]], dogs.attr_names[row["a"]]) == ("big_dog", "indoor")


def test_spuco_animals_real_sample(shared_data: Path) -> None:
    table = load_dataset("spuco_animals", shared_data / "spuco_animals")
    assert len(table.frame) == 32
    assert len(group_counts(table)) == 8 and set(group_counts(table).values()) == {4}
    assert table.store.open(table.frame["filename"].iloc[0]).size == (224, 224)
    birds = load_dataset("spuco_animals", shared_data / "spuco_animals", subset="birds")
    assert group_counts(birds) == {(0, 0): 4, (0, 1): 4, (1, 0): 4, (1, 1): 4}


def make_align_conflict(root: Path, percent: str, valid_in_percent: bool) -> Path:
    i = 0
    for y in (0, 1):
        for a in (0, 1):
            kind = "align" if y == a else "conflict"
            for _ in range(3 if y == a else 1):
                i += 1
                write_image(root / percent / kind / str(y) / f"{i}_{y}_{a}.png", i)
            valid = root / percent / "valid" if valid_in_percent else root / "valid"
            write_image(valid / f"{100 + i}_{y}_{a}.png", i)
            write_image(root / "test" / str(y) / f"{200 + i}_{y}_{a}.png", i)
    return root


def test_bffhq_release_layout(tmp_path: Path) -> None:
    root = make_align_conflict(tmp_path / "bffhq", "0.5pct", valid_in_percent=False)
    write_image(root / "valid" / "readme.png")  # no labels in the name: skipped, counted
    before = snapshot(root)
    table = load_dataset("bffhq", root)
    assert table.class_names == ["young", "old"] and table.attr_names == ["female", "male"]
    assert group_counts(table, "train") == {(0, 0): 3, (0, 1): 1, (1, 0): 1, (1, 1): 3}
    assert group_counts(table, "val") == {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1}
    assert table.info["train_conflict_fraction"] == 0.25
    assert table.info["unlabelled_files"] == 1
    assert_images_open(table)
    conflict = load_dataset("bffhq", root, test_conflict_only=True)
    assert group_counts(conflict, "test") == {(0, 1): 1, (1, 0): 1}
    assert snapshot(root) == before
    with pytest.raises(DataError, match="percent=0.5pct"):
        load_dataset("bffhq", root / "0.5pct")
    with pytest.raises(DataError, match=r"no training folder .*1pct/align"):
        load_dataset("bffhq", root, percent="1pct")


def test_dogs_cats_release_and_csv_layouts(tmp_path: Path) -> None:
    root = make_align_conflict(tmp_path / "dogs_and_cats", "5pct", valid_in_percent=True)
    table = load_dataset("dogs_cats", root, percent="5pct")
    assert table.class_names == ["cat", "dog"]
    assert group_counts(table, "train") == {(0, 0): 3, (0, 1): 1, (1, 0): 1, (1, 1): 3}
    assert len(table.split("val").frame) == 4 and len(table.split("test").frame) == 4

    csv_root = tmp_path / "csv"
    write_image(csv_root / "img" / "c.png")
    write_image(csv_root / "img" / "d.png")
    (csv_root / "table.csv").write_text(
        "filename,y,a,split\nimg/c.png,0,1,train\nimg/d.png,1,0,test\n"
    )
    from_csv = load_dataset("dogs_cats", csv_root, csv="table.csv")
    assert from_csv.class_names == ["cat", "dog"] and from_csv.name == "dogs_cats"
    assert group_counts(from_csv) == {(0, 1): 1, (1, 0): 1}
    with pytest.raises(DataError, match="neither"):
        load_dataset("dogs_cats", tmp_path / "csv")


# --------------------------------------------------------------------------- csv


def make_csv(root: Path, text: str, images: list[str]) -> Path:
    for name in images:
        write_image(root / name)
    (root / "metadata.csv").write_text(text)
    return root


def test_csv_reader(tmp_path: Path) -> None:
    text = (
        "filename,y,a,split,mask,source,prompt\n"
        "img/0.png,0,0,train,masks/0.png,real,\n"
        "img/1.png,1,1,train,,synthetic,a dog on grass\n"
        "img/2.png,1,0,val,,,\n"
        "img/3.png,0,1,test,,real,\n"
    )
    root = make_csv(tmp_path, text, [f"img/{i}.png" for i in range(4)] + ["masks/0.png"])
    table = load_dataset("csv", root, class_names="cat,dog")
    assert table.class_names == ["cat", "dog"]
    assert table.attr_names == ["attr0", "attr1"]
    assert table.frame["source"].tolist() == ["real", "synthetic", "real", "real"]
    assert table.frame["prompt"].iloc[1] == "a dog on grass"
    assert table.mask_store is not None and table.mask_store.open("masks/0.png").size == (8, 8)
    assert_images_open(table)
    with pytest.raises(DataError, match=r"row 2 \(line 3\) has label 1 but class_names lists"):
        load_dataset("csv", root, class_names="cat")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("img/x.png,one,0,train", r"row 3 \(line 4\), column 'y': 'one' is not an integer"),
        ("img/x.png,0,,train", r"row 3 \(line 4\), column 'a': '' is not an integer"),
        ("img/x.png,0,1,training", r"row 3 \(line 4\), column 'split': 'training' is not one"),
        ("../x.png,0,1,train", r"row 3 \(line 4\), column 'filename'.*escapes the data root"),
        ("img/x.png,0,-1,train", r"row 3 \(line 4\), column 'a': -1 is negative"),
    ],
)
def test_csv_bad_rows_name_row_and_column(tmp_path: Path, row: str, message: str) -> None:
    text = "filename,y,a,split\nimg/0.png,0,0,train\nimg/1.png,1,1,val\n" + row + "\n"
    root = make_csv(tmp_path, text, ["img/0.png", "img/1.png", "img/x.png"])
    with pytest.raises(DataError, match=message):
        load_dataset("csv", root)


def test_csv_missing_file_and_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"metadata file .*metadata\.csv not found.*csv="):
        load_dataset("csv", tmp_path)
    make_csv(tmp_path, "filename,label,split\na.png,0,train\n", ["a.png"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['y', 'a'\]"):
        load_dataset("csv", tmp_path)
    make_csv(tmp_path, "filename,y,a,split\na.png,0,0,train\nb.png,0,0,train\n", [])
    with pytest.raises(DataError, match=r"1 image file\(s\).*b\.png"):
        load_dataset("csv", tmp_path)
    assert len(load_dataset("csv", tmp_path, check_files=False).frame) == 2


def test_readers_need_a_root() -> None:
    for name in ("waterbirds", "celeba", "utkface", "metashift", "csv", "folders"):
        with pytest.raises(ConfigError, match="pass the folder"):
            load_dataset(name, None)


def test_registry_knows_the_file_readers() -> None:
    from unspur.data import available_datasets

    names = set(available_datasets())
    expected = {"waterbirds", "celeba", "celeba_hq", "utkface", "metashift", "spuco_animals"}
    assert expected | {"bffhq", "dogs_cats", "folders", "csv"} <= names
    assert np.all([isinstance(n, str) for n in names])


def test_csv_majority_option_declares_the_resplit_direction(tmp_path):
    """A generic CSV whose classes share their largest attribute cannot say which attribute
    is bias-aligned; ``majority=`` declares it and the resplit keeps that direction."""
    from unspur.data.registry import load_dataset
    from unspur.data.resplit import resplit_bias
    from unspur.errors import UnspurError

    rows = ["filename,y,a,split"]
    # Both classes: attribute 1 most frequent; weak association, so the data cannot decide.
    counts = {(0, 0): 40, (0, 1): 60, (1, 0): 45, (1, 1): 55}
    for (y, a), n in counts.items():
        for i in range(n):
            rows.append(f"img_{y}_{a}_{i}.png,{y},{a},train")
    rows += ["v0.png,0,0,val", "v1.png,1,1,test"]
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    options = {
        "check_files": False,
        "class_names": ["male", "female"],
        "attr_names": ["child", "adult"],
    }
    with pytest.raises(UnspurError, match="data.options.majority"):
        resplit_bias(load_dataset("csv", tmp_path, **options), 0.9)
    table = load_dataset("csv", tmp_path, **options, majority=["child", "adult"])
    kept = resplit_bias(table, 0.9).frame
    train = kept[kept["split"] == "train"]
    male, female = train[train["y"] == 0], train[train["y"] == 1]
    assert (male["a"] == 0).mean() == pytest.approx(0.9, abs=0.02)
    assert (female["a"] == 1).mean() == pytest.approx(0.9, abs=0.02)
