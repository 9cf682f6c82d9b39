"""Datasets built rather than read (synthetic benchmark, Colored MNIST, Corrupted
CIFAR-10) and bias-ratio resplitting."""

from __future__ import annotations

import gzip
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unspur.data import ArrayStore, GroupTable, load_dataset
from unspur.data.readers import colored_mnist as cm
from unspur.data.readers import corrupted_cifar10 as cc
from unspur.data.readers import synthetic as syn
from unspur.data.resplit import balance_groups, lff_bias_attributes, resplit_bias
from unspur.errors import ConfigError, DataError
from unspur.explain.masks import has_ground_truth

MNIST_T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_by_seed() -> None:
    first = load_dataset("synthetic", n_train=200, n_val=40, n_test=40, seed=3)
    second = load_dataset("synthetic", n_train=200, n_val=40, n_test=40, seed=3)
    other = load_dataset("synthetic", n_train=200, n_val=40, n_test=40, seed=4)
    assert np.array_equal(first.store.images, second.store.images)
    assert np.array_equal(first.mask_store.images, second.mask_store.images)
    pd.testing.assert_frame_equal(first.frame, second.frame)
    assert not np.array_equal(first.store.images, other.store.images)
    # Training images do not depend on the size of the other splits.
    more_test = load_dataset("synthetic", n_train=200, n_val=40, n_test=80, seed=3)
    train = (first.frame["split"] == "train").to_numpy()
    assert np.array_equal(first.store.images[train], more_test.store.images[:200])


def test_synthetic_group_counts_match_bias() -> None:
    table = load_dataset("synthetic", bias=0.9, n_train=1000, n_val=200, n_test=400)
    counts = table.counts()
    assert table.class_names == ["circle", "cross"]
    assert table.attr_names == ["land", "water"]
    # Each class has 500 training images, exactly 450 on its majority background.
    assert counts.loc[0, "train"] == 450 and counts.loc[1, "train"] == 50
    assert counts.loc[3, "train"] == 450 and counts.loc[2, "train"] == 50
    assert set(counts["val"]) == {50} and set(counts["test"]) == {100}
    assert table.info["bias"] == 0.9 and table.info["seed"] == 0 and table.info["size"] == 32
    frame = table.frame
    assert (frame["aligned"] == (frame["y"] == frame["a"])).all()

    unbalanced = load_dataset("synthetic", bias=0.8, n_train=100, n_test=100, balanced_eval=False)
    test = unbalanced.split("test").frame
    assert test["aligned"].sum() == 80


def test_synthetic_four_classes_shapes_and_stores() -> None:
    table = load_dataset("synthetic", n_classes=4, size=48, n_train=80, n_val=32, n_test=32)
    assert table.n_groups == 16
    assert table.store.images.shape == (144, 48, 48, 3)
    assert table.store.images.dtype == np.uint8
    assert table.mask_store.images.shape == (144, 48, 48)
    row = table.frame.iloc[5]
    image = table.store.open(row["filename"])
    mask = table.mask_store.open(row["mask"])
    assert image.size == (48, 48) and image.mode == "RGB"
    assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert set(table.counts()["val"]) == {2}


def test_synthetic_masks_cover_the_object() -> None:
    y = np.array([0, 1, 2, 3] * 50)
    a = np.array([0, 1, 2, 3] * 25 + [1, 2, 3, 0] * 25)
    images, masks = syn.render(np.random.default_rng(7), y, a, 32, 4)
    # render() draws the backgrounds first: the same generator state reproduces them.
    background = syn._backgrounds(np.random.default_rng(7), a, 32)
    background = np.clip(np.rint(background * 255), 0, 255)
    inside = masks > 0
    area = inside.mean(axis=(1, 2))
    assert (area > 0.05).all() and (area < 0.45).all()
    diff = np.abs(images.astype(float) - background).mean(axis=3)
    assert diff[~inside].max() == 0  # outside the mask: the background, untouched
    per_image = np.array([d[m].mean() for d, m in zip(diff, inside)])
    assert (per_image > 0).all()
    assert np.median(per_image) > 40


def test_synthetic_is_fast() -> None:
    start = time.process_time()
    load_dataset("synthetic", n_train=2000, n_val=500, n_test=500)
    assert time.process_time() - start < 2.0


def test_synthetic_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="n_classes"):
        load_dataset("synthetic", n_classes=7)
    with pytest.raises(ConfigError, match="bias"):
        load_dataset("synthetic", bias=1.5)
    table = load_dataset("synthetic", bias="0.5", n_train="40", n_val="0", n_test="8")
    assert table.info["bias"] == 0.5 and set(table.frame["split"]) == {"train", "test"}


def test_background_is_the_shortcut() -> None:
    """A linear model on raw pixels learns the background: near-perfect on aligned test
    samples, far worse on conflicting ones."""
    from sklearn.linear_model import LogisticRegression

    table = load_dataset("synthetic", bias=0.99, n_train=1500, n_val=0, n_test=400)
    pixels = table.store.images.reshape(len(table.frame), -1).astype(np.float32) / 255
    frame = table.frame
    train = (frame["split"] == "train").to_numpy()
    model = LogisticRegression(max_iter=200, C=0.1).fit(pixels[train], frame["y"][train])
    correct = model.predict(pixels[~train]) == frame["y"][~train].to_numpy()
    aligned = frame["aligned"][~train].to_numpy()
    assert correct[aligned].mean() > 0.9
    assert correct[~aligned].mean() < correct[aligned].mean() - 0.4


# ------------------------------------------------------------------ colored MNIST


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fake_digits(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    images[:, 8:20, 10:18] = rng.integers(100, 256, (len(labels), 12, 8))
    return images, labels


def write_mnist(root: Path, train_per_class: int | None, test_per_class: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    if train_per_class:
        images, labels = fake_digits(rng, train_per_class)
        write_idx(root / "train-images-idx3-ubyte.gz", images)
        write_idx(root / "train-labels-idx1-ubyte", labels)  # uncompressed works too
    images, labels = fake_digits(rng, test_per_class)
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)


def test_colored_mnist_protocol(tmp_path: Path) -> None:
    write_mnist(tmp_path, train_per_class=20, test_per_class=10)
    table = load_dataset("colored_mnist", tmp_path, conflict_ratio=0.1)
    frame = table.frame
    assert table.info["mode"] == "full"
    assert frame["split"].value_counts().to_dict() == {"train": 180, "val": 20, "test": 100}
    train = frame[frame["split"] == "train"]
    aligned = train.groupby("y")["aligned"].sum()
    assert (np.abs(aligned - 0.9 * 18) <= 1).all()
    # Unbiased test: with 10 images per digit, every colour exactly once per digit.
    counts = table.counts()
    assert set(counts["test"]) == {1}
    assert table.store.images.shape == (300, 28, 28, 3)
    # Foreground takes the colour (mean colour + tiny jitter), background stays black.
    row = int(np.flatnonzero(frame["split"] == "test")[0])
    image = table.store.images[row].astype(float)
    origin = frame["origin"].iloc[row]
    digit = cm.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")[int(origin.split(":")[1])]
    assert (image[digit == 0] == 0).all()
    fg = digit > 0
    colour = image[fg] / digit[fg][:, None]
    assert np.allclose(colour, cm.PALETTE[frame["a"].iloc[row]], atol=0.04)
    again = load_dataset("colored_mnist", tmp_path, conflict_ratio=0.1)
    assert np.array_equal(table.store.images, again.store.images)
    small = load_dataset("colored_mnist", tmp_path, size=14, val_fraction=0)
    assert small.store.images.shape[1:] == (14, 14, 3) and "val" not in set(small.frame["split"])
    # Background variant: same splits and groups, white digit on the group's colour.
    back = load_dataset("colored_mnist", tmp_path, conflict_ratio=0.1, colour_on="background")
    assert back.frame[["y", "a", "split"]].equals(frame[["y", "a", "split"]])
    image = back.store.images[row].astype(float)
    assert np.allclose(image[digit == 0] / 255, cm.PALETTE[frame["a"].iloc[row]], atol=0.04)
    assert (image[digit == 255] == 255).all()
    # Exact core masks: the digit's strokes, row for row, in every split and variant.
    assert has_ground_truth(table) and has_ground_truth(back)
    mask = np.asarray(back.mask_store.open(back.frame["mask"].iloc[row]))
    assert np.array_equal(mask > 0, digit >= cm.STROKE_THRESHOLD)
    assert np.array_equal(table.mask_store.images, back.mask_store.images)
    assert len(small.mask_store.images) == len(small.frame)
    with pytest.raises(ConfigError, match="colour_on"):
        load_dataset("colored_mnist", tmp_path, colour_on="stripes")


def test_colored_mnist_t10k_only(tmp_path: Path) -> None:
    write_mnist(tmp_path, train_per_class=None, test_per_class=50)
    table = load_dataset("colored_mnist", tmp_path)
    assert table.info["mode"] == "t10k_only"
    assert "t10k" in table.info["protocol"]
    sizes = table.frame["split"].value_counts().to_dict()
    assert sizes == {"train": 360, "val": 40, "test": 100}


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(bad, np.zeros(5, dtype=np.uint8), magic=b"\x12\x34\x08\x01")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic"):
        cm.read_idx(bad)
    truncated = tmp_path / "short-idx1-ubyte"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(DataError, match="short-idx1-ubyte.*truncated"):
        cm.read_idx(truncated)
    with pytest.raises(DataError, match="dimension"):
        cm.read_idx(truncated, expected_ndim=3)
    not_gzip = tmp_path / "x-idx1-ubyte.gz"
    not_gzip.write_bytes(b"plain bytes")
    with pytest.raises(DataError, match="x-idx1-ubyte.gz"):
        cm.read_idx(not_gzip)
    images, _ = fake_digits(np.random.default_rng(0), 1)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(DataError, match="magic"):
        load_dataset("colored_mnist", tmp_path)
    bad.unlink()
    with pytest.raises(DataError, match="t10k-labels"):
        load_dataset("colored_mnist", tmp_path)
    with pytest.raises(ConfigError):
        load_dataset("colored_mnist", None)


def test_real_mnist_t10k(shared_data: Path) -> None:
    labels = cm.read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz", expected_ndim=1)
    assert np.bincount(labels).tolist() == MNIST_T10K_COUNTS
    images = cm.read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz", expected_ndim=3)
    assert images.shape == (10000, 28, 28)
    table = load_dataset("colored_mnist", shared_data / "mnist")
    assert table.info["mode"] == "t10k_only" and len(table.frame) == 10000
    assert np.bincount(table.frame["y"]).tolist() == MNIST_T10K_COUNTS


# ------------------------------------------------------------------ corrupted CIFAR-10


def cifar_images(per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [c for c in range(10) for _ in range(per_class)]
    return rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels


def write_batches(root: Path, per_class: int = 2, bytes_keys: bool = False) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = cifar_images(per_class, i)
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)
        batch = {"data": data, "labels": labels, "batch_label": name}
        if bytes_keys:
            batch = {k.encode(): v for k, v in batch.items()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if bytes_keys else 5))
    return folder


def write_folders(root: Path, per_class: int = 3) -> None:
    for split, seed in (("train", 0), ("test", 1)):
        images, labels = cifar_images(per_class, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / cc.CIFAR_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")


def test_corrupted_cifar10_from_batches(tmp_path: Path) -> None:
    write_batches(tmp_path, per_class=2, bytes_keys=True)
    table = load_dataset("corrupted_cifar10", tmp_path, conflict_ratio=0.2, val_fraction=0.2)
    frame = table.frame
    assert frame["split"].value_counts().to_dict() == {"train": 80, "val": 20, "test": 20}
    assert table.class_names == cc.CIFAR_CLASSES
    assert table.attr_names == cc.DEFAULT_CORRUPTIONS
    assert table.info["hendrycks_level"] == 5
    train = frame[frame["split"] == "train"]
    # 8 per class, 20% conflicting: LfF's rounded cumulative milestones give 6 or 7.
    assert set(train.groupby("y")["aligned"].sum()) <= {6, 7}
    again = load_dataset("corrupted_cifar10", tmp_path, conflict_ratio=0.2, val_fraction=0.2)
    assert np.array_equal(table.store.images, again.store.images)
    capped = load_dataset("corrupted_cifar10", tmp_path, n_per_class=3, val_fraction=0)
    assert capped.frame["split"].value_counts().to_dict() == {"train": 30, "test": 20}


def test_cifar_batches_refuse_foreign_code(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return (Path.touch, (tmp_path / "pwned",))

    folder = write_batches(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Exploit(), "labels": []}))
    with pytest.raises(DataError, match="data_batch_3.*refusing"):
        load_dataset("corrupted_cifar10", tmp_path)
    assert not (tmp_path / "pwned").exists()
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((2, 5)), "labels": []}))
    with pytest.raises(DataError, match="data_batch_3.*'data'"):
        load_dataset("corrupted_cifar10", tmp_path)


def test_corrupted_cifar10_from_folders_and_archive(tmp_path: Path) -> None:
    folders = tmp_path / "folders"
    write_folders(folders / "cifar10")
    from_folders = load_dataset("corrupted_cifar10", folders, val_fraction=0)
    assert from_folders.frame["split"].value_counts().to_dict() == {"train": 30, "test": 30}
    assert from_folders.info["source"].startswith("class folders")

    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / "cifar10-images.tar.gz", "w:gz") as archive:
        archive.add(folders / "cifar10", arcname="cifar10")
    from_archive = load_dataset("corrupted_cifar10", archive_dir, val_fraction=0)
    assert from_archive.info["source"].startswith("archive")
    assert np.array_equal(from_folders.store.images, from_archive.store.images)
    pd.testing.assert_frame_equal(
        from_folders.frame.drop(columns="origin"), from_archive.frame.drop(columns="origin")
    )


def test_corrupted_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no CIFAR-10"):
        load_dataset("corrupted_cifar10", tmp_path)
    write_batches(tmp_path)
    with pytest.raises(ConfigError, match="unknown"):
        load_dataset("corrupted_cifar10", tmp_path, corruptions=["snow"] * 10)
    with pytest.raises(ConfigError, match="severity"):
        load_dataset("corrupted_cifar10", tmp_path, severity=5)
    names = "original,gaussian_noise,shot_noise,impulse_noise,speckle_noise,gaussian_blur,"
    names += "defocus_blur,zoom_blur,fog,contrast"
    table = load_dataset("corrupted_cifar10", tmp_path, corruptions=names, n_per_class=2)
    assert table.attr_names[0] == "original"


@pytest.mark.parametrize("name", sorted(cc.CORRUPTIONS))
def test_each_corruption(name: str) -> None:
    images, _ = cifar_images(1, 0)
    images[:, :16] //= 2  # some structure for blurs to act on
    for level in (1, 5):
        out = cc.corrupt(images, np.zeros(10, int), [name] * 10, level, np.random.default_rng(0))
        assert out.shape == images.shape and out.dtype == np.uint8
        changed = np.abs(out.astype(int) - images).mean()
        assert (changed == 0) if name == "original" else (changed > 0.5), (name, level)
        again = cc.corrupt(images, np.zeros(10, int), [name] * 10, level, np.random.default_rng(0))
        assert np.array_equal(out, again)


def test_real_cifar10_archive(shared_data: Path) -> None:
    archive = shared_data / "cifar10" / "cifar10-images.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    table = load_dataset("corrupted_cifar10", archive, n_per_class=10)
    assert table.class_names == cc.CIFAR_CLASSES
    assert table.frame["split"].value_counts().to_dict() == {"train": 90, "val": 10, "test": 100}
    assert set(table.counts()["test"]) == {1}
    assert table.store.images.shape == (200, 32, 32, 3)


# ------------------------------------------------------------------ resplitting


def make_table(groups: dict[tuple[int, int], int], n_attrs: int = 2, val: int = 0) -> GroupTable:
    rows = []
    for (y, a), n in groups.items():
        rows += [(y, a, "train")] * n + [(y, a, "val")] * val
    frame = pd.DataFrame(rows, columns=["y", "a", "split"])
    frame.insert(0, "filename", [f"img{i}" for i in range(len(frame))])
    return GroupTable(
        frame=frame,
        store=ArrayStore(np.zeros((1, 1, 1), np.uint8)),
        class_names=["c0", "c1"],
        attr_names=[f"a{k}" for k in range(n_attrs)],
    )


@pytest.mark.parametrize(
    ("ratio", "n_major", "kept"),
    [(0.95, 950, 50), (0.97, 970, 30), (0.99, 990, 10), (0.999, 999, 1)],
)
def test_resplit_bias_ratios_are_exact(ratio: float, n_major: int, kept: int) -> None:
    table = make_table({(0, 0): n_major, (0, 1): 60, (1, 1): n_major, (1, 0): 70}, val=5)
    result = resplit_bias(table, ratio, seed=1)
    counts = result.counts()
    assert counts.loc[0, "train"] == n_major and counts.loc[3, "train"] == n_major
    assert counts.loc[1, "train"] == kept and counts.loc[2, "train"] == kept
    assert n_major / (n_major + kept) == pytest.approx(ratio, abs=1e-12)
    assert (counts["val"] == 5).all()  # other splits untouched
    info = result.info["resplit_bias"]
    assert info["dropped"] == {"c0 / a1": 60 - kept, "c1 / a0": 70 - kept}
    assert info["majority_attr"] == {"c0": "a0", "c1": "a1"}
    again = resplit_bias(table, ratio, seed=1)
    assert again.frame["filename"].tolist() == result.frame["filename"].tolist()
    assert resplit_bias(table, ratio, seed=2).frame["filename"].tolist() != (
        result.frame["filename"].tolist()
    )


def test_resplit_bias_shares_and_keeps_groups() -> None:
    table = make_table({(0, 0): 100, (0, 1): 30, (0, 2): 10, (1, 1): 50, (1, 2): 20}, n_attrs=3)
    result = resplit_bias(table, 0.8)
    counts = result.counts()["train"]
    # c0 keeps 25 conflicting samples, shared 30:10 with at least one per group.
    assert counts[1] + counts[2] == 25 and counts[1] >= 1 and counts[2] >= 1
    assert counts[1] > counts[2]
    assert counts[5] == 12 and counts[3] == 0  # c1: 50 * 0.25 = 12.5 -> 12; a0 empty
    # c0 sits at 100 / 140 = 0.714: a lower ratio would need samples that do not exist.
    with pytest.raises(DataError, match="c0.*at least 0.714"):
        resplit_bias(table, 0.6)
    tiny = make_table({(0, 0): 10, (0, 1): 5, (1, 1): 10, (1, 0): 5}, n_attrs=2)
    kept = resplit_bias(tiny, 0.99)
    assert (kept.counts()["train"] >= 1).all()
    assert kept.info["resplit_bias"]["achieved_ratio"]["c0"] == pytest.approx(10 / 11)
    with pytest.raises(ConfigError):
        resplit_bias(tiny, 1.0)


def test_balance_groups() -> None:
    table = make_table({(0, 0): 10, (0, 1): 4, (1, 0): 6, (1, 1): 8}, val=0)
    frame = table.frame.copy()
    frame.loc[frame.index % 2 == 0, "split"] = "val"
    table = table.with_frame(frame)
    balanced = balance_groups(table, "val", seed=0)
    counts = balanced.counts()
    assert set(counts["val"]) == {2}
    assert counts["train"].tolist() == table.counts()["train"].tolist()
    missing = make_table({(0, 0): 3, (0, 1): 3, (1, 0): 3}, val=1)
    with pytest.raises(DataError, match="no samples of group"):
        balance_groups(missing, "val")


def test_lff_bias_attributes_counts() -> None:
    y = np.repeat(np.arange(10), 100)
    attrs = lff_bias_attributes(y, 10, 0.95, np.random.default_rng(0))
    table = np.zeros((10, 10), int)
    np.add.at(table, (y, attrs), 1)
    assert (np.diag(table) == 95).all()
    assert table.sum(axis=1).tolist() == [100] * 10
    off = table[~np.eye(10, dtype=bool)]
    assert off.min() >= 0 and off.max() <= 1
    uniform = lff_bias_attributes(y, 10, 0.1, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(y * 10 + uniform), np.full(100, 10))


def test_no_reader_writes_under_root(tmp_path: Path) -> None:
    write_mnist(tmp_path / "mnist", train_per_class=3, test_per_class=3)
    write_batches(tmp_path / "cifar")
    before = sorted(p.as_posix() for p in tmp_path.rglob("*"))
    load_dataset("colored_mnist", tmp_path / "mnist")
    load_dataset("corrupted_cifar10", tmp_path / "cifar", n_per_class=1)
    assert sorted(p.as_posix() for p in tmp_path.rglob("*")) == before
