"""Atomic writes: a file or directory is either the old version or the complete new one.

Long stages (training, generation) can be interrupted at any moment; what they leave on
disk must never be half-written, and a restart must find the last complete state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it, rename it over.

    For writers that insist on a file name (safetensors, torch.save).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: str | Path) -> Path:
    """Finish an interrupted :func:`atomic_dir` swap: restore the old copy if needed."""
    target = Path(target)
    old = _old(target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    old = _old(target)
    if target.exists():
        os.replace(target, old)
    os.replace(scratch, target)
    shutil.rmtree(old, ignore_errors=True)


def lock_beside(folder: Path) -> Path:
    """The lock file of ``folder`` (a run or an asset) for :func:`exclusive_lock`: a
    hidden file next to it, so the folder holds only what its run or build wrote."""
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def exclusive_lock(path: str | Path, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if absent) for the ``with`` block;
    yields False, holding nothing, when another process holds it, or with ``wait``
    blocks until that process lets go and then yields True.

    The lock is the operating system's (``flock``), so it is released when its process
    ends, however it ends: a killed run leaves no stale lock. Two ``unspur bench`` (or
    ``compare``) processes on one work folder use it to share the runs instead of
    training the same one twice. Systems without ``fcntl`` (Windows) get no locking:
    there, run one process per work folder.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
