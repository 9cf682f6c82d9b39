"""Assets a suite builds itself (generators), each with a provenance record.

A suite asset with ``build:`` is made by the runner from data the suite names, never
taken from a folder outside the repository::

    assets:
      generator:
        build: domain_model              # unspur.generate.domain.train_domain_model
        data: [data.name=synthetic, data.options.bias=0.5, data.options.seed=1000]
        options: {vae_steps: 300, unet_steps: 1500}   # DomainModelConfig fields
    settings:
      synthetic-99:
        set: [..., "method.options.generator={asset:generator}"]

It is built once into ``WORK/assets/<name>-<fingerprint>`` (the fingerprint covers the
data config, seed and options, so a changed asset gets a new folder, and every run that
names it gets a new config and reruns) and described in ``asset.json``: the data it
learned from (which split, how many images, per group), which labels it saw (captions
that name the bias attribute count as training group labels), the seed, the steps and
what it cost. Each table says how the asset's data relates to the setting's (the same
data or a different configuration, with the keys that differ).

Builders:

* ``domain_model``: a text-to-image domain model (:func:`build_domain_model`).
* ``ddpm``: an unconditional P2-weighted DDPM for DiffInject (:func:`build_ddpm`), trained
  with :func:`unspur.generate.ddpm.train_ddpm` on the data config's training images
  (``images: train``) or on CIFAR-10's clean training images under the data root
  (``images: clean_cifar10``, what Corrupted CIFAR-10 corrupts); its record holds the
  measured ``h_share`` on held-out pairs. Use it as
  ``method.options.ddpm={asset:NAME}/ddpm``.
* ``judge``: a classifier of the class (``target: y``) or of the bias attribute
  (``target: a``) of its own data, for measurements that judge generated images
  (:func:`build_judge`); trained with :func:`unspur.train.loop.fit`. It feeds no
  method, so it adds nothing to the pipeline's supervision. List it in the setting's
  ``uses`` so the runner builds it and hands it to the measurements.

An asset's ``data`` may name a dataset folder of the suite with ``{asset:NAME}`` (e.g.
``data.root={asset:mnist}``): the runner resolves it to ``--data-dir``/path when it
builds, while the fingerprint and the record keep the reference (no machine path).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from unspur.bench.provenance import Clock
from unspur.code_version import code_version
from unspur.errors import ConfigError, did_you_mean
from unspur.io import atomic_write_json, exclusive_lock, lock_beside

BUILDERS = ("domain_model", "ddpm", "judge")
#: ``{asset:NAME}`` in an override: the folder of asset NAME (built by the runner).
ASSET_REF = re.compile(r"\{asset:([^}]*)\}")
ASSET_FILE = "asset.json"


def check_domain_options(options: dict[str, Any], where: str) -> None:
    """Refuse option names :class:`DomainModelConfig` does not have, naming the key."""
    from unspur.generate.domain import DomainModelConfig

    known = [f.name for f in fields(DomainModelConfig)]
    for key in options:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown domain model option {key!r}{did_you_mean(str(key), known)}; "
                f"the options are: {', '.join(known)}"
            )


def domain_labels(options: dict[str, Any]) -> str:
    """What a domain model's captions tell it: the bias attribute counts as training
    group labels (class and bias together name the group), the class alone as none of
    the group labels (class labels are not group labels)."""
    from unspur.generate.domain import DomainModelConfig

    templates = [
        str(options.get(name, getattr(DomainModelConfig, name)))
        for name in ("caption_template", "bias_template", "class_template")
    ]
    return "train_groups" if any("{bias}" in t for t in templates) else "none"


def data_config(overrides: list[str], seed: int):
    """The config of an asset's ``overrides``; an unresolved ``{asset:NAME}`` stays a
    plain ``asset:NAME`` string (fingerprints and records hold no machine path)."""
    from unspur.config import load_config

    plain = [ASSET_REF.sub(lambda m: f"asset:{m.group(1)}", o) for o in overrides]
    return load_config(None, [*plain, f"seed={seed}", "train.progress=false"])


def asset_folder(name: str, overrides: list[str], seed: int, options: dict, work: Path) -> Path:
    from unspur.stages import digest

    config = data_config(overrides, seed)
    key = digest({"data": config.to_dict()["data"], "seed": seed, "options": options})
    return work / "assets" / f"{name}-{key[:12]}"


def build_cost(
    clock, elapsed: dict[str, float] | None = None, resumed_from_step: int = 0
) -> dict[str, Any]:
    """An asset's cost record: wall and CPU seconds (``elapsed``, else the clock's now),
    the torch threads it was built with (its arithmetic depends on them: the bench's
    ``--threads``) and when. ``resumed_from_step``: the training resumed from a
    checkpoint of an interrupted process, so the seconds are those of the steps after it
    only (recorded, not estimated: an earlier process's time is not known here). The
    code version is recorded, not part of the folder's name (our choice: a DDPM costs
    hours of CPU, so a change of code does not rebuild it; the table says when it was
    built by other code)."""
    import torch

    return {
        **(elapsed or clock.elapsed()),
        "threads": torch.get_num_threads(),
        "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code_version": code_version(),
        **({"resumed_from_step": resumed_from_step} if resumed_from_step else {}),
    }


def finished_asset(folder: Path, product: str) -> dict[str, Any] | None:
    """The record of an asset already built in ``folder`` (its record and its product,
    e.g. ``ddpm/model_index.json``, both present), or None: build it."""
    stored = folder / ASSET_FILE
    if stored.is_file() and (folder / product).is_file():
        return json.loads(stored.read_text())
    return None


def build_domain_model(
    name: str,
    overrides: list[str],
    seed: int,
    options: dict,
    work: Path,
    log,
    resolved: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train (or find finished) the asset's domain model; returns its folder and record.
    ``resolved``: ``overrides`` with ``{asset:NAME}`` replaced (what is read)."""
    from unspur.generate.domain import DomainModelConfig, train_domain_model
    from unspur.pipeline import prepare_table

    folder = asset_folder(name, overrides, seed, options, work)
    finished = finished_asset(folder, "domain.json")
    if finished is not None:
        return folder, finished
    stored = folder / ASSET_FILE
    config = data_config(resolved if resolved is not None else overrides, seed)
    table = prepare_table(config)
    domain = DomainModelConfig(**{"seed": seed, **options})
    log(f"asset {name}: training a domain model in {folder}")
    clock = Clock()
    train_domain_model(table, folder, domain)
    train = table.frame[table.frame["split"] == "train"]
    counts = train.groupby(["y", "a"]).size()
    record = {
        "name": name,
        "build": "domain_model",
        "data": {
            "overrides": list(overrides),
            "dataset": table.name,
            "split": "train",
            "images": int(len(train)),
            "per group": {
                f"{table.class_names[y]} / {table.attr_names[a]}": int(n)
                for (y, a), n in counts.items()
            },
        },
        "labels": domain_labels(options),
        "captions": domain.caption_template,
        "seed": seed,
        "steps": {
            "autoencoder": domain.vae_steps,
            "unet": domain.unet_steps,
            "inpainting": domain.inpaint_steps,
        },
        "options": options,
        "cost": build_cost(clock),
    }
    atomic_write_json(stored, record)
    return folder, record


def relation(asset_overrides: list[str], setting_base: dict[str, Any]) -> str:
    """How an asset's data relates to a setting's (``setting_base``: the config mapping
    the setting's runs start from): the same data config (so the asset saw the
    benchmark's own training split) or another one, with the keys that differ."""
    import copy

    from unspur.config import config_from_dict
    from unspur.stages import _flatten

    a = _flatten(data_config(asset_overrides, 0).to_dict()["data"])
    data = copy.deepcopy(setting_base.get("data") or {})
    b = _flatten(config_from_dict({"data": data}).to_dict()["data"])
    if any(ASSET_REF.search(o) for o in asset_overrides if o.startswith("data.root=")):
        a.pop("root")  # a dataset folder of the suite: the setting's holds a machine path
        b.pop("root", None)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not differ:
        return "the setting's own data: it learned from the benchmark's training split"
    shown = ", ".join(f"data.{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in differ)
    return (
        f"another data configuration than the setting's ({shown}); disjointness from the "
        "benchmark's images is not checked image by image"
    )


# ------------------------------------------------------------------ dispatch by builder
def check_asset_options(build: str, options: dict[str, Any], where: str) -> None:
    """Refuse option names (and values) builder ``build`` does not take, naming the key."""
    if build == "domain_model":
        check_domain_options(options, where)
        return
    known = DDPM_OPTIONS if build == "ddpm" else JUDGE_OPTIONS
    for key in options:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown {build} option {key!r}{did_you_mean(str(key), known)}; "
                f"the options are: {', '.join(known)}"
            )
    if build == "ddpm" and options.get("images", "train") not in DDPM_IMAGES:
        raise ConfigError(
            f"{where}.images={options['images']!r} is not one of {', '.join(DDPM_IMAGES)}"
        )
    if build == "judge" and options.get("target", "y") not in ("y", "a"):
        raise ConfigError(
            f"{where}.target={options['target']!r}: a judge predicts the class (y) or the "
            "bias attribute (a)"
        )
    if build == "judge" and options.get("view", "plain") not in ("plain", "robust"):
        raise ConfigError(
            f"{where}.view={options['view']!r}: a judge trains on the plain view or the "
            "robust one (blur, noise, contrast: unspur.bench.judges.RobustView)"
        )


def asset_labels(build: str, options: dict[str, Any]) -> str:
    """The labels an asset's construction gives the *pipeline* that uses it: a domain
    model's captions (:func:`domain_labels`); none for an unconditional DDPM; none for a
    judge, which only measurements read (its own training labels are in its record)."""
    return domain_labels(options) if build == "domain_model" else "none"


def resolve_refs(overrides: list[str], folders: dict[str, Path], where: str) -> list[str]:
    """``overrides`` with every ``{asset:NAME}`` replaced by that asset's folder."""

    def folder(match) -> str:
        name = match.group(1)
        if name not in folders:
            raise ConfigError(
                f"{where} refers to {{asset:{name}}}, which is not a dataset folder of the "
                "suite here (name it under assets with a path, and pass --data-dir)"
            )
        return str(folders[name])

    return [ASSET_REF.sub(folder, o) for o in overrides]


def build_asset(name: str, spec: Any, work: Path, log, folders: dict[str, Path]):
    """Build (or find built) the suite asset ``spec`` (a :class:`~unspur.bench.suite.Asset`);
    returns its folder and provenance record."""
    resolved = resolve_refs(spec.data, folders, f"assets.{name}.data")
    builder = {"domain_model": build_domain_model, "ddpm": build_ddpm, "judge": build_judge}

    def build():
        return builder[spec.build](name, spec.data, spec.seed, spec.options, work, log, resolved)

    # Two ``unspur bench`` processes on one work folder (e.g. ``--only`` one setting
    # each) may need the same unbuilt asset: the first builds it under the lock, the
    # other waits and then finds it built (the builders return a finished asset as is).
    folder = asset_folder(name, spec.data, spec.seed, spec.options, work)
    lock = lock_beside(folder)
    with exclusive_lock(lock) as mine:
        if mine:
            return build()
    log(f"asset {name}: another process is building it in {folder}; waiting for it")
    with exclusive_lock(lock, wait=True):
        return build()


def _data_record(overrides: list[str], table, split: str, images: int | None = None) -> dict:
    frame = table.frame[table.frame["split"] == split]
    counts = frame.groupby(["y", "a"]).size()
    return {
        "overrides": list(overrides),
        "dataset": table.name,
        "split": split,
        "images": int(len(frame) if images is None else images),
        "per group": {
            f"{table.class_names[y]} / {table.attr_names[a]}": int(n)
            for (y, a), n in counts.items()
        },
    }


# ------------------------------------------------------------------------------- DDPM
#: Where a DDPM asset's images come from: the data config's training split, or the clean
#: CIFAR-10 training images under the data root (DiffInject pretrains on CIFAR-10).
DDPM_IMAGES = ("train", "clean_cifar10")
#: ``build: ddpm`` options and defaults. Architecture and training default to what
#: DiffInject trains itself without ``ddpm:`` (its ``ddpm_*`` options: P2's lr 2e-5,
#: batch 8, EMA 0.9999, P2 gamma = k = 1, paper Eq. 6); ``no_skip_below`` and
#: ``skip_dropout`` (our levers, :mod:`unspur.generate.ddpm`) are off; ``hshare_pairs``
#: held-out pairs measure ``h_share`` at t = 700, 500, 300.
DDPM_OPTIONS: dict[str, Any] = {
    "images": "train",
    "max_images": None,
    "image_size": 32,
    "channels": [32, 64, 64],
    "layers_per_block": 1,
    "no_skip_below": 0,
    "skip_dropout": 0.0,
    "skip_dropout_levels": None,
    "steps": 10000,
    "batch_size": 8,
    "lr": 2e-5,
    "warmup_steps": 0,
    "ema": 0.9999,
    "p2_gamma": 1.0,
    "p2_k": 1.0,
    "hshare_pairs": 32,
}
HSHARE_T = (700, 500, 300)


class _Pixels:
    """Uint8 ``(N, H, W, 3)`` images as a dataset with ``raw(i)`` (what
    :class:`~unspur.generate.ddpm.DiffusionImages` reads), decoded one at a time."""

    def __init__(self, pixels) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def raw(self, index: int):
        from PIL import Image

        return Image.fromarray(self.pixels[int(index)])


def ddpm_images(config, images: str, max_images: int | None, seed: int):
    """(training images, held-out images, data record) of a DDPM asset."""
    import numpy as np

    from unspur.data.dataset import GroupDataset
    from unspur.pipeline import prepare_table

    if images == "clean_cifar10":
        from unspur.data.readers.corrupted_cifar10 import load_cifar10

        if config.data.root is None:
            raise ConfigError("a clean_cifar10 DDPM asset needs data.root (CIFAR-10's folder)")
        parts, classes, _ = load_cifar10(Path(config.data.root))
        pixels, labels, _ = parts["train"]
        keep = np.arange(len(pixels))
        if max_images is not None:
            keep = np.random.default_rng(seed).permutation(len(pixels))[: int(max_images)]
        counts = np.bincount(np.asarray(labels)[keep], minlength=len(classes))
        record = {
            "dataset": "CIFAR-10 (clean, the images Corrupted CIFAR-10 corrupts)",
            "split": "CIFAR-10 train",
            "images": int(len(keep)),
            "per group": {c: int(n) for c, n in zip(classes, counts)},
            "disjoint": "from the benchmark's test split (CIFAR-10 test); its train and val "
            "splits are corrupted copies of these images, as in the paper's CIFAR-10 "
            "pretraining",
        }
        held_out = parts["test"][0][:1000]
        return _Pixels(pixels[keep]), _Pixels(held_out), record
    table = prepare_table(config)  # images only: no split needs every group here
    train = table.split("train")
    if max_images is not None and int(max_images) < len(train.frame):
        keep = np.random.default_rng(seed).permutation(len(train.frame))[: int(max_images)]
        train = train.subset(np.sort(keep))
    held_out = "val" if (table.frame["split"] == "val").any() else "test"
    record = _data_record([], table, "train", len(train.frame))
    record["held out (h_share pairs)"] = held_out
    return GroupDataset(train, None), GroupDataset(table.split(held_out), None), record


def measure_h_share(unet, scheduler, held_out, size: int, pairs: int) -> dict[str, Any]:
    """Median and mean :func:`~unspur.generate.hspace.h_share` over ``pairs`` held-out
    images, each paired with the next (``roll(1)``), at t = 700, 500, 300."""
    import torch

    from unspur.generate.ddpm import DiffusionImages
    from unspur.generate.hspace import h_share

    images = DiffusionImages(held_out, image_size=size)
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:pairs]
    x = torch.stack([images[int(i)]["x"] for i in picked])
    shares = {}
    for t in HSHARE_T:
        share = h_share(unet, scheduler, x, x.roll(1, 0), t)
        shares[str(t)] = {"median": float(share.median()), "mean": float(share.mean())}
    return {"pairs": int(len(x)), "by_t": shares}


def build_ddpm(
    name: str,
    overrides: list[str],
    seed: int,
    options: dict,
    work: Path,
    log,
    resolved: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train (or find finished) the asset's DDPM in ``folder/ddpm``; returns the folder
    and its record (data, no labels: unconditional, seed, steps, cost, h_share)."""
    import torch

    from unspur.generate.ddpm import build_ddpm_unet, load_ddpm, train_ddpm
    from unspur.generate.training import GenerativeTrainConfig

    folder = asset_folder(name, overrides, seed, options, work)
    finished = finished_asset(folder, "ddpm/model_index.json")
    if finished is not None:
        return folder, finished
    stored = folder / ASSET_FILE
    o = {**DDPM_OPTIONS, **options}
    config = data_config(resolved if resolved is not None else overrides, seed)
    clock = Clock()
    train, held_out, data = ddpm_images(config, o["images"], o["max_images"], seed)
    data["overrides"] = list(overrides)
    log(f"asset {name}: training a DDPM on {data['images']} images in {folder}")
    torch.manual_seed(seed)
    channels = tuple(int(c) for c in o["channels"])
    unet = build_ddpm_unet(
        int(o["image_size"]),
        3,
        block_out_channels=channels,
        layers_per_block=int(o["layers_per_block"]),
        no_skip_below=int(o["no_skip_below"]),
    )
    levels = o["skip_dropout_levels"]
    trained = train_ddpm(
        unet,
        train,
        GenerativeTrainConfig(
            steps=int(o["steps"]),
            batch_size=int(o["batch_size"]),
            learning_rate=float(o["lr"]),
            warmup_steps=int(o["warmup_steps"]),
            ema_decay=o["ema"],
            seed=seed,
            save_every=max(1, min(250, int(o["steps"]))),
            device=config.train.device,
        ),
        folder,
        p2_gamma=float(o["p2_gamma"]),
        p2_k=float(o["p2_k"]),
        skip_dropout_p=float(o["skip_dropout"]),
        skip_dropout_levels=None if levels is None else [int(i) for i in levels],
    )
    cost = clock.elapsed()
    model, scheduler = load_ddpm(trained.model_dir)  # exactly what DiffInject will load
    shares = measure_h_share(
        model, scheduler, held_out, int(o["image_size"]), int(o["hshare_pairs"])
    )
    record = {
        "name": name,
        "build": "ddpm",
        "data": data,
        "labels": "none",
        "captions": "none: an unconditional DDPM, trained on images only",
        "seed": seed,
        "steps": {"ddpm": int(o["steps"]), "batch": int(o["batch_size"])},
        "options": options,
        "settings": o,
        "model": {
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "h": f"{channels[-1]} x {int(o['image_size']) // 2 ** (len(channels) - 1)} px",
        },
        "final_loss": (trained.result.losses or [{}])[-1],
        "h_share": shares,
        "cost": build_cost(clock, cost, trained.result.resumed_from),
    }
    atomic_write_json(stored, record)
    return folder, record


# ------------------------------------------------------------------------------ judge
#: ``build: judge`` options: ``target`` (y: the class, a: the bias attribute) and the
#: epoch rule (best validation accuracy of its own val split: our choice, no group label
#: of the benchmark is involved). Architecture and training come from ``data``
#: (``model.arch=...``, ``train.epochs=...``). ``view: robust`` trains on blurred, noisy,
#: jittered copies (:class:`unspur.bench.judges.RobustView`) so that the judge also reads
#: a small generator's softer images; ``plain`` on the data config's training view.
JUDGE_OPTIONS: dict[str, Any] = {"target": "y", "view": "plain"}


def _swapped(table):
    """``table`` with the class and the bias attribute exchanged (a judge of ``a``)."""
    frame = table.frame.rename(columns={"y": "a", "a": "y"})
    return type(table)(
        frame=frame,
        store=table.store,
        class_names=list(table.attr_names),
        attr_names=list(table.class_names),
        name=table.name,
        mask_store=table.mask_store,
        info=dict(table.info),
    )


def build_judge(
    name: str,
    overrides: list[str],
    seed: int,
    options: dict,
    work: Path,
    log,
    resolved: list[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train (or find finished) a judge classifier in ``folder/model``; returns the
    folder and its record (data, target, validation accuracy, cost)."""
    from dataclasses import replace

    from unspur.evaluate.predict import evaluate_split
    from unspur.models.checkpoint import save_checkpoint
    from unspur.models.factory import build_model
    from unspur.pipeline import prepare_data, prepare_table
    from unspur.train.loop import fit
    from unspur.train.seeding import seed_everything

    folder = asset_folder(name, overrides, seed, options, work)
    finished = finished_asset(folder, "model/model.json")
    if finished is not None:
        return folder, finished
    stored = folder / ASSET_FILE
    o = {**JUDGE_OPTIONS, **options}
    config = data_config(resolved if resolved is not None else overrides, seed)
    clock = Clock()
    table = prepare_table(config)
    if o["target"] == "a":
        table = _swapped(table)
    prepared = prepare_data(config, table)
    if prepared.val is None:
        raise ConfigError(f"assets.{name}: a judge needs a val split in its data")
    log(f"asset {name}: training a judge of {o['target']} in {folder}")
    seed_everything(seed)
    model = build_model(
        config.model.arch, table.n_classes, config.model.pretrained, **config.model.options
    )
    train_config = replace(config.train, selection="average")
    train = prepared.train
    if o["view"] == "robust":
        from unspur.bench.judges import RobustView
        from unspur.data.dataset import GroupDataset

        train = GroupDataset(train.table, RobustView(prepared.eval_transform))
    fit(model, train, prepared.val, train_config, folder / "fit", seed=seed,
        val_group_labels=False, description=f"judge {name}")  # fmt: skip
    val, _ = evaluate_split(model, prepared.val, prepared.train_group_counts, 256)
    save_checkpoint(model, folder / "model", extra={"judge": o["target"]})
    data = _data_record(overrides, table, "train")
    record = {
        "name": name,
        "build": "judge",
        "data": data,
        "labels": "none",
        "captions": f"none; a judge for measurements only, trained on its own data's "
        f"{'class' if o['target'] == 'y' else 'bias attribute'} labels, feeds no method",
        "target": o["target"],
        "view": o["view"],
        "classes": list(table.class_names),
        "transform": {
            "image_size": config.data.image_size,
            "crop_ratio": config.data.crop_ratio,
            "normalize": config.data.normalize,
        },
        "seed": seed,
        "steps": {"epochs": config.train.epochs},
        "options": options,
        "val_accuracy": float(val.to_dict()["accuracy"]),
        "cost": build_cost(clock),
    }
    atomic_write_json(stored, record)
    return folder, record
