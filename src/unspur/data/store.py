"""Where the pixels of a dataset live.

A store maps the ``filename`` column of the canonical table to a PIL image. Readers pick
the store that matches how the owners ship the data: a folder on disk, the members of an
archive held in memory, or arrays built in memory (Colored MNIST, the synthetic
benchmark). Nothing in a store ever writes under the user's data root.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from unspur.errors import DataError


class ImageStore(Protocol):
    """Anything that can open an image by its table filename."""

    def open(self, filename: str) -> Image.Image: ...

    def exists(self, filename: str) -> bool: ...

    def describe(self, filename: str) -> str:
        """A human-readable location, used in error messages."""
        ...


def safe_join(root: Path, relative: str) -> Path:
    """Join ``relative`` to ``root`` and refuse any result outside ``root``.

    Metadata files are user input: a path such as ``../../etc/passwd`` or an absolute path
    must not let a reader touch files outside the dataset's root.
    """
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise DataError(
            f"path {relative!r} escapes the data root {root}; metadata paths must be "
            "relative to the dataset root and stay inside it"
        )
    return candidate


def _decode(data: bytes | Path, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot decode image {where}: {exc}. Replace the file, or leave such images "
            "out with --on-bad-image skip (data.on_bad_image=skip in a config)"
        ) from exc
    return image


class FolderStore:
    """Images as files below a root directory (the usual way benchmarks ship)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, filename: str) -> Path:
        return safe_join(self.root, filename)

    def exists(self, filename: str) -> bool:
        return self.path(filename).is_file()

    def describe(self, filename: str) -> str:
        return str(self.root / filename)

    def open(self, filename: str) -> Image.Image:
        path = self.path(filename)
        if not path.is_file():
            raise DataError(
                f"image file {path} is missing; check that the dataset root "
                f"{self.root} holds the images the metadata lists"
            )
        return _decode(path, str(path))


class BytesStore:
    """Encoded images held in memory, e.g. the members of a ``.tar.gz`` archive."""

    def __init__(self, members: dict[str, bytes], origin: str) -> None:
        self.members = members
        self.origin = origin

    def exists(self, filename: str) -> bool:
        return filename in self.members

    def describe(self, filename: str) -> str:
        return f"{self.origin}:{filename}"

    def open(self, filename: str) -> Image.Image:
        if filename not in self.members:
            raise DataError(f"{self.describe(filename)} is not in the archive")
        return _decode(self.members[filename], self.describe(filename))


class ArrayStore:
    """Decoded images in one uint8 array (N, H, W, C); filenames are ``"<prefix><index>"``.

    Used for datasets that are built rather than read (Colored MNIST, Corrupted CIFAR-10,
    the synthetic benchmark), so they never need to be written to disk.
    """

    def __init__(self, images: np.ndarray, prefix: str = "mem:") -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError("ArrayStore needs a uint8 array of shape (N, H, W[, C])")
        self.images = images
        self.prefix = prefix

    def filename(self, index: int) -> str:
        return f"{self.prefix}{index}"

    def _index(self, filename: str) -> int:
        if not filename.startswith(self.prefix):
            raise DataError(f"{filename!r} is not an in-memory image name ({self.prefix}N)")
        return int(filename[len(self.prefix) :])

    def exists(self, filename: str) -> bool:
        try:
            return 0 <= self._index(filename) < len(self.images)
        except (DataError, ValueError):
            return False

    def describe(self, filename: str) -> str:
        return f"in-memory image {filename}"

    def open(self, filename: str) -> Image.Image:
        array = self.images[self._index(filename)]
        return Image.fromarray(array)


class PrefixStore:
    """Routes each filename by its prefix to a sub-store, which sees the rest of the name.

    ``PrefixStore({"synthetic/": FolderStore(run / "gen")}, default=base)`` serves
    ``synthetic/images/x.png`` as ``images/x.png`` from the generated folder and every
    other name from ``base`` unchanged. The longest matching prefix wins.
    """

    def __init__(self, routes: dict[str, ImageStore], default: ImageStore | None = None) -> None:
        if any(not prefix for prefix in routes):
            raise ValueError("PrefixStore prefixes must be non-empty; use default instead")
        self.routes = dict(sorted(routes.items(), key=lambda item: -len(item[0])))
        self.default = default

    def route(self, filename: str) -> tuple[ImageStore | None, str]:
        """The store that holds ``filename`` and the name to ask it for."""
        for prefix, store in self.routes.items():
            if filename.startswith(prefix):
                return store, filename[len(prefix) :]
        return self.default, filename

    def exists(self, filename: str) -> bool:
        store, name = self.route(filename)
        return store is not None and store.exists(name)

    def describe(self, filename: str) -> str:
        store, name = self.route(filename)
        return filename if store is None else store.describe(name)

    def open(self, filename: str) -> Image.Image:
        store, name = self.route(filename)
        if store is None:
            raise DataError(
                f"no image store holds {filename!r}: it matches none of the prefixes "
                f"{sorted(self.routes)} and there is no default store"
            )
        return store.open(name)


def free_prefix(filenames: Iterable[str], base: str = "generated") -> str:
    """A filename prefix that none of ``filenames`` starts with, for a new PrefixStore route."""
    names = [str(name) for name in filenames]
    prefix, n = f"{base}/", 1
    while any(name.startswith(prefix) for name in names):
        n += 1
        prefix = f"{base}{n}/"
    return prefix
