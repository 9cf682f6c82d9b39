"""The bias direction of a bias-ratio resplit: from the data, a reader preset, or an
explicit declaration, never a silent guess (issue 17)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unspur.data.registry import load_dataset
from unspur.data.resplit import majority_attributes, resplit_bias
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError, DataError

#: CelebA's training split, y = Blond_Hair, a = Male (group_DRO's counts).
CELEBA = {(0, 0): 71629, (0, 1): 66874, (1, 0): 22880, (1, 1): 1387}
#: UTKFace, y = gender, a = age (child <= 10, adult >= 20), all 23,705 parsed files.
UTKFACE = {(0, 0): 1537, (0, 1): 10263, (1, 0): 1680, (1, 1): 8849}


def table_of(groups, class_names, attr_names, name="t", info=None) -> GroupTable:
    y = np.concatenate([np.full(n, k[0]) for k, n in groups.items()])
    a = np.concatenate([np.full(n, k[1]) for k, n in groups.items()])
    frame = pd.DataFrame(
        {"filename": [f"i{i}" for i in range(len(y))], "y": y, "a": a, "split": "train"}
    )
    return GroupTable(
        frame=frame,
        store=ArrayStore(np.zeros((1, 1, 1), np.uint8)),
        class_names=class_names,
        attr_names=attr_names,
        name=name,
        info=dict(info or {}),
    )


def celeba_table(info=None) -> GroupTable:
    return table_of(CELEBA, ["not Blond_Hair", "Blond_Hair"], ["not Male", "Male"], "celeba", info)


def utkface_table(info=None) -> GroupTable:
    return table_of(
        UTKFACE, ["male", "female"], ["child (age<=10)", "adult (age>=20)"], "utkface", info
    )


def test_celeba_keeps_the_blond_women_as_the_majority_at_0999() -> None:
    table = celeba_table()  # no declaration: women are the largest group of both classes
    assert majority_attributes(table) == {0: 1, 1: 0}
    counts = resplit_bias(table, 0.999, seed=0).counts()["train"]
    assert counts[2] == 22880  # blond women all kept
    assert counts[3] == round(22880 * 0.001 / 0.999)  # 23 blond men
    assert counts[1] == 66874  # non-blond men all kept
    assert counts[0] == round(66874 * 0.001 / 0.999)  # 67 non-blond women


def test_the_celeba_preset_agrees_with_the_data_and_is_recorded() -> None:
    from unspur.data.readers.celeba import majority_info

    info = majority_info("Blond_Hair", "Male", None, "celeba")
    result = resplit_bias(celeba_table(info), 0.99, seed=0).info["resplit_bias"]
    assert result["majority_attr"] == {"not Blond_Hair": "Male", "Blond_Hair": "not Male"}
    assert "A.6" in result["majority_source"]
    assert majority_info("Smiling", "Male", None, "celeba_hq")["majority_attr"] == [
        "Male",
        "not Male",
    ]
    assert majority_info("Blond_Hair", "Male", "data", "celeba") == {}
    with pytest.raises(ConfigError, match="majority"):
        majority_info("Blond_Hair", "Male", ["Male"], "celeba")


def test_an_ambiguous_direction_is_an_error_that_says_how_to_declare_it() -> None:
    with pytest.raises(DataError, match="data.options.majority"):
        resplit_bias(utkface_table(), 0.999)


def test_utkface_presets_and_explicit_declarations() -> None:
    # The official make_harder function: each class keeps its largest group (adults, twice).
    ffr = resplit_bias(utkface_table(), 0.999, rule="largest").counts()["train"]
    assert ffr.tolist() == [10, 10263, 9, 8849]
    cdb = majority_attributes(utkface_table({"majority_attr": ["child", "adult"]}))
    assert cdb == {0: 0, 1: 1}
    named = majority_attributes(utkface_table(), majority={"male": 1, "female": "child"})
    assert named == {0: 1, 1: 0}
    with pytest.raises(ConfigError, match="not an attribute"):
        majority_attributes(utkface_table(), majority=["teen", "adult"])
    with pytest.raises(ConfigError, match="one attribute per class"):
        majority_attributes(utkface_table(), majority=["adult"])


def test_utkface_reader_presets_and_the_cdb_original_split(tmp_path) -> None:
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    rng = np.random.default_rng(0)
    # 1000 children and 6000 adults of each gender (empty files: names carry the labels).
    for gender in (0, 1):
        for index, age in enumerate(rng.choice([2, 5, 8], 1000).tolist()
                                    + rng.choice([25, 40], 6000).tolist()):  # fmt: skip
            (folder / f"{age}_{gender}_0_2017{gender}{index:06d}.jpg.chip.jpg").touch()
    table = load_dataset(
        "utkface",
        tmp_path,
        majority="cdb",
        train_groups="cdb_original",
        val_fraction=0.02,
        test_fraction=0.02,
    )
    counts = table.counts()["train"].tolist()
    assert counts == [934, 103, 636, 5730]  # Clustered DreamBooth A.3
    assert table.info["majority_attr"] == ["child", "adult"]
    ffr = load_dataset("utkface", tmp_path, majority="ffr")  # the FFR release's splits
    assert majority_attributes(ffr) == {0: 0, 1: 1}
    with pytest.raises(ConfigError, match="preset"):
        load_dataset("utkface", tmp_path, majority="balanced")


def test_utkface_official_ffr_ages(tmp_path) -> None:
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    for index, age in enumerate([3, 5, 8, 25, 50, 60, 15]):
        (folder / f"{age}_{index % 2}_0_2017{index:06d}.jpg.chip.jpg").touch()
    table = load_dataset("utkface", tmp_path, child_max_age=5, adult_max_age=50)
    assert sorted(table.frame["age"]) == [3, 5, 25, 50]
    assert table.attr_names == ["child (age<=5)", "adult (age 20-50)"]
    with pytest.raises(ConfigError, match="adult_max_age"):
        load_dataset("utkface", tmp_path, adult_max_age=18)
