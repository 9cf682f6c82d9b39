"""Finished stage outputs shared between runs, keyed by every input they depend on.

Variants of a method often differ only in what happens after an expensive stage (DBB's
pruning variants generate the same candidates from the same tokens and keep different
ones). A :class:`SharedCache` lets the first such run publish its finished stage folder
(a copy) and the later ones start from that copy instead of recomputing it.

Each entry is ``ROOT/<stage>-<digest of inputs>/`` with the inputs recorded beside the
files (``cache_inputs.json``), so only runs with exactly the same inputs meet the same
entry; entries are written through a scratch folder and renamed into place, so a reader
never sees half an entry; a restored folder names its entry (``restored_from.json``).
A run restores an entry only into a folder it has not started
itself (an interrupted run resumes its own files), and the stage's own fingerprints
(the synthetic store's per-request inputs, textual inversion's settings) still check
what was restored. Runs keep complete copies, so deleting the cache never breaks a run.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unspur.io import atomic_dir, atomic_write_json, recover_dir

logger = logging.getLogger(__name__)

INPUTS_FILE = "cache_inputs.json"
#: Written into a restored folder: which entry it came from.
RESTORED_FILE = "restored_from.json"


def _digest(inputs: Any) -> str:
    from unspur.stages import digest

    return digest(inputs)


def _is_started(folder: Path) -> bool:
    return folder.exists() and any(folder.iterdir())


class SharedCache:
    """A folder of finished stage outputs, one entry per (stage, inputs)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, stage: str, inputs: Any) -> Path:
        """Where the output of ``stage`` computed from ``inputs`` is kept."""
        return self.root / f"{stage}-{_digest(inputs)[:16]}"

    def restore(self, stage: str, inputs: Any, dest: str | Path) -> Path | None:
        """Copy the entry into ``dest`` when it exists and ``dest`` is not started;
        returns the entry copied from, or None (nothing copied)."""
        entry = recover_dir(self.entry(stage, inputs))
        dest = Path(dest)
        if not (entry / INPUTS_FILE).is_file() or _is_started(dest):
            return None
        with atomic_dir(dest) as scratch:
            shutil.copytree(entry, scratch, dirs_exist_ok=True)
            (scratch / INPUTS_FILE).unlink()
            atomic_write_json(scratch / RESTORED_FILE, {"entry": entry.name})
        logger.info("%s: restored from the shared cache %s", dest, entry)
        return entry

    def publish(self, stage: str, inputs: Any, source: str | Path) -> Path:
        """Copy the finished ``source`` folder into the cache (kept if already there)."""
        entry = recover_dir(self.entry(stage, inputs))
        if (entry / INPUTS_FILE).is_file():
            return entry
        with atomic_dir(entry) as scratch:
            shutil.copytree(source, scratch, dirs_exist_ok=True)
            (scratch / RESTORED_FILE).unlink(missing_ok=True)
            atomic_write_json(scratch / INPUTS_FILE, {"stage": stage, "inputs": inputs})
        return entry


def restored_from(folder: str | Path) -> str | None:
    """The entry a folder was restored from (None: computed by its own run)."""
    try:
        return str(json.loads((Path(folder) / RESTORED_FILE).read_text())["entry"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class StageSharing:
    """A run's use of a :class:`SharedCache` (none when ``root`` is empty): restore a
    folder of ``directory`` before its stage runs, publish it once the stage is done."""

    def __init__(self, root: str | Path | None, directory: str | Path) -> None:
        self.cache = SharedCache(root) if root else None
        self.directory = Path(directory)

    def restore(self, stage: str, inputs: Any, folder: str) -> None:
        if self.cache is not None:
            self.cache.restore(stage, inputs, self.directory / folder)

    def publish(self, stage: str, inputs: Any, folder: str) -> None:
        if self.cache is not None:
            self.cache.publish(stage, inputs, self.directory / folder)

    def restored(self, folders: Sequence[str]) -> dict[str, str]:
        """The ``folders`` of this run restored from the cache, with their entries."""
        found = {folder: restored_from(self.directory / folder) for folder in folders}
        return {folder: entry for folder, entry in found.items() if entry}
