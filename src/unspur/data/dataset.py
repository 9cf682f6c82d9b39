"""``GroupDataset``: a split of a :class:`GroupTable` as a torch ``Dataset``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from unspur.config import TrainConfig
from unspur.data.table import GroupTable
from unspur.data.transforms import Compose
from unspur.errors import DataError


class ItemError(DataError):
    """A :class:`DataError` raised while loading an item, readable after a worker.

    A DataLoader worker sends the exception back as text and the main process rebuilds
    it as ``type(exc)("Caught ... in DataLoader worker process 0. Original Traceback
    ...")``: 30 lines of worker traceback around the one sentence the user needs. This
    class keeps only the original message (plus where it happened), so the CLI prints
    the same paragraph with ``num_workers > 0`` as without.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_worker_message(message, type(self)))


def _worker_message(message: str, cls: type) -> str:
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind(marker)
    if at < 0:
        return message
    original = message[at + len(marker) :].strip()
    return f"{original} (raised in a DataLoader worker)"


class GroupItems:
    """Group bookkeeping shared by every dataset the training loop sees.

    Needs ``self.table`` (for the numbers of classes and groups) and ``self.g`` (the
    group id of every item, duplicates included).
    """

    table: GroupTable
    g: torch.Tensor

    @property
    def n_groups(self) -> int:
        return self.table.n_groups

    @property
    def n_classes(self) -> int:
        return self.table.n_classes

    def group_counts(self) -> torch.Tensor:
        return torch.bincount(self.g, minlength=self.n_groups)


#: Memory for decoded, resized images per dataset: ``train.cache_mb``'s default.
DECODE_CACHE_MB = TrainConfig.cache_mb


class GroupDataset(GroupItems, Dataset):
    """Items are ``(image_tensor, y, g, index)``; ``index`` is the row in ``table``.

    ``raw(i)`` returns the untransformed PIL image for generators and segmenters, so the
    classifier's transforms never leak into them.

    Decoding a JPEG and resizing it cost more than a small model's step on it, and every
    epoch and evaluation repeated both. So the image after the transform's fixed steps
    (resize, centre crop: :attr:`Compose.fixed_steps`) is kept in memory, up to
    ``cache_mb`` per dataset, in the main process only (DataLoader workers decode in
    parallel instead); random steps (crops, flips) still run on every access. The
    tensors are the same as without the cache; ``cache_mb=0`` turns it off.
    """

    def __init__(
        self,
        table: GroupTable,
        transform: Callable[[Image.Image], torch.Tensor],
        cache_mb: int = DECODE_CACHE_MB,
    ):
        self.table = table
        self.transform = transform
        self.filenames = table.frame["filename"].tolist()
        self.y = torch.tensor(table.frame["y"].to_numpy(), dtype=torch.long)
        self.a = torch.tensor(table.frame["a"].to_numpy(), dtype=torch.long)
        self.g = torch.as_tensor(table.groups, dtype=torch.long)
        self.cache_mb = max(0, int(cache_mb))
        self.cache_bytes = self.cache_mb * 2**20
        self._cache: dict[int, Image.Image] = {}
        self._cached_bytes = 0
        self._cache_owner: Callable[[Image.Image], torch.Tensor] | None = transform

    def __len__(self) -> int:
        return len(self.filenames)

    def raw(self, index: int) -> Image.Image:
        """The image of item ``index``; a missing or broken file raises :class:`ItemError`
        (also inside the datasets of generators that wrap this one in a DataLoader)."""
        try:
            return self.table.store.open(self.filenames[index]).convert("RGB")
        except ItemError:
            raise
        except DataError as exc:
            raise ItemError(str(exc)) from exc

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        return self.image(index), int(self.y[index]), int(self.g[index]), index

    def image(self, index: int) -> torch.Tensor:
        """Item ``index`` through the transform, the fixed steps' output cached."""
        transform = self.transform
        if (
            not self.cache_bytes
            or not isinstance(transform, Compose)
            or not transform.fixed_steps
            or get_worker_info() is not None
        ):
            return transform(self.raw(index))
        if self._cache_owner is not transform:  # a transform swapped in: start afresh
            self._cache, self._cached_bytes, self._cache_owner = {}, 0, transform
        image = self._cache.get(index)
        if image is None:
            image = transform.prefix(self.raw(index))
            size = image.width * image.height * len(image.getbands())
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[index] = image
                self._cached_bytes += size
        return transform.finish(image)

    def __getstate__(self) -> dict:
        # A copy sent to a DataLoader worker or pickled travels without the cache.
        state = dict(self.__dict__)
        state["_cache"], state["_cached_bytes"] = {}, 0
        return state


def drop_bad_images(table: GroupTable, policy: str = "fail") -> GroupTable:
    """Decode every image once; with ``policy="skip"`` drop the ones that fail.

    With ``"fail"`` nothing is scanned up front: the first unreadable image raises a
    :class:`DataError` naming it when it is loaded. The number skipped is recorded in
    ``table.info["skipped_bad_images"]`` and the names in ``..._files``.
    """
    if policy == "fail":
        return table
    if policy != "skip":
        raise DataError(f"on_bad_image must be 'fail' or 'skip', got {policy!r}")
    from unspur.data.checks import find_bad_images

    bad = find_bad_images(table)
    result = table.subset(~table.frame["filename"].isin(bad).to_numpy())
    result.info["skipped_bad_images"] = len(bad)
    result.info["skipped_bad_image_files"] = bad[:20]
    return result
