"""The synthetic store: generated images with their provenance, resumable and sharded.

Layout of a store rooted at ``root`` (usually a folder of the run directory)::

    root/images/<name>.png            one file per generated image
    root/masks/<name>.png             the request's mask, when it had one
    root/manifest/part-000.jsonl      one JSON row per finished image, per process
    root/manifest.csv                 all rows merged, in request order (rewritten at
                                      the end of every complete generation call)

``<name>`` is the request key made filename-safe (characters outside ``[A-Za-z0-9._-/]``
become ``_`` and a short hash of the key is appended when anything changed, so two keys
never share a file). A key that would leave ``root`` (``..``, an absolute path) is
refused with a :class:`DataError`.

Crash safety: for every image the PNG (and mask) is written atomically first, then its
manifest row is appended, flushed and fsynced. A row therefore always points to a
complete file; a file without a row (a crash between the two) is simply generated again
and overwritten. A crash in the middle of a row leaves a truncated last line, which
readers ignore and the owning process rewrites cleanly before it appends again. A rerun
skips every key that already has a row, so an interrupted generation resumes where it
stopped without duplicates.

Sharding: process ``i`` of ``n`` takes ``requests[i::n]`` (independent of what is already
done), generates only those and appends only to ``part-{i:03d}.jsonl``. The main process
merges the parts into ``manifest.csv`` once every process is done. Images depend only on
their request (``generate_fn`` must seed per request, as diffusers does with one
``torch.Generator`` per image), so 1 and N processes produce the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from unspur.data.store import FolderStore, PrefixStore, safe_join
from unspur.data.table import GroupTable
from unspur.errors import DataError, UnspurError
from unspur.io import atomic_write_text, atomic_write_with

IMAGES_DIR = "images"
MASKS_DIR = "masks"
MANIFEST_DIR = "manifest"
MANIFEST_CSV = "manifest.csv"
#: Fields compared between a request and the row already stored under its key: a rerun
#: with other inputs for a done key is refused instead of silently keeping old images.
INPUT_FIELDS = ("prompt", "seed", "y", "a", "parent", "generator", "weights_id", "extra")
#: Columns of :meth:`SyntheticStore.to_frame` before the ``score_*`` and ``extra_*`` ones.
BASE_COLUMNS = (
    "key", "index", "filename", "y", "a", "parent", "prompt", "seed", "generator",
    "weights_id", "mask", "kept", "reason", "created",
)  # fmt: skip

_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


@dataclass
class GenerationRequest:
    """One image to generate.

    ``key`` is a unique, stable id (e.g. ``f"{parent}-{i}"``): it names the file and is
    how a rerun recognises work already done. ``y`` and ``a`` are the labels of the
    image to be made; ``parent`` the table filename of the real image it derives from.
    ``image`` and ``mask`` (PIL, mask in mode ``L``) feed inpainting or editing; the
    mask is stored next to the image. ``extra`` holds further JSON-able provenance
    (guidance scale, edit strength, the source of an injected content...).
    """

    key: str
    prompt: str | None
    seed: int
    y: int
    a: int
    parent: str | None = None
    image: Image.Image | None = field(default=None, repr=False, compare=False)
    mask: Image.Image | None = field(default=None, repr=False, compare=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise DataError(f"a generation request needs a non-empty string key, got {self.key!r}")
        self.seed = int(self.seed)
        self.y = int(self.y)
        self.a = int(self.a)
        self.extra = dict(self.extra)


@dataclass(frozen=True)
class FilterResult:
    """A filter's verdict on one image: a named score, keep or not, and why not."""

    score_name: str
    score: float | None
    keep: bool
    reason: str = ""


#: ``generate_fn(requests) -> images``, one PIL image per request, in order.
GenerateFn = Callable[[list[GenerationRequest]], Sequence[Image.Image]]
#: ``filter(requests, images) -> results``, one :class:`FilterResult` per image.
Filter = Callable[[Sequence[GenerationRequest], Sequence[Image.Image]], Sequence[FilterResult]]


@dataclass
class GenerationResult:
    """What one process did in one :func:`generate_into_store` call."""

    process_index: int
    num_processes: int
    assigned: int  # requests in this process's shard
    resumed: int  # of those, already in the store
    generated: int  # written by this call (kept or pruned)
    merged: bool  # whether this process wrote manifest.csv


def image_seed(seed: int, g: int, i: int) -> int:
    """The seed of image ``i`` of group ``g``: a 32-bit draw from ``(seed, g, i)``.

    Independent of batch size and generation order, so a resumed or sharded run draws
    the same image for the same ``(g, i)``.
    """
    return int(np.random.SeedSequence([abs(int(seed)), int(g), int(i)]).generate_state(1)[0])


def key_to_name(key: str) -> str:
    """The file stem of ``key`` below ``images/``: filename-safe, unique per key."""
    if not isinstance(key, str) or not key:
        raise DataError(f"generation key must be a non-empty string, got {key!r}")
    parts = re.split(r"[/\\]", key)
    if (
        "\x00" in key
        or key.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", key)
        or ".." in parts
    ):
        raise DataError(
            f"generation key {key!r} would escape the synthetic store's folder; keys "
            "must be relative names without '..' or a leading '/'"
        )
    cleaned = [_UNSAFE.sub("_", part) for part in parts if part not in ("", ".")]
    cleaned = ["_" + part if part.startswith(".") else part for part in cleaned]
    if not cleaned:
        raise DataError(f"generation key {key!r} has no usable characters for a filename")
    name = "/".join(cleaned)
    if name != key:
        name = f"{name}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}"
    return name


def _jsonable(value: Any) -> Any:
    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(value, default=default))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _save_png(path: Path, image: Image.Image) -> None:
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        image = image.convert("RGB")
    atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def read_part(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of one manifest part and whether the file ended cleanly.

    A last line cut short by a crash is dropped (``clean`` is False); a broken line
    anywhere else is corruption and raises a :class:`DataError` naming it.
    """
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    clean = True
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)  # text after the final newline: a partial write
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "key" not in row or "filename" not in row:
                raise ValueError("not a manifest row")
        except ValueError as exc:
            if last:
                return rows, False
            raise DataError(
                f"{path}, line {number} is not a manifest row ({exc}); the part is "
                "corrupt: delete that line (its image will be generated again)"
            ) from exc
        rows.append(row)
        clean = clean and not last
    return rows, clean


class SyntheticStore:
    """Generated images and their manifest below ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- paths -------------------------------------------------------------------------
    def image_filename(self, key: str) -> str:
        """The image's path relative to ``root``, e.g. ``images/parent.jpg-0.png``."""
        return f"{IMAGES_DIR}/{key_to_name(key)}.png"

    def mask_filename(self, key: str) -> str:
        return f"{MASKS_DIR}/{key_to_name(key)}.png"

    def path(self, filename: str) -> Path:
        return safe_join(self.root, filename)

    def part_path(self, process_index: int) -> Path:
        return self.root / MANIFEST_DIR / f"part-{process_index:03d}.jsonl"

    def parts(self) -> list[Path]:
        folder = self.root / MANIFEST_DIR
        return sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []

    # -- reading -----------------------------------------------------------------------
    def rows(self) -> dict[str, dict[str, Any]]:
        """One row per key from every part; a key written twice keeps its latest row.

        (A key is written twice only when its image file went missing after its row was
        written and a rerun generated it again.)
        """
        latest: dict[str, dict[str, Any]] = {}
        for part in self.parts():
            for row in read_part(part)[0]:
                old = latest.get(row["key"])
                if old is None or str(row.get("created", "")) >= str(old.get("created", "")):
                    latest[row["key"]] = row
        return latest

    def done(self) -> dict[str, dict[str, Any]]:
        """The rows whose image file exists: the keys a rerun skips."""
        return {
            key: row for key, row in self.rows().items() if self.path(row["filename"]).is_file()
        }

    def __len__(self) -> int:
        return len(self.rows())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.done()

    def image(self, key: str) -> Image.Image:
        """The stored image of ``key``."""
        row = self.rows().get(key)
        if row is None:
            raise DataError(f"the synthetic store {self.root} has no image with key {key!r}")
        return FolderStore(self.root).open(row["filename"])

    def to_frame(self, order: Sequence[str] | None = None) -> pd.DataFrame:
        """Every row as a flat frame: scores become ``score_<name>``, extras ``extra_<name>``.

        Rows are sorted by ``order`` (keys; others after) or else by request index.
        Raises a :class:`DataError` when a row's image file is missing.
        """
        rows = list(self.rows().values())
        for row in rows:
            if not self.path(row["filename"]).is_file():
                raise DataError(
                    f"synthetic store {self.root}: key {row['key']!r} has a manifest row but "
                    f"its image {row['filename']} is missing; rerun the generation to make "
                    "it again"
                )
        records = []
        for row in rows:
            record = {column: row.get(column) for column in BASE_COLUMNS}
            for name, value in (row.get("scores") or {}).items():
                record[f"score_{name}"] = math.nan if value is None else value
            for name, value in (row.get("extra") or {}).items():
                record[f"extra_{name}"] = (
                    json.dumps(value) if isinstance(value, (dict, list)) else value
                )
            records.append(record)
        frame = pd.DataFrame.from_records(records, columns=None if records else list(BASE_COLUMNS))
        rest = sorted(c for c in frame.columns if c not in BASE_COLUMNS)
        frame = frame[list(BASE_COLUMNS) + rest]
        if len(frame):
            position = {key: i for i, key in enumerate(order or ())}
            rank = frame["key"].map(lambda k: position.get(k, len(position)))
            frame = (
                frame.assign(_rank=rank)
                .sort_values(["_rank", "index", "key"], kind="stable")
                .drop(columns="_rank")
            )
            for column in ("index", "y", "a"):
                frame[column] = frame[column].astype("int64")
            frame["seed"] = frame["seed"].astype("Int64")
            frame["kept"] = frame["kept"].astype(bool)
        return frame.reset_index(drop=True)

    def write_manifest(self, order: Sequence[str] | None = None) -> Path:
        """Merge the parts into ``manifest.csv`` (atomically) and return its path."""
        path = self.root / MANIFEST_CSV
        atomic_write_text(path, self.to_frame(order).to_csv(index=False))
        return path

    def summary(self) -> dict[str, Any]:
        """Counts generated / kept / pruned, pruned by reason, and per ``(y, a)`` group."""
        rows = list(self.rows().values())
        kept = [bool(row.get("kept")) for row in rows]
        reasons = Counter(row.get("reason") or "" for row, k in zip(rows, kept) if not k)
        groups: dict[tuple[int, int], list[int]] = {}
        for row, k in zip(rows, kept):
            counts = groups.setdefault((int(row["y"]), int(row["a"])), [0, 0])
            counts[0 if k else 1] += 1
        return {
            "root": str(self.root),
            "generated": len(rows),
            "kept": sum(kept),
            "pruned": len(rows) - sum(kept),
            "pruned_by_reason": dict(sorted(reasons.items())),
            "groups": [
                {"y": y, "a": a, "generated": k + p, "kept": k, "pruned": p}
                for (y, a), (k, p) in sorted(groups.items())
            ],
            "generators": dict(
                Counter(f"{row.get('generator')} ({row.get('weights_id')})" for row in rows)
            ),
        }

    # -- merging into the canonical table ---------------------------------------------
    def to_table(
        self,
        base: GroupTable,
        split: str = "train",
        kept_only: bool = True,
        prefix: str = "synthetic/",
    ) -> GroupTable:
        """``base`` plus one row per stored image, ``source="synthetic"``, in ``split``.

        Synthetic filenames are ``prefix + "images/<name>.png"``; the returned table's
        store (and mask store, when masks were stored) routes ``prefix`` to this store's
        folder and everything else to ``base``'s. Base rows get ``source="real"`` when
        the column is missing; provenance columns are NaN for them. Use another
        ``prefix`` to merge a second store into an already merged table.
        """
        if not prefix:
            raise ValueError("to_table needs a non-empty filename prefix")
        clash = base.frame["filename"].astype(str).str.startswith(prefix)
        if clash.any():
            raise DataError(
                f"{base.name}: filename {base.frame['filename'][clash].iloc[0]!r} already "
                f"starts with {prefix!r}; merge this synthetic store with another prefix"
            )
        frame = self.to_frame()
        if kept_only and len(frame):
            frame = frame[frame["kept"]]
        for column, names in (("y", base.class_names), ("a", base.attr_names)):
            bad = (frame[column] < 0) | (frame[column] >= len(names))
            if bad.any():
                row = frame[bad].iloc[0]
                raise DataError(
                    f"synthetic image {row['key']!r} has {column}={row[column]}, outside "
                    f"0..{len(names) - 1} of {base.name}'s "
                    f"{'classes' if column == 'y' else 'attributes'} {names}"
                )
        synthetic = frame.drop(columns=["index"]).assign(
            filename=prefix + frame["filename"],
            mask=frame["mask"].map(lambda m: prefix + m if isinstance(m, str) else m),
            split=split,
            source="synthetic",
        )
        has_masks = bool(synthetic["mask"].map(lambda m: isinstance(m, str)).any())
        if not has_masks and "mask" not in base.frame.columns:
            synthetic = synthetic.drop(columns=["mask"])
        real = base.frame.copy()
        if "source" not in real.columns:
            real["source"] = "real"
        merged = pd.concat([real, synthetic], ignore_index=True) if len(synthetic) else real
        if len(synthetic):
            merged["seed"] = merged["seed"].astype("Int64")
            merged["kept"] = merged["kept"].astype("boolean")
        folder = FolderStore(self.root)
        info = dict(base.info)
        info["synthetic_stores"] = [
            *base.info.get("synthetic_stores", []),
            {"root": str(self.root), "prefix": prefix, "split": split, "rows": len(synthetic)},
        ]
        mask_store = base.mask_store
        if has_masks:
            mask_store = PrefixStore({prefix: folder}, default=base.mask_store)
        return GroupTable(
            frame=merged,
            store=PrefixStore({prefix: folder}, default=base.store),
            class_names=list(base.class_names),
            attr_names=list(base.attr_names),
            name=base.name,
            mask_store=mask_store,
            info=info,
        )


# -- processes ---------------------------------------------------------------------------
@dataclass
class _Processes:
    index: int
    count: int
    barrier: Callable[[], None] | None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _processes(
    accelerator: Any, process_index: int | None, num_processes: int | None
) -> _Processes:
    """Who am I: an accelerate object, explicit indices, torch.distributed, or alone."""
    if accelerator is not None:
        return _Processes(
            int(accelerator.process_index),
            int(accelerator.num_processes),
            accelerator.wait_for_everyone,
        )
    if process_index is not None or num_processes is not None:
        if process_index is None or num_processes is None:
            raise UnspurError("give both process_index and num_processes, or neither")
        if not 0 <= process_index < num_processes:
            raise UnspurError(f"process_index {process_index} is outside 0..{num_processes - 1}")
        return _Processes(int(process_index), int(num_processes), None)
    torch = sys.modules.get("torch")
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        dist = torch.distributed
        return _Processes(dist.get_rank(), dist.get_world_size(), dist.barrier)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate
        import torch
        from accelerate import PartialState

        # Without cpu=True accelerate does not start a gloo group on a CPU-only machine.
        state = PartialState(cpu=not torch.cuda.is_available())
        return _Processes(state.process_index, state.num_processes, state.wait_for_everyone)
    return _Processes(0, 1, None)


def _check_requests(store: SyntheticStore, requests: Sequence[GenerationRequest]) -> None:
    seen: dict[str, str] = {}
    for request in requests:
        name = key_to_name(request.key)
        store.path(store.image_filename(request.key))  # refuses escapes once more
        if name in seen:
            if seen[name] == request.key:
                raise DataError(
                    f"generation key {request.key!r} appears twice; keys must be unique"
                )
            raise DataError(
                f"generation keys {seen[name]!r} and {request.key!r} map to the same file "
                f"name {name!r}; choose keys that differ in more than punctuation"
            )
        seen[name] = request.key


def _inputs(request: GenerationRequest, generator: str, weights_id: str) -> dict[str, Any]:
    return _jsonable(
        {
            "prompt": request.prompt,
            "seed": request.seed,
            "y": request.y,
            "a": request.a,
            "parent": request.parent,
            "generator": generator,
            "weights_id": weights_id,
            "extra": request.extra,
        }
    )


def _check_stale(
    store: SyntheticStore,
    requests: Sequence[GenerationRequest],
    done: dict[str, dict[str, Any]],
    generator: str,
    weights_id: str,
) -> None:
    for request in requests:
        row = done.get(request.key)
        if row is None:
            continue
        new = _inputs(request, generator, weights_id)
        changed = [
            f"{name}: {row.get(name)!r} -> {new[name]!r}"
            for name in INPUT_FIELDS
            if _jsonable(row.get(name, {} if name == "extra" else None)) != new[name]
        ]
        if changed:
            raise DataError(
                f"synthetic store {store.root}: key {request.key!r} was generated from other "
                f"inputs ({'; '.join(changed[:4])}). Use a new store folder or new keys, or "
                "delete the store to generate again"
            )


def _apply_filters(
    filters: Sequence[Filter], batch: list[GenerationRequest], images: Sequence[Image.Image]
) -> list[tuple[dict[str, float | None], bool, str]]:
    scores: list[dict[str, float | None]] = [{} for _ in batch]
    failed: list[list[str]] = [[] for _ in batch]
    for check in filters:
        results = list(check(batch, images))
        if len(results) != len(batch):
            raise UnspurError(
                f"filter {getattr(check, '__name__', type(check).__name__)} returned "
                f"{len(results)} results for {len(batch)} images"
            )
        for j, result in enumerate(results):
            score = result.score
            scores[j][result.score_name] = None if score is None else float(score)
            if not result.keep:
                failed[j].append(result.reason or f"{result.score_name} filter")
    return [(s, not f, "; ".join(f)) for s, f in zip(scores, failed)]


def _batches(items: list[GenerationRequest], size: int) -> Iterable[list[GenerationRequest]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _remove_stale_tmp(store: SyntheticStore) -> None:
    """Temporary files of atomic writes killed mid-way (only when every process is done)."""
    for folder in (IMAGES_DIR, MASKS_DIR, MANIFEST_DIR):
        directory = store.root / folder
        if directory.is_dir():
            for tmp in directory.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
    for tmp in store.root.glob(f".{MANIFEST_CSV}.*.tmp"):
        tmp.unlink(missing_ok=True)


def generate_into_store(
    store: SyntheticStore,
    requests: Sequence[GenerationRequest],
    generate_fn: GenerateFn,
    *,
    generator_name: str,
    weights_id: str,
    batch_size: int = 8,
    filters: Sequence[Filter] = (),
    accelerator: Any = None,
    process_index: int | None = None,
    num_processes: int | None = None,
) -> GenerationResult:
    """Generate every request not yet in ``store``; this process takes its shard only.

    Processes come from ``accelerator`` (an ``accelerate.Accelerator`` or
    ``PartialState``), else explicit ``process_index``/``num_processes`` (no barrier: the
    process that finds every key done merges), else an initialised torch.distributed
    group, else a torchrun/accelerate launch (``WORLD_SIZE`` > 1, through
    ``PartialState``), else a single process. Every image is recorded, pruned ones with
    ``kept=False`` and the filters' reasons. Done keys whose stored inputs (prompt,
    seed, labels, parent, generator, weights id, extra) differ from the request are
    refused with a :class:`DataError`.
    """
    if batch_size < 1:
        raise UnspurError(f"batch_size must be at least 1, got {batch_size}")
    requests = list(requests)
    _check_requests(store, requests)
    procs = _processes(accelerator, process_index, num_processes)
    done = store.done()
    _check_stale(store, requests, done, generator_name, weights_id)

    mine = requests[procs.index :: procs.count]
    todo = [request for request in mine if request.key not in done]
    index = {request.key: i for i, request in enumerate(requests)}
    part = store.part_path(procs.index)
    part.parent.mkdir(parents=True, exist_ok=True)
    if part.exists():
        rows, clean = read_part(part)
        if not clean:  # a crash cut the last row: rewrite the part without it
            atomic_write_text(part, "".join(json.dumps(row) + "\n" for row in rows))

    generated = 0
    if todo:
        with open(part, "a", encoding="utf-8") as handle:
            for batch in _batches(todo, batch_size):
                images = list(generate_fn(batch))
                if len(images) != len(batch):
                    raise UnspurError(
                        f"generate_fn returned {len(images)} images for {len(batch)} requests"
                    )
                verdicts = _apply_filters(filters, batch, images)
                for request, image, (scores, kept, reason) in zip(batch, images, verdicts):
                    filename = store.image_filename(request.key)
                    _save_png(store.path(filename), image)
                    mask = None
                    if request.mask is not None:
                        mask = store.mask_filename(request.key)
                        _save_png(store.path(mask), request.mask.convert("L"))
                    row = {
                        "key": request.key,
                        "index": index[request.key],
                        "filename": filename,
                        **_inputs(request, generator_name, weights_id),
                        "mask": mask,
                        "scores": _jsonable(scores),
                        "kept": kept,
                        "reason": reason,
                        "created": _now(),
                    }
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    generated += 1

    order = [request.key for request in requests]
    merged = False
    if procs.barrier is not None:
        procs.barrier()
        if procs.is_main:
            store.write_manifest(order)
            _remove_stale_tmp(store)
            merged = True
        procs.barrier()  # manifest.csv exists on return, on every process
    elif procs.count == 1 or set(order) <= set(store.done()):
        store.write_manifest(order)
        if procs.count == 1:
            _remove_stale_tmp(store)
        merged = True
    return GenerationResult(
        process_index=procs.index,
        num_processes=procs.count,
        assigned=len(mine),
        resumed=len(mine) - len(todo),
        generated=generated,
        merged=merged,
    )


def find_stores(run_dir: str | Path) -> list[Path]:
    """Every synthetic store below ``run_dir`` (a folder holding ``manifest/part-*.jsonl``),
    in path order: where a run's generative methods left their images."""
    return sorted({part.parent.parent for part in Path(run_dir).glob("**/manifest/part-*.jsonl")})


def run_store_rows(run_dir: str | Path) -> list[tuple[Path, list[dict[str, Any]]]]:
    """``(store root, rows)`` for every store below ``run_dir``, rows in request order
    (``index``, then key). A store with a corrupt manifest part is left out, so reports
    and measurements of a run still render without it."""
    found = []
    for root in find_stores(run_dir):
        try:
            rows = list(SyntheticStore(root).rows().values())
        except UnspurError:
            continue
        found.append((root, sorted(rows, key=lambda r: (int(r.get("index", 0)), str(r["key"])))))
    return found
