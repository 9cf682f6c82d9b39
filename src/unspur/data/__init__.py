"""Datasets: the canonical table, readers for each benchmark, splits and transforms."""

from unspur.data.dataset import GroupDataset, drop_bad_images
from unspur.data.registry import available_datasets, load_dataset, reader
from unspur.data.store import ArrayStore, BytesStore, FolderStore, safe_join
from unspur.data.table import GroupTable, group_ids, require_nonempty_groups

__all__ = [
    "ArrayStore",
    "BytesStore",
    "FolderStore",
    "GroupDataset",
    "GroupTable",
    "available_datasets",
    "drop_bad_images",
    "group_ids",
    "load_dataset",
    "reader",
    "require_nonempty_groups",
    "safe_join",
]
