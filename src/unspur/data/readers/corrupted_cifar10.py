"""Corrupted CIFAR-10, built from CIFAR-10 the way LfF (Nam et al., 2020) does.

Protocol (LfF ``make_dataset.py``): ``y`` is the CIFAR-10 class, ``a`` the index of the
corruption applied to the image; corruption ``c`` is the bias of class ``c``. Training
has a fraction ``conflict_ratio`` of bias-conflicting samples per class, spread *equally*
over the other nine corruptions (exact rounded counts); the test set is unbiased (every
corruption equally often within every class), so its accuracy is the "unbiased
accuracy". Validation (LfF has none; its "valid" split is the test set) is a
class-stratified ``val_fraction`` of the training images, held out before biasing and
corrupted unbiased like the test set; the held-out images are fixed, not drawn by
``seed``.

Severity: LfF's dataset names ("...-Severity4") count 1..4, but ``make_dataset.py``
calls every corruption with ``severity + 1``, so "Severity4" applies Hendrycks' level 5.
``severity`` here uses LfF's naming (1..4, default 4) and ``info["hendrycks_level"]``
records the level applied.

Corruptions follow Hendrycks & Dietterich's CIFAR-10-C formulas (``make_cifar_c.py``,
the copy in LfF's ``corrupted_cifar10_protocol.py``), re-implemented in numpy/PIL and
vectorised per corruption type. LfF's "Type0" set is Snow, Frost, Fog, Brightness,
Contrast, Spatter, Elastic, JPEG, Pixelate, Saturate. Four of those cannot be reproduced
faithfully without extra dependencies: Frost needs the frost photographs shipped with
ImageNet-C, Snow and Spatter need ImageMagick's motion blur and OpenCV's Canny/distance
transform, Elastic needs OpenCV's affine warp and SciPy's ``map_coordinates``. The
default set keeps the six exact ones in LfF's class positions and puts four exact
Hendrycks corruptions from LfF's "Type1" set in the places of the missing ones (Snow ->
Gaussian noise, Frost -> impulse noise, Spatter -> defocus blur, Elastic -> zoom blur),
so every class keeps a distinct, easy-to-learn bias. Pass ``corruptions`` (ten names from
:data:`CORRUPTIONS`) to choose another set, e.g. LfF's Type1 without glass/motion blur.

CIFAR-10 is read from any of: the python batches (``cifar-10-batches-py/data_batch_1..5``
and ``test_batch``, loaded with a restricted unpickler that only rebuilds plain
containers and numpy arrays), the official ``cifar-10-python.tar.gz``, class folders
``{train,test}/<class>/*.png|jpg``, or a ``.tar.gz`` of such folders (as in
``shared/data/cifar10/cifar10-images.tar.gz``), all in memory and never extracted.
"""

from __future__ import annotations

import codecs
import io
import pickle
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from unspur.data.registry import reader
from unspur.data.resplit import lff_split_frames, stratified_holdout
from unspur.data.store import ArrayStore
from unspur.data.table import GroupTable
from unspur.errors import ConfigError, DataError

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
LFF_TYPE0 = [
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "spatter",
    "elastic",
    "jpeg",
    "pixelate",
    "saturate",
]
DEFAULT_CORRUPTIONS = [
    "gaussian_noise",
    "impulse_noise",
    "fog",
    "brightness",
    "contrast",
    "defocus_blur",
    "zoom_blur",
    "jpeg",
    "pixelate",
    "saturate",
]
SPLIT_SEED = 20200607  # fixed: the held-out val images do not depend on `seed`
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

Array = np.ndarray
Corruption = Callable[[Array, int, np.random.Generator], Array]


# ---------------------------------------------------------------- corruptions
# Each takes float32 images (n, H, W, 3) in [0, 1], a Hendrycks level 1..5 and a
# generator, and returns float images (clipped to [0, 1] by the caller).


def _pick(values: list[Any], level: int) -> Any:
    return values[level - 1]


def original(x: Array, level: int, rng: np.random.Generator) -> Array:
    return x


def gaussian_noise(x: Array, level: int, rng: np.random.Generator) -> Array:
    c = _pick([0.04, 0.06, 0.08, 0.09, 0.10], level)
    return x + rng.normal(scale=c, size=x.shape).astype(np.float32)


def shot_noise(x: Array, level: int, rng: np.random.Generator) -> Array:
    c = _pick([500, 250, 100, 75, 50], level)
    return (rng.poisson(x * c) / c).astype(np.float32)


def impulse_noise(x: Array, level: int, rng: np.random.Generator) -> Array:
    # skimage.util.random_noise(mode="s&p", amount=c): every value (per channel) is
    # replaced with probability c, by 1 or 0 with equal chance.
    c = _pick([0.01, 0.02, 0.03, 0.05, 0.07], level)
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    out = x.copy()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def speckle_noise(x: Array, level: int, rng: np.random.Generator) -> Array:
    c = _pick([0.06, 0.1, 0.12, 0.16, 0.2], level)
    return x + x * rng.normal(scale=c, size=x.shape).astype(np.float32)


def _gaussian_kernel_1d(sigma: float, radius: int) -> Array:
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


def _filter2d(x: Array, kernel: Array, mode: str) -> Array:
    """Correlate every image and channel with a 2-D ``kernel`` (odd size), border by
    ``np.pad`` ``mode``; only the non-zero taps are visited."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=mode)
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    for i, j in zip(*np.nonzero(np.abs(kernel) > 1e-12)):
        out += kernel[i, j] * padded[:, i : i + h, j : j + w]
    return out


def gaussian_blur(x: Array, level: int, rng: np.random.Generator) -> Array:
    # skimage.filters.gaussian: scipy gaussian_filter, truncate 4, mode "nearest".
    sigma = _pick([0.4, 0.6, 0.7, 0.8, 1.0], level)
    kernel = _gaussian_kernel_1d(sigma, int(4.0 * sigma + 0.5))
    return _filter2d(x, np.outer(kernel, kernel), mode="edge")


def _disk(radius: float, alias_blur: float) -> Array:
    """Hendrycks' ``disk``: an aliased disk on a 17x17 grid, normalised, then a 3x3
    Gaussian blur (cv2.GaussianBlur) to anti-alias it."""
    taps = np.arange(-8, 9)
    xx, yy = np.meshgrid(taps, taps)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    kernel = _gaussian_kernel_1d(alias_blur, 1)
    padded = np.pad(disk, 1, mode="reflect")
    rows = sum(kernel[k] * padded[k : k + 17, 1:-1] for k in range(3))
    rows = np.pad(rows, ((0, 0), (1, 1)), mode="reflect")
    return sum(kernel[k] * rows[:, k : k + 17] for k in range(3)).astype(np.float32)


def defocus_blur(x: Array, level: int, rng: np.random.Generator) -> Array:
    radius, alias = _pick([(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)], level)
    # cv2.filter2D's default border is BORDER_REFLECT_101, numpy's "reflect".
    return _filter2d(x, _disk(radius, alias), mode="reflect")


def _zoom_matrix(size: int, factor: float) -> tuple[Array, int]:
    """Rows of scipy ``zoom(order=1)`` applied to the centre crop that Hendrycks'
    ``clipped_zoom`` takes, trimmed back to ``size``: (size, crop) weights and the crop's
    top offset."""
    crop = int(np.ceil(size / factor))
    top = (size - crop) // 2
    out = int(round(crop * factor))
    # scipy.ndimage.zoom (grid_mode=False) aligns the corner pixels.
    position = np.arange(out) * (crop - 1) / max(out - 1, 1)
    left = np.minimum(np.floor(position).astype(int), crop - 2)
    frac = position - left
    weights = np.zeros((out, crop), dtype=np.float32)
    weights[np.arange(out), left] = 1 - frac
    weights[np.arange(out), left + 1] += frac
    trim = (out - size) // 2
    return weights[trim : trim + size], top


def zoom_blur(x: Array, level: int, rng: np.random.Generator) -> Array:
    top_factor = _pick([1.06, 1.11, 1.16, 1.21, 1.26], level)
    factors = np.arange(1, top_factor, 0.01)
    size = x.shape[1]
    out = np.zeros_like(x)
    for factor in factors:
        weights, top = _zoom_matrix(size, float(factor))
        crop = x[:, top : top + weights.shape[1], top : top + weights.shape[1]]
        out += np.einsum("hi,nijc,wj->nhwc", weights, crop, weights, optimize=True)
    return (x + out) / (len(factors) + 1)


def _plasma_fractal(rng: np.random.Generator, n: int, mapsize: int, decay: float) -> Array:
    """Hendrycks' diamond-square ``plasma_fractal`` for ``n`` maps at once, in [0, 1]."""
    maps = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(array: Array) -> Array:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares += np.roll(squares, -1, axis=2)
        maps[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(squares)
        centres = maps[:, half:mapsize:step, half:mapsize:step]
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def fog(x: Array, level: int, rng: np.random.Generator) -> Array:
    strength, decay = _pick([(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)], level)
    size = x.shape[1]
    mapsize = 1 << max(5, (size - 1).bit_length())
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    plasma = _plasma_fractal(rng, len(x), mapsize, decay)[:, :size, :size, None]
    x = x + strength * plasma.astype(np.float32)
    return x * max_val / (max_val + strength)


def contrast(x: Array, level: int, rng: np.random.Generator) -> Array:
    c = _pick([0.75, 0.5, 0.4, 0.3, 0.15], level)
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def brightness(x: Array, level: int, rng: np.random.Generator) -> Array:
    # HSV value + c, exactly: with hue and saturation fixed, RGB scales with V.
    c = _pick([0.05, 0.1, 0.15, 0.2, 0.3], level)
    value = x.max(axis=3, keepdims=True)
    new_value = np.clip(value + c, 0, 1)
    scale = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * scale, new_value)


def saturate(x: Array, level: int, rng: np.random.Generator) -> Array:
    # HSV saturation * c0 + c1, exactly: channel = V - V * S * f(hue), f fixed by the
    # pixel; grey pixels have hue 0 (red) in skimage's rgb2hsv.
    gain, offset = _pick([(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)], level)
    value = x.max(axis=3, keepdims=True)
    low = x.min(axis=3, keepdims=True)
    chroma = value - low
    sat = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    new_sat = np.clip(sat * gain + offset, 0, 1)
    hue_part = np.divide(value - x, chroma, out=np.zeros_like(x), where=chroma > 0)
    grey = np.broadcast_to(np.array([0.0, 1.0, 1.0], dtype=np.float32), x.shape)
    hue_part = np.where(chroma > 0, hue_part, grey)
    return value - value * new_sat * hue_part


def _per_image(x: Array, function: Callable[[Image.Image], Image.Image]) -> Array:
    pixels = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    out = np.stack([np.asarray(function(Image.fromarray(p)).convert("RGB")) for p in pixels])
    return out.astype(np.float32) / 255


def jpeg(x: Array, level: int, rng: np.random.Generator) -> Array:
    quality = _pick([80, 65, 58, 50, 40], level)

    def compress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _per_image(x, compress)


def pixelate(x: Array, level: int, rng: np.random.Generator) -> Array:
    c = _pick([0.95, 0.9, 0.85, 0.75, 0.65], level)
    size = x.shape[1]
    small = int(size * c)
    return _per_image(
        x,
        lambda im: im.resize((small, small), Image.Resampling.BOX).resize(
            (size, size), Image.Resampling.BOX
        ),
    )


CORRUPTIONS: dict[str, Corruption] = {
    "original": original,
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "zoom_blur": zoom_blur,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def corrupt(
    images: Array, attrs: Array, names: list[str], level: int, rng: np.random.Generator
) -> Array:
    """Apply corruption ``names[a]`` to every uint8 image, one vectorised call per type."""
    x = images.astype(np.float32) / 255
    out = np.empty_like(x)
    for attr in np.unique(attrs):
        idx = np.flatnonzero(attrs == attr)
        out[idx] = CORRUPTIONS[names[int(attr)]](x[idx], level, rng)
    return np.clip(np.rint(np.clip(out, 0, 1) * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- reading CIFAR-10


def _numpy_global(module: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # numpy 2 pickles name ``numpy._core``, numpy 1 ``numpy.core``; accept both.
    for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer")):
        try:
            function = _numpy_global(f"numpy._core.{module}", name)
        except (ImportError, AttributeError):
            function = _numpy_global(f"numpy.core.{module}", name)
        allowed[(f"numpy._core.{module}", name)] = function
        allowed[(f"numpy.core.{module}", name)] = function
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, strings, numbers and numpy arrays: CIFAR batches
    are pickles, and a plain ``pickle.load`` would run any code a tampered file names."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        if (module, name) not in _RestrictedUnpickler._allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and plain data "
                "are allowed in a CIFAR batch"
            )
        return _RestrictedUnpickler._allowed[(module, name)]


def load_cifar_batch(data: bytes, where: str) -> tuple[Array, Array]:
    """Images (n, 32, 32, 3) uint8 and labels (n,) from one pickled CIFAR-10 batch."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise DataError(
            f"cannot read CIFAR-10 batch {where}: {exc}. Use the original "
            "cifar-10-batches-py files (python version of CIFAR-10)"
        ) from exc
    if not isinstance(batch, dict):
        raise DataError(f"{where}: a CIFAR-10 batch must be a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    pixels, labels = batch.get("data"), batch.get("labels")
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise DataError(
            f"{where}: field 'data' must be a (n, 3072) uint8 array, got "
            f"{getattr(pixels, 'shape', type(pixels).__name__)}"
        )
    if labels is None or len(labels) != len(pixels):
        raise DataError(
            f"{where}: field 'labels' must list one label per image "
            f"({len(pixels)} images, {0 if labels is None else len(labels)} labels)"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        row = int(np.flatnonzero((labels < 0) | (labels > 9))[0])
        raise DataError(f"{where}: label {labels[row]} of image {row} is outside 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _decode_image(data: bytes | Path, where: str) -> Array:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}; replace or remove it") from exc
    if array.shape != (32, 32, 3):
        raise DataError(
            f"{where} is {array.shape[1]}x{array.shape[0]}, but CIFAR-10 images are 32x32 "
            "(the corruption constants are set for 32 px)"
        )
    return array


def _class_order(names: set[str], where: str) -> list[str]:
    if names == set(CIFAR_CLASSES):
        return list(CIFAR_CLASSES)
    if len(names) != 10:
        raise DataError(
            f"{where}: found {len(names)} class folders ({sorted(names)}); Corrupted "
            "CIFAR-10 needs the 10 CIFAR-10 classes, one folder each"
        )
    return sorted(names)


def _limit(labels: Array, n_per_class: int | None) -> Array:
    """Indices of the first ``n_per_class`` samples of each class, in order."""
    if n_per_class is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:n_per_class]] = True
    return np.flatnonzero(keep)


Split = tuple[Array, Array, list[str]]  # images, labels, origin of each image


def _from_batches(files: dict[str, bytes], n_per_class: int | None) -> dict[str, Split]:
    parts: dict[str, Split] = {}
    for split, names in (
        ("train", [f"data_batch_{i}" for i in range(1, 6)]),
        ("test", ["test_batch"]),
    ):
        images, labels, origin = [], [], []
        for name in names:
            if name not in files:
                raise DataError(f"CIFAR-10 batch {name} is missing next to data_batch_1")
            pixels, targets = load_cifar_batch(files[name], name)
            images.append(pixels)
            labels.append(targets)
            origin += [f"{name}:{i}" for i in range(len(targets))]
        all_labels = np.concatenate(labels)
        keep = _limit(all_labels, n_per_class)
        parts[split] = (np.concatenate(images)[keep], all_labels[keep], [origin[i] for i in keep])
    return parts


def _from_listing(
    listing: dict[tuple[str, str], list[str]],
    read: Callable[[str], bytes | Path],
    n_per_class: int | None,
    where: str,
) -> tuple[dict[str, Split], list[str]]:
    """Decode images listed as (split, class) -> sorted names, the first ``n_per_class``
    of each class."""
    classes = {cls for (_, cls) in listing}
    order = _class_order(classes, where)
    parts: dict[str, Split] = {}
    for split in ("train", "test"):
        images, labels, origin = [], [], []
        for label, cls in enumerate(order):
            names = sorted(listing.get((split, cls), []))[:n_per_class]
            for name in names:
                images.append(_decode_image(read(name), f"{where}:{name}"))
                labels.append(label)
                origin.append(name)
        if not images:
            raise DataError(f"{where}: no images under {split}/<class>/")
        parts[split] = (np.stack(images), np.asarray(labels, dtype=np.int64), origin)
    return parts, order


def _listing_key(parts: tuple[str, ...]) -> tuple[str, str] | None:
    if len(parts) < 3 or parts[-3] not in ("train", "test"):
        return None
    if parts[-1].startswith(".") or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    return parts[-3], parts[-2]


def _from_folders(base: Path, n_per_class: int | None) -> tuple[dict[str, Split], list[str]]:
    listing: dict[tuple[str, str], list[str]] = {}
    for path in base.glob("*/*/*"):
        relative = path.relative_to(base)
        key = _listing_key(relative.parts)
        if key is not None and path.is_file():
            listing.setdefault(key, []).append(relative.as_posix())
    return _from_listing(listing, lambda name: base / name, n_per_class, str(base))


def _from_archive(path: Path, n_per_class: int | None) -> tuple[dict[str, Split], list[str]]:
    batches: dict[str, bytes] = {}
    members: dict[str, bytes] = {}
    listing: dict[tuple[str, str], list[str]] = {}
    batch_name = re.compile(r"^(data_batch_[1-5]|test_batch)$")
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = tuple(Path(member.name).parts)
                if parts and batch_name.match(parts[-1]):
                    batches[parts[-1]] = archive.extractfile(member).read()
                    continue
                key = _listing_key(parts)
                if key is not None:
                    members[member.name] = archive.extractfile(member).read()
                    listing.setdefault(key, []).append(member.name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read archive {path}: {exc}; download it again") from exc
    if "data_batch_1" in batches:
        return _from_batches(batches, n_per_class), list(CIFAR_CLASSES)
    if not listing:
        raise DataError(
            f"{path} holds neither CIFAR-10 python batches nor {{train,test}}/<class>/ "
            "image folders"
        )
    return _from_listing(listing, members.__getitem__, n_per_class, str(path))


def load_cifar10(
    root: Path, n_per_class: int | None = None
) -> tuple[dict[str, Split], list[str], str]:
    """CIFAR-10 train and test from whatever layout ``root`` holds, the class names, and
    a description of the layout found."""
    for base in (root, root / "cifar-10-batches-py"):
        if (base / "data_batch_1").is_file():
            files = {
                p.name: p.read_bytes()
                for p in base.iterdir()
                if p.is_file() and re.match(r"^(data_batch_[1-5]|test_batch)$", p.name)
            }
            return _from_batches(files, n_per_class), list(CIFAR_CLASSES), f"batches in {base}"
    for base in (root, root / "cifar10", root / "CIFAR10", root / "cifar-10"):
        if (base / "train").is_dir() and (base / "test").is_dir():
            parts, classes = _from_folders(base, n_per_class)
            return parts, classes, f"class folders in {base}"
    if root.is_file():
        archives = [root]
    else:
        archives = sorted(p for p in root.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar")))
        archives.sort(key=lambda p: "cifar" not in p.name.lower())
    if archives:
        parts, classes = _from_archive(archives[0], n_per_class)
        return parts, classes, f"archive {archives[0]}"
    raise DataError(
        f"no CIFAR-10 found in {root}: expected cifar-10-batches-py/data_batch_1..5 + "
        "test_batch, {train,test}/<class>/*.png|jpg folders, or a .tar.gz of either"
    )


@reader("corrupted_cifar10")
def read_corrupted_cifar10(
    root: Path | None,
    conflict_ratio: float = 0.01,
    severity: int = 4,
    seed: int = 0,
    val_fraction: float = 0.1,
    n_per_class: int | None = None,
    corruptions: list[str] | None = None,
) -> GroupTable:
    """Corrupted CIFAR-10 (LfF protocol) from CIFAR-10 under ``root``; see the module
    docstring. ``severity`` is LfF's 1..4 (Hendrycks level ``severity + 1``);
    ``n_per_class`` caps the images read per class and source split (for speed);
    ``corruptions`` lists the ten corruption names, one bias per class in class order."""
    if root is None:
        raise ConfigError("corrupted_cifar10 needs the folder or archive that holds CIFAR-10")
    if not 0.0 <= conflict_ratio <= 0.9:
        raise ConfigError(f"corrupted_cifar10: conflict_ratio={conflict_ratio}; use e.g. 0.01")
    if severity not in range(1, 5):
        raise ConfigError(
            f"corrupted_cifar10: severity={severity}; choose 1..4 (LfF's naming; "
            "4 applies Hendrycks' level 5)"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"corrupted_cifar10: val_fraction={val_fraction}; choose in [0, 1)")
    if n_per_class is not None and n_per_class < 1:
        raise ConfigError(f"corrupted_cifar10: n_per_class={n_per_class} must be >= 1")
    names = list(DEFAULT_CORRUPTIONS if corruptions is None else corruptions)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or len(names) != 10 or len(set(names)) != 10:
        raise ConfigError(
            f"corrupted_cifar10: corruptions must be 10 distinct names from "
            f"{', '.join(CORRUPTIONS)}; got {names}" + (f" (unknown: {unknown})" if unknown else "")
        )
    if not root.exists():
        raise DataError(f"corrupted_cifar10: {root} does not exist")

    source, class_names, description = load_cifar10(root, n_per_class)
    level = severity + 1
    pool_images, pool_labels, pool_origin = source["train"]
    is_val = stratified_holdout(pool_labels, val_fraction, np.random.default_rng(SPLIT_SEED))
    parts = {
        "train": (pool_images[~is_val], pool_labels[~is_val], np.asarray(pool_origin)[~is_val]),
        "val": (pool_images[is_val], pool_labels[is_val], np.asarray(pool_origin)[is_val]),
        "test": (source["test"][0], source["test"][1], np.asarray(source["test"][2])),
    }
    images, frame = lff_split_frames(
        parts,
        lambda pixels, attrs, rng: corrupt(pixels, attrs, names, level, rng),
        10,
        conflict_ratio,
        seed,
        "corrupted_cifar10/",
    )
    return GroupTable(
        frame=frame,
        store=ArrayStore(images, prefix="corrupted_cifar10/"),
        class_names=class_names,
        attr_names=names,
        name="corrupted_cifar10",
        info={
            "source": description,
            "conflict_ratio": conflict_ratio,
            "severity": severity,
            "hendrycks_level": level,
            "seed": seed,
            "n_per_class": n_per_class,
            "corruptions": names,
            "lff_type0": LFF_TYPE0,
            "split_sizes": frame["split"].value_counts().to_dict(),
            "protocol": (
                "LfF Corrupted CIFAR-10: corruption c is class c's bias; train conflicting "
                "samples spread equally over the other corruptions; val and test unbiased"
            ),
        },
    )
