"""The recipe of the shipped generators: text-to-image and inpainting domain models of
the synthetic benchmark, trained on an independent draw (the Stable Diffusion stand-in).

The founding papers generate with Stable Diffusion, a model that saw the world before
the biased dataset. The stand-in here is a domain model (:mod:`unspur.generate.domain`)
trained on its *own* draw of the synthetic benchmark, never on a benchmark split:

- **Data**: the synthetic reader at data seed :data:`DATA_SEED` (our choice: no
  benchmark, bench script or config draws with it; the benchmark's splits use data
  seed 0, the benchmark's judges 100, the Clustered DreamBooth bench's external model
  1000), :data:`N_TRAIN` images at 32 px, bias :data:`BIAS`. The recipe checks that no
  image of this draw is pixel-identical to any image of the draws listed in
  :data:`BENCHMARK_DRAWS` and records the result.
- **Bias 0.9** (our choice): Stable Diffusion's training data is itself biased (the seed
  papers show it drawing "waterbird on land" on water), so an unbiased stand-in would
  flatter the methods; but at the benchmark's 0.95-0.999 the minority groups hold
  50-100 images and the previous recipe drew "cross on land" on land only 64-68% of
  the time (the legacy bench/results/domain_model.md). At 0.9 each minority group holds 200 of
  4,000 images: moderately biased, still drawable.
- **Labels**: the captions ("a photo of a {class} on {bias}") name the shape *and the
  background* of every training image, so the generator was trained with the group
  labels (class and bias attribute) of its own draw; it saw no label, and no image, of
  any benchmark split. A pipeline using it therefore adds "group labels of an
  independent draw (generator pretraining)" to its supervision, not group labels of
  its training split.
- **Model and schedule**: :class:`~unspur.generate.domain.DomainModelConfig`'s defaults
  (``small`` sizes, 500 / 2,800 / 500 steps of batch 32, lr 1e-3, min-SNR, EMA), the
  settings of bench/results/generators/'s ``recipe_domain`` asset (34 CPU-minutes on one
  thread when measured alone; 117 with a training job on the other core).
- **Export**: both pipelines are saved in fp16 (:func:`export_shipped`; the small text
  encoder in fp32, so a plain ``from_pretrained`` gives an fp32 pipeline), about 10 MB
  together, with ``card.json`` holding the provenance (data draw, labels, seeds, steps,
  wall and CPU time, threads, versions, git commit, command).

Regenerate with ``python -m unspur.pretrain.synthetic_domain --out DIR`` (the trained
fp32 model and its stage checkpoints stay in ``--work``; a killed run resumes there).
The shipped copy loads by name: ``generator: unspur:synthetic-domain``
(:mod:`unspur.generate.shipped`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unspur.data.registry import load_dataset
from unspur.data.table import GroupTable
from unspur.errors import ConfigError
from unspur.generate.domain import (
    DOMAIN_FILE,
    INPAINT,
    TEXT2IMAGE,
    DomainModel,
    DomainModelConfig,
    load_domain_model,
    train_domain_model,
)
from unspur.io import atomic_dir
from unspur.pretrain.provenance import cpu_seconds, git_commit

NAME = "synthetic-domain"
CARD_FILE = "card.json"
CARD_FORMAT = "unspur.generator-card"

#: The independent draw (our choices, see the module docstring).
DATA_SEED = 2020
BIAS = 0.9
N_TRAIN = 4000
IMAGE_SIZE = 32
N_CLASSES = 2
#: The model's own seed (initialisation, batches, noise).
MODEL_SEED = 0

#: Draws of the synthetic benchmark this recipe's draw is checked against (reader
#: options): the benchmark's data seed 0 at the sizes configs/, bench/ and the demo
#: use, the domain-model bench's judges (seed 100) and the Clustered DreamBooth
#: bench's external domain model (seed 1000).
BENCHMARK_DRAWS: tuple[dict[str, Any], ...] = (
    {"seed": 0, "n_train": 1000, "n_val": 600, "n_test": 600, "bias": 0.99},
    {"seed": 0, "n_train": 2000, "n_val": 600, "n_test": 600, "bias": 0.99},
    {"seed": 0, "n_train": 2000, "n_val": 600, "n_test": 600, "bias": 0.999},
    {"seed": 0, "n_train": 4000, "n_val": 200, "n_test": 400, "bias": 0.95},
    {"seed": 100, "n_train": 3000, "n_val": 400, "n_test": 800, "bias": 0.5},
    {"seed": 1000, "n_train": 4000, "n_val": 200, "n_test": 400, "bias": 0.5},
)


def recipe_config(seed: int = MODEL_SEED) -> DomainModelConfig:
    """The shipped model's settings: the domain-model defaults at 32 px (see above)."""
    return DomainModelConfig(image_size=IMAGE_SIZE, sizes="small", seed=seed)


def draw(data_seed: int = DATA_SEED, n_train: int = N_TRAIN, bias: float = BIAS) -> GroupTable:
    """The recipe's own draw of the synthetic benchmark (training split only is used)."""
    return load_dataset(
        "synthetic",
        n_train=n_train,
        n_val=0,
        n_test=0,
        bias=bias,
        size=IMAGE_SIZE,
        n_classes=N_CLASSES,
        seed=data_seed,
    )


def _image_hashes(table: GroupTable) -> set[str]:
    return {
        hashlib.sha256(np.asarray(table.store.open(name)).tobytes()).hexdigest()
        for name in table.frame["filename"]
    }


def check_disjoint(table: GroupTable, draws=BENCHMARK_DRAWS) -> dict[str, Any]:
    """Count the images of ``table`` that are pixel-identical to an image of any
    benchmark draw; the record says which draws were checked."""
    ours = _image_hashes(table)
    shared = 0
    for options in draws:
        if int(options["seed"]) == int(table.info["seed"]):
            raise ConfigError(
                f"the recipe's data seed {table.info['seed']} is a benchmark draw's seed; "
                "choose another --data-seed"
            )
        other = load_dataset("synthetic", size=IMAGE_SIZE, n_classes=N_CLASSES, **options)
        shared += len(ours & _image_hashes(other))
    return {
        "disjoint": shared == 0,
        "shared_images": shared,
        "checked_against": [dict(d) for d in draws],
        "how": "SHA-256 of every image's pixels, this draw against every split of each draw",
    }


#: The code the generator weights depend on (for the card's "+local-changes" flag).
_RECIPE_CODE = ("src/unspur/generate", "src/unspur/pretrain/synthetic_domain.py")


def portable_command(command: list[str]) -> str:
    """The command as a string, with absolute paths outside the working directory
    replaced by their option's name (``--out OUT``): no machine's path is shipped."""
    here = Path.cwd().resolve()
    words, flag = [], ""
    for word in command:
        if word.startswith("/") or word.startswith("~"):
            path = Path(word).expanduser().resolve()
            if path.is_relative_to(here):
                word = str(path.relative_to(here))
            else:
                word = flag.lstrip("-").upper().replace("-", "_") or "PATH"
        words.append(word)
        flag = word if word.startswith("--") else ""
    return shlex.join(words)


def _scrub_paths(folder: Path) -> None:
    """Drop diffusers' ``_name_or_path`` (the training machine's folder) from every
    saved config; ``from_pretrained`` does not read it."""
    for path in folder.rglob("*.json"):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and "_name_or_path" in config:
            del config["_name_or_path"]
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_shipped(model: DomainModel, target: Path, card: dict[str, Any], fp16: bool = True):
    """Write the shipped copy: both pipelines (fp16 weights unless ``fp16=False``), the
    domain record without the per-step loss logs, and the card with every file's
    SHA-256. Returns the card as written."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    with atomic_dir(target) as scratch:
        for task, cls in (
            (TEXT2IMAGE, StableDiffusionPipeline),
            (INPAINT, StableDiffusionInpaintPipeline),
        ):
            pipe = cls.from_pretrained(
                str(model.pipeline_dir(task)),
                local_files_only=True,
                torch_dtype=torch.float16 if fp16 else torch.float32,
            )
            # transformers loads a text encoder in the dtype it was saved in, diffusers
            # models in fp32: a plain from_pretrained would then mix fp16 prompt
            # embeddings with fp32 UNet weights. The text encoder (0.1 M parameters)
            # therefore stays fp32.
            pipe.text_encoder.to(torch.float32)
            pipe.save_pretrained(scratch / task)
        _scrub_paths(scratch)
        info = {k: v for k, v in model.info.items() if k != "losses"}
        info["last_losses"] = {
            stage: (logged[-1] if logged else None)
            for stage, logged in model.info.get("losses", {}).items()
        }
        (scratch / DOMAIN_FILE).write_text(json.dumps(info, indent=2) + "\n")
        files = sorted(p for p in scratch.rglob("*") if p.is_file())
        card = dict(card)
        card["weights_dtype"] = "float16" if fp16 else "float32"
        card["files"] = {str(p.relative_to(scratch)): _sha256(p) for p in files}
        card["size_bytes"] = sum(p.stat().st_size for p in files)
        (scratch / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


def build_card(model: DomainModel, table: GroupTable, disjoint: dict[str, Any], *,
               data_seed: int, bias: float, threads: int, wall: float, cpu: float,
               command: list[str]) -> dict[str, Any]:  # fmt: skip
    """The provenance record shipped beside the weights."""
    import diffusers
    import transformers

    wall_stages = dict(model.info.get("seconds_this_run") or {})
    cpu_stages = dict(model.info.get("cpu_seconds_this_run") or {})
    counts = table.frame.groupby(["y", "a"]).size()
    groups = {
        f"{table.class_names[y]} on {table.attr_names[a]}": int(n) for (y, a), n in counts.items()
    }
    return {
        "format": CARD_FORMAT,
        "name": NAME,
        "what": "text-to-image and inpainting domain models of the synthetic benchmark "
        "(StableDiffusionPipeline / StableDiffusionInpaintPipeline directories), the "
        "Stable Diffusion stand-in",
        "recipe": "python -m unspur.pretrain.synthetic_domain (unspur.pretrain.synthetic_domain)",
        "command": portable_command(command),
        "data": {
            "dataset": "synthetic",
            "data_seed": data_seed,
            "bias": bias,
            "n_images": int(len(table.frame)),
            "image_size": IMAGE_SIZE,
            "class_names": list(table.class_names),
            "attr_names": list(table.attr_names),
            "groups": groups,
            "majority_attr": table.info.get("majority_attr"),
            "disjoint_from_benchmark": disjoint,
            "fingerprint": model.info.get("data_fingerprint"),
        },
        "labels_seen": {
            "class": True,
            "bias_attribute": True,
            "source": "its own draw (data seed above), not any benchmark split",
            "statement": "trained with group labels (class and background) of an "
            "independent draw: every caption names both; no image or label of any "
            "benchmark split was seen",
            "captions": model.info.get("captions"),
        },
        "model_seed": model.info.get("seed"),
        "steps": model.info.get("steps"),
        "parameters": model.info.get("parameters"),
        "sizes": model.info.get("sizes"),
        "sampling": model.info.get("sampling"),
        "cost": {
            "wall_seconds_per_stage": wall_stages,
            "cpu_seconds_per_stage": cpu_stages,
            "wall_seconds_total": round(sum(wall_stages.values()), 1),
            "cpu_seconds_total": round(sum(cpu_stages.values()), 1),
            "this_invocation_wall_seconds": round(wall, 1),
            "this_invocation_cpu_seconds": round(cpu, 1),
            "threads": threads,
            "note": "training time = the sum of the three stages, as recorded by the "
            "invocation that trained them (a rerun that reuses the trained model only "
            "exports; its own time is this_invocation_*); measured on 2 CPU cores shared "
            "with other jobs: the wall time includes waiting for a core, the CPU time "
            "does not",
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
            "device": "cpu",
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "git_commit": git_commit(_RECIPE_CODE),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "license": "trained by unspur on procedurally generated images; same terms as unspur",
    }


def train_shipped_generator(
    out: Path,
    work: Path,
    *,
    data_seed: int = DATA_SEED,
    bias: float = BIAS,
    n_train: int = N_TRAIN,
    seed: int = MODEL_SEED,
    threads: int = 1,
    fp16: bool = True,
    steps: tuple[int, int, int] | None = None,
    command: list[str] | None = None,
    log=print,
) -> dict[str, Any]:
    """Train (or resume, or reuse) the domain model in ``work`` and export the shipped
    copy to ``out/NAME``; returns its card."""
    torch.set_num_threads(threads)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    table = draw(data_seed, n_train, bias)
    disjoint = check_disjoint(table)
    if not disjoint["disjoint"]:
        raise ConfigError(
            f"data seed {data_seed} draws {disjoint['shared_images']} image(s) of a benchmark "
            "draw; choose another --data-seed"
        )
    log(f"draw: seed {data_seed}, bias {bias}, {n_train} images, disjoint from the benchmark")
    config = recipe_config(seed)
    if steps is not None:
        config.vae_steps, config.unet_steps, config.inpaint_steps = steps
    model = train_domain_model(table, work / "model", config)
    model = load_domain_model(work / "model")
    log(f"trained: {json.dumps(model.info.get('seconds_this_run'))}")
    card = build_card(
        model, table, disjoint,
        data_seed=data_seed, bias=bias, threads=threads,
        wall=time.perf_counter() - wall0, cpu=cpu_seconds() - cpu0,
        command=command or ["python", "-m", "unspur.pretrain.synthetic_domain"],
    )  # fmt: skip
    card = export_shipped(model, Path(out) / NAME, card, fp16=fp16)
    log(f"exported {Path(out) / NAME} ({card['size_bytes'] / 1e6:.1f} MB)")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {NAME}/")
    parser.add_argument("--work", type=Path, default=Path("runs/pretrain/synthetic-domain"))
    parser.add_argument("--data-seed", type=int, default=DATA_SEED)
    parser.add_argument("--bias", type=float, default=BIAS)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--seed", type=int, default=MODEL_SEED)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fp32", action="store_true", help="ship fp32 weights")
    parser.add_argument(
        "--steps", default=None, help="VAE,UNET,INPAINT steps (smoke tests; default: recipe)"
    )
    args = parser.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else None
    if steps is not None and len(steps) != 3:
        raise SystemExit("--steps takes three comma-separated integers")
    command = ["python", "-m", "unspur.pretrain.synthetic_domain", *(argv or sys.argv[1:])]
    train_shipped_generator(
        args.out, args.work,
        data_seed=args.data_seed, bias=args.bias, n_train=args.n_train, seed=args.seed,
        threads=args.threads, fp16=not args.fp32, steps=steps, command=command,
    )  # fmt: skip


if __name__ == "__main__":
    main()
