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
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from unspur.bench.provenance import Clock
from unspur.errors import ConfigError, did_you_mean
from unspur.io import atomic_write_json

BUILDERS = ("domain_model",)
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
    from unspur.config import load_config

    return load_config(None, [*overrides, f"seed={seed}", "train.progress=false"])


def asset_folder(name: str, overrides: list[str], seed: int, options: dict, work: Path) -> Path:
    from unspur.stages import digest

    config = data_config(overrides, seed)
    key = digest({"data": config.to_dict()["data"], "seed": seed, "options": options})
    return work / "assets" / f"{name}-{key[:12]}"


def build_domain_model(
    name: str, overrides: list[str], seed: int, options: dict, work: Path, log
) -> tuple[Path, dict[str, Any]]:
    """Train (or find finished) the asset's domain model; returns its folder and record."""
    from unspur.generate.domain import DomainModelConfig, train_domain_model
    from unspur.pipeline import prepare_table

    folder = asset_folder(name, overrides, seed, options, work)
    stored = folder / ASSET_FILE
    if stored.is_file() and (folder / "domain.json").is_file():
        return folder, json.loads(stored.read_text())
    config = data_config(overrides, seed)
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
        "cost": {**clock.elapsed(), "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
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
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not differ:
        return "the setting's own data: it learned from the benchmark's training split"
    shown = ", ".join(f"data.{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in differ)
    return (
        f"another data configuration than the setting's ({shown}); disjointness from the "
        "benchmark's images is not checked image by image"
    )
