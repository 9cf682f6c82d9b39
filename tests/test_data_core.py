"""The canonical table, stores, GroupDataset and transforms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from unspur.data import ArrayStore, FolderStore, GroupDataset, GroupTable, drop_bad_images
from unspur.data.table import require_nonempty_groups
from unspur.data.transforms import RandomResizedCrop, eval_transform, train_transform
from unspur.errors import DataError


def folder_table(tmp_path, n=8):
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (20, 10), (i * 20, 0, 0)).save(root / f"{i}.png")
        rows.append((f"{i}.png", i % 2, (i // 2) % 2, "train" if i < 4 else "test"))
    frame = pd.DataFrame(rows, columns=["filename", "y", "a", "split"])
    return GroupTable(frame, FolderStore(root), ["c0", "c1"], ["a0", "a1"], name="toy")


def test_table_groups_counts_and_splits(tmp_path):
    table = folder_table(tmp_path)
    assert table.groups.tolist() == [0, 2, 1, 3, 0, 2, 1, 3]
    counts = table.counts()
    assert counts["train"].tolist() == [1, 1, 1, 1] and counts["test"].tolist() == [1, 1, 1, 1]
    assert len(table.split("test").frame) == 4
    with pytest.raises(DataError, match="no rows in split 'val'"):
        table.split("val")


@pytest.mark.parametrize(
    "column, value, message",
    [("y", 5, r"row 0 \(0.png\) has y=5, outside 0..1"), ("split", "training", "unknown split")],
)
def test_table_validation_names_the_row(tmp_path, column, value, message):
    table = folder_table(tmp_path)
    frame = table.frame.copy()
    frame.loc[0, column] = value
    with pytest.raises(DataError, match=message):
        GroupTable(frame, table.store, ["c0", "c1"], ["a0", "a1"])


def test_empty_group_in_split_is_reported(tmp_path):
    table = folder_table(tmp_path).subset(np.array([0, 1, 2, 4, 5, 6]))
    with pytest.raises(DataError, match=r"split 'train' has no samples of group\(s\) g3"):
        require_nonempty_groups(table, "train")


def test_path_escaping_root_is_refused(tmp_path):
    store = FolderStore(tmp_path / "data")
    with pytest.raises(DataError, match="escapes the data root"):
        store.open("../secret.png")
    with pytest.raises(DataError, match="escapes the data root"):
        store.open("/etc/passwd")


def test_corrupt_image_fail_and_skip(tmp_path):
    table = folder_table(tmp_path)
    (tmp_path / "data" / "3.png").write_bytes(b"not an image")
    dataset = GroupDataset(table, eval_transform(8, 1.0))
    with pytest.raises(DataError, match=r"3.png.*data.on_bad_image=skip"):
        dataset[3]
    kept = drop_bad_images(table, "skip")
    assert len(kept.frame) == 7 and kept.info["skipped_bad_images"] == 1
    assert drop_bad_images(table, "fail") is table


def test_dataset_items_and_raw_image(tmp_path):
    table = folder_table(tmp_path)
    dataset = GroupDataset(table, eval_transform(8, 1.0, normalize=False))
    x, y, g, index = dataset[5]
    assert x.shape == (3, 8, 8) and (y, g, index) == (1, 2, 5)
    assert dataset.raw(5).size == (20, 10)  # untransformed
    assert dataset.group_counts().tolist() == [2, 2, 2, 2]


def test_array_store_round_trip():
    images = np.random.default_rng(0).integers(0, 255, (3, 4, 4, 3), dtype=np.uint8)
    store = ArrayStore(images)
    assert np.array_equal(np.asarray(store.open(store.filename(2))), images[2])
    assert not store.exists("mem:7")


def test_random_resized_crop_stays_inside_and_respects_scale():
    torch.manual_seed(0)
    crop = RandomResizedCrop(16, scale=(0.5, 1.0))
    for _ in range(200):
        left, top, w, h = crop.box(40, 30)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert w * h >= 0.5 * 40 * 30 * 0.9


def test_train_transform_is_random_and_eval_is_not():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    train = train_transform(16)
    assert not torch.equal(train(image), train(image)) or not torch.equal(
        train(image), train(image)
    )
    evaluation = eval_transform(16, 224 / 256)
    assert torch.equal(evaluation(image), evaluation(image))
    assert evaluation(image).shape == (3, 16, 16)


def test_decoded_image_cache_gives_the_same_tensors_within_its_budget(tmp_path):
    """The fixed steps' output is kept (so a JPEG is decoded once per run, not once per
    epoch); random steps still run per access; the budget caps it; a copy for a worker
    travels without it."""
    import pickle

    table = folder_table(tmp_path)
    opened = []
    store_open = table.store.open
    table.store.open = lambda name: opened.append(name) or store_open(name)
    fixed = eval_transform(8, 224 / 256, normalize=True)  # resize + centre crop: 2 steps
    assert fixed.fixed_steps == 2 and train_transform(8, augment=True).fixed_steps == 0
    plain = GroupDataset(table, fixed, cache_mb=0)
    cached = GroupDataset(table, fixed)
    for _ in range(3):
        for i in range(len(table.frame)):
            assert torch.equal(cached[i][0], plain[i][0])
    assert len(opened) == 8 * 3 + 8  # the uncached dataset thrice, the cached one once
    assert cached._cached_bytes == 8 * 8 * 8 * 3

    # a transform with random steps after fixed ones: the same draws, the same tensors
    from unspur.data.transforms import Compose, RandomHorizontalFlip, Resize

    mixed = Compose([Resize(8), RandomHorizontalFlip()])
    a, b = GroupDataset(table, mixed, cache_mb=0), GroupDataset(table, mixed)
    for _ in range(2):
        torch.manual_seed(0)
        first = [a[i][0] for i in range(8)]
        torch.manual_seed(0)
        assert all(torch.equal(x, b[i][0]) for i, x in enumerate(first))

    tiny = GroupDataset(table, fixed)
    tiny.cache_bytes = 8 * 8 * 3 * 2  # room for two images
    for i in range(8):
        tiny[i]
    assert sorted(tiny._cache) == [0, 1]
    from unspur.train.features import with_transform

    assert with_transform(plain, fixed).cache_bytes == 0  # a derived view keeps the budget
    del table.store.open  # the counting wrapper is a local function: not picklable
    assert pickle.loads(pickle.dumps(cached))._cache == {}
