"""Colored MNIST, built from the MNIST IDX files the way LfF (Nam et al., 2020) does.

Protocol (LfF ``make_dataset.py`` / ``colored_mnist_protocol.py``):

- ``y`` is the digit, ``a`` the colour of the digit's strokes (foreground; the
  background stays black). There are 10 fixed mean colours, colour ``c`` being the
  bias colour of digit ``c``; each image's colour is its mean colour plus Gaussian
  jitter of std ``[0.05, 0.02, 0.01, 0.005, 0.002][severity - 1]`` per channel, clipped
  to [0, 1] (LfF's experiments use severity 4). LfF's mean colours live in a binary
  ``colors.th`` that is not shipped here, so :data:`PALETTE` is our own set of ten
  well-separated colours.
- Training: a fraction ``conflict_ratio`` of every class is bias-conflicting, spread
  *equally* over the nine other colours with exact rounded counts (LfF's
  ``make_attr_labels``; DiffInject uses 0.005, 0.01, 0.02, 0.05).
- Test: the MNIST test set coloured *unbiased* (aligned ratio 1/10: every colour
  equally often within every digit), so accuracy on it is the "unbiased accuracy".
- Core masks: every row has the exact mask of its digit's strokes (``mask`` column,
  ``table.mask_store``; see :func:`stroke_mask`), for mask-based methods (MaC) and their
  mask-quality tables.
- Validation (LfF has none; its "valid" split is the test set): a class-stratified
  ``val_fraction`` of the training images, held out before biasing and coloured
  unbiased like the test set.

When only ``t10k-*`` files exist (the situation in ``shared/data/mnist``), all splits
come from the 10,000 test digits: 20% (stratified) become test, ``val_fraction`` of the
rest val, the remainder train. ``table.info["mode"]`` says which case applied. The
image-to-split assignment uses a fixed seed, so every ``seed`` sees the same images in
each split and only the colouring changes.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from unspur.data.registry import reader
from unspur.data.resplit import lff_split_frames, stratified_holdout
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError, DataError

PALETTE = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [1.00, 0.55, 0.00],  # orange
        [0.95, 0.90, 0.10],  # yellow
        [0.20, 0.80, 0.20],  # green
        [0.10, 0.80, 0.80],  # cyan
        [0.15, 0.30, 0.95],  # blue
        [0.55, 0.20, 0.85],  # purple
        [0.95, 0.35, 0.70],  # pink
        [0.60, 0.35, 0.15],  # brown
        [0.80, 0.80, 0.80],  # grey
    ],
    dtype=np.float32,
)
COLOUR_NAMES = [
    "red",
    "orange",
    "yellow",
    "green",
    "cyan",
    "blue",
    "purple",
    "pink",
    "brown",
    "grey",
]
DIGIT_NAMES = [str(d) for d in range(10)]
COLOUR_STD = (0.05, 0.02, 0.01, 0.005, 0.002)  # LfF colorize(), by severity 1..5
TEST_FRACTION_T10K_ONLY = 0.2
SPLIT_SEED = 20200607  # fixed: which image goes to which split does not depend on `seed`

_IDX_TYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic ``00 00 <type> <ndim>``, ``ndim``
    big-endian uint32 sizes, then the data. Errors name the file and what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError as exc:
        raise DataError(f"IDX file {path} does not exist") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read IDX file {path}: {exc}. The file is damaged or not gzip; "
            "download it again"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000 08 01 for labels or 0000 08 03 for images); check that it is "
            "an MNIST file and, if it ends in .gz, that it is gzipped"
        )
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(
            f"{path}: IDX file has {ndim} dimension(s), expected {expected_ndim} "
            "(label files have 1, image files 3); are the image and label files swapped?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated ({len(raw)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header announces shape {shape} ({expected} data bytes) but the "
            f"file holds {len(raw) - header}; the file is truncated or damaged"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_mnist_file(root: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` (also the ``train-images.idx3-ubyte`` spelling) in ``root``,
    ``root/raw`` or ``root/MNIST/raw`` (torchvision's layout)."""
    spellings = [stem, stem.replace("-idx", ".idx")]
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in spellings:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def load_mnist_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """Images (n, 28, 28) uint8 and labels (n,) for ``prefix`` ``train`` or ``t10k``."""
    images_path = find_mnist_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = find_mnist_file(root, f"{prefix}-labels-idx1-ubyte")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        present, missing = (
            (images_path, f"{prefix}-labels-idx1-ubyte(.gz)")
            if labels_path is None
            else (labels_path, f"{prefix}-images-idx3-ubyte(.gz)")
        )
        raise DataError(f"found {present} but not {missing} next to it; add the missing file")
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"{images_path} / {labels_path}: MNIST IDX files must hold unsigned bytes")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels; the two files do not belong together"
        )
    if labels.size and labels.max() > 9:
        row = int(np.argmax(labels > 9))
        raise DataError(f"{labels_path}: label {labels[row]} at index {row} is not a digit 0-9")
    return images, labels.astype(np.int64), images_path


def _resize_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) linear-interpolation weights with a widened (anti-aliasing) support when
    shrinking, the same filter PIL's bilinear resize uses."""
    scale = src / dst
    support = max(scale, 1.0)
    centre = (np.arange(dst) + 0.5) * scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(src)[None, :] - centre[:, None]) / support)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_stack(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (n, H, W) uint8 images to (n, size, size), all at once."""
    if images.shape[1:] == (size, size):
        return images
    rows = _resize_matrix(images.shape[1], size)
    cols = _resize_matrix(images.shape[2], size)
    out = np.einsum("hi,nij,wj->nhw", rows, images.astype(np.float32), cols, optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


COLOUR_ON = ("foreground", "background")
#: Grey level (0-255) from which a pixel counts as part of the digit's strokes.
STROKE_THRESHOLD = 128


def stroke_mask(digits: np.ndarray) -> np.ndarray:
    """Exact core masks of (n, H, W) grey digits: uint8 255 on the strokes, 0 elsewhere.

    MNIST strokes are anti-aliased; the half-intensity threshold keeps the pen's core
    (about 13% of a 28 px image) and drops the faint rim."""
    return np.where(digits >= STROKE_THRESHOLD, 255, 0).astype(np.uint8)


def colorize(
    digits: np.ndarray,
    attrs: np.ndarray,
    std: float,
    rng: np.random.Generator,
    colour_on: str = "foreground",
) -> np.ndarray:
    """LfF ``colorize``: ``clip(mean_colour[a] + N(0, std)) * grey`` on every stroke pixel.

    ``colour_on="background"`` paints the colour behind a white digit instead
    (``grey + colour * (255 - grey)``), so the spurious attribute lies outside the digit.
    """
    colours = np.clip(PALETTE[attrs] + rng.standard_normal((len(attrs), 3)) * std, 0.0, 1.0)
    colours = colours[:, None, None, :].astype(np.float32)
    grey = digits[..., None].astype(np.float32)
    out = colours * grey if colour_on == "foreground" else grey + colours * (255.0 - grey)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@reader("colored_mnist")
def read_colored_mnist(
    root: Path | None,
    conflict_ratio: float = 0.01,
    severity: int = 4,
    seed: int = 0,
    val_fraction: float = 0.1,
    size: int = 28,
    colour_on: str = "foreground",
) -> GroupTable:
    """Colored MNIST (LfF protocol) from MNIST IDX files under ``root``; see the module
    docstring for the splits. ``conflict_ratio`` is the bias-conflicting fraction of
    training, ``severity`` (1-5) picks the colour jitter, ``size`` the output size.
    ``colour_on="background"`` colours the background behind a white digit instead of
    the strokes (the variant where the bias is spatially apart from the digit, as
    mask-based methods such as MaC assume); splits and groups are the same."""
    if root is None:
        raise ConfigError(
            "colored_mnist needs the folder that holds the MNIST IDX files "
            "(train-images-idx3-ubyte.gz, ..., t10k-labels-idx1-ubyte.gz)"
        )
    if not 0.0 <= conflict_ratio <= 0.9:
        raise ConfigError(f"colored_mnist: conflict_ratio={conflict_ratio}; use e.g. 0.01")
    if severity not in range(1, 6):
        raise ConfigError(f"colored_mnist: severity={severity}; choose 1..5 (LfF uses 4)")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"colored_mnist: val_fraction={val_fraction}; choose in [0, 1)")
    if size < 8:
        raise ConfigError(f"colored_mnist: size={size}; use at least 8 (28 is native)")
    if colour_on not in COLOUR_ON:
        raise ConfigError(f"colored_mnist: colour_on={colour_on!r}; choose foreground|background")
    if not root.is_dir():
        raise DataError(f"colored_mnist: data folder {root} does not exist")

    train = load_mnist_pair(root, "train")
    test = load_mnist_pair(root, "t10k")
    if test is None:
        raise DataError(
            f"colored_mnist: no t10k-images-idx3-ubyte(.gz) / t10k-labels-idx1-ubyte(.gz) "
            f"in {root} (nor in raw/ or MNIST/raw/); put the MNIST IDX files there"
        )
    split_rng = np.random.default_rng(SPLIT_SEED)
    test_images, test_labels, test_path = test
    test_origin = np.array([f"{test_path.name}:{i}" for i in range(len(test_labels))])
    if train is not None:
        mode = "full"
        pool_images, pool_labels, train_path = train
        pool_origin = np.array([f"{train_path.name}:{i}" for i in range(len(pool_labels))])
    else:
        mode = "t10k_only"
        is_test = stratified_holdout(test_labels, TEST_FRACTION_T10K_ONLY, split_rng)
        pool_images, pool_labels = test_images[~is_test], test_labels[~is_test]
        pool_origin = test_origin[~is_test]
        test_images, test_labels = test_images[is_test], test_labels[is_test]
        test_origin = test_origin[is_test]
    is_val = stratified_holdout(pool_labels, val_fraction, split_rng)

    parts = {
        "train": (pool_images[~is_val], pool_labels[~is_val], pool_origin[~is_val]),
        "val": (pool_images[is_val], pool_labels[is_val], pool_origin[is_val]),
        "test": (test_images, test_labels, test_origin),
    }
    std = COLOUR_STD[severity - 1]
    parts = {split: (resize_stack(px, size), y, origin) for split, (px, y, origin) in parts.items()}
    images, frame = lff_split_frames(
        parts,
        lambda grey, attrs, rng: colorize(grey, attrs, std, rng, colour_on),
        10,
        conflict_ratio,
        seed,
        "colored_mnist/",
    )
    # The digit's strokes are the core object: exact masks, in the images' row order.
    masks = np.concatenate([stroke_mask(px) for px, y, _ in parts.values() if len(y)])
    frame["mask"] = [f"colored_mnist_mask/{i}" for i in range(len(frame))]
    return GroupTable(
        frame=frame,
        store=ArrayStore(images, prefix="colored_mnist/"),
        mask_store=ArrayStore(masks, prefix="colored_mnist_mask/"),
        class_names=list(DIGIT_NAMES),
        attr_names=list(COLOUR_NAMES),
        name="colored_mnist",
        info={
            "mode": mode,
            "root": str(root),
            "conflict_ratio": conflict_ratio,
            "severity": severity,
            "colour_std": std,
            "seed": seed,
            "size": size,
            "colour_on": colour_on,
            "split_sizes": frame["split"].value_counts().to_dict(),
            "protocol": (
                f"LfF Colored MNIST: {colour_on} colour = a, colour c is digit c's bias "
                "colour; train conflicting samples spread equally over the other colours; "
                "val and test unbiased (every colour equally often per digit)"
            )
            + (
                "; only t10k files were found, so train/val/test are a fixed stratified "
                f"split of the 10,000 test digits ({1 - TEST_FRACTION_T10K_ONLY:.0%} "
                f"train+val, {TEST_FRACTION_T10K_ONLY:.0%} test)"
                if mode == "t10k_only"
                else ""
            ),
        },
    )
