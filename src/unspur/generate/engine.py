"""Where a generative method gets its images from: one place to resolve ``generator``.

Every generative method (DBB, FFR, Clustered DreamBooth) takes a ``generator`` option:

* ``"domain"`` (the embedded default): a small text-conditional diffusion model trained
  from scratch on the run's own training images (:mod:`unspur.generate.domain`), in
  ``<run>/domain_model``; trained once, reused by every later stage and rerun. This is
  what runs on a CPU without any downloaded weights.
* a directory written by a domain-model training (it holds ``domain.json``): reused,
  so several methods or seeds can share one trained model.
* ``"unspur:<name>"``: a domain model shipped with the package (e.g.
  ``unspur:synthetic-domain``, trained on an independent draw of the synthetic
  benchmark; :mod:`unspur.generate.shipped`), used exactly like such a directory.
* anything else: a diffusers pipeline, as a hub id
  (``stabilityai/stable-diffusion-2-inpainting``, ``stabilityai/stable-diffusion-2-1-base``)
  or a local directory, loaded with ``from_pretrained`` — fp16 on a GPU.

The method code is the same in every case: it receives a :class:`DiffusersGenerator`.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from unspur.data.table import GroupTable
from unspur.errors import ConfigError
from unspur.generate.components import Task
from unspur.generate.domain import (
    DOMAIN_FILE,
    DomainModelConfig,
    load_domain_model,
    train_domain_model,
)
from unspur.generate.pipelines import DiffusersGenerator, load_generator
from unspur.generate.shipped import (
    is_shipped_name,
    shipped_generator_dir,
    verify_shipped_generator,
)

DOMAIN = "domain"
DOMAIN_DIR = "domain_model"


def domain_config(options: dict[str, Any] | None) -> DomainModelConfig:
    """A :class:`DomainModelConfig` from a method's ``domain`` option mapping."""
    options = dict(options or {})
    known = {f.name for f in fields(DomainModelConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"domain model option(s) {unknown} are unknown; the options are: {', '.join(sorted(known))}"
        )
    return DomainModelConfig(**options)


def resolve_shipped(spec: str) -> str:
    """``spec`` with a shipped generator's name (``unspur:<name>``) replaced by its
    installed directory (files checked against its card); other specs unchanged. An
    unknown ``unspur:`` name raises a ConfigError listing the shipped generators."""
    if is_shipped_name(spec):
        return str(verify_shipped_generator(str(spec)))
    return spec


def is_domain_model_dir(spec: str) -> bool:
    """Whether ``spec`` is a trained domain model: a directory holding ``domain.json``
    or a shipped generator's name."""
    if is_shipped_name(spec):
        return (shipped_generator_dir(str(spec)) / DOMAIN_FILE).is_file()
    return (Path(spec) / DOMAIN_FILE).is_file()


def domain_model_dir(spec: str, run_dir: str | Path) -> Path | None:
    """Where the domain model of generator ``spec`` lives (``"domain"``: the run's own,
    trained or not yet; ``unspur:<name>``: the shipped one), or None when ``spec`` is not
    a domain model (a hub id or an ordinary pipeline folder)."""
    if spec == DOMAIN:
        return Path(run_dir) / DOMAIN_DIR
    if is_domain_model_dir(spec):
        return Path(resolve_shipped(spec))
    return None


def pipeline_weights(
    spec: str,
    task: Task,
    *,
    table: GroupTable | None = None,
    run_dir: str | Path | None = None,
    domain: dict[str, Any] | None = None,
) -> str:
    """The ``from_pretrained`` argument for ``spec`` and ``task`` (training a domain
    model first when ``spec`` is ``"domain"``)."""
    if spec == DOMAIN:
        if table is None or run_dir is None:
            raise ConfigError("generator=domain needs the training table and a run directory")
        model = train_domain_model(table, Path(run_dir) / DOMAIN_DIR, domain_config(domain))
        return str(model.pipeline_dir(task))
    if is_domain_model_dir(spec):
        return str(load_domain_model(resolve_shipped(spec)).pipeline_dir(task))
    return spec


def generator_for(
    spec: str,
    task: Task,
    *,
    table: GroupTable | None = None,
    run_dir: str | Path | None = None,
    domain: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache: bool = True,
) -> DiffusersGenerator:
    """The generator a method asked for (see the module docstring for ``spec``).

    ``cache=False`` gives a private pipeline, needed before loading adapters
    (textual-inversion tokens, LoRA) into it.
    """
    weights = pipeline_weights(spec, task, table=table, run_dir=run_dir, domain=domain)
    generator = load_generator(weights, task, device=device, dtype=dtype, cache=cache)
    if is_shipped_name(spec):
        # records name the shipped generator, not this machine's install folder
        generator.weights_id = f"{str(spec).strip()}/{task}"
    return generator
