"""Measurements of how fast unspur's machinery runs, on a run's own model or generator.

``ig_throughput`` (was ``bench/dbb.py``'s Integrated Gradients table): DBB's pruning
attributes every candidate with IG; this times one batched Captum call against the
public reference code's per-image loop on the ERM model of the run, with the same
``n_steps``, and checks they agree. ``generation_overhead`` (was ``bench/generation.py``):
unspur's diffusers wrapper against bare diffusers calls on the run's own generator.

Both read what the run left (its model, its config's generator) and train nothing. A
timing changes from one call to the next, so each is measured once per run and kept in
the run directory (``ig_throughput.json``, ``generation_overhead.json``): a rerun of the
suite reports the same numbers. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from unspur.bench.measurements import register
from unspur.io import atomic_write_json

#: Images, IG steps and interleaved repeats of the IG timing (bench/dbb.py's defaults;
#: 32 steps is DBB's ``ig_steps`` in configs/synthetic_dbb.yaml).
IG_IMAGES, IG_STEPS, IG_REPEATS = 64, 32, 3
#: Images, DDIM steps, batch size and repeats of the wrapper timing (bench/generation.py's).
GEN_IMAGES, GEN_STEPS, GEN_BATCH, GEN_REPEATS = 8, 20, 4, 3


def _cached(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _run_config(results: dict[str, Any]):
    from unspur.config import config_from_dict

    return config_from_dict(results["config"])


def ig_seconds(model, images, steps: int, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` seconds of IG for ``images`` (targets alternate 0/1, each image's
    neighbour as its baseline): the per-image loop vs one batched call; and the largest
    difference between their attributions."""
    from unspur.explain.integrated_gradients import (
        integrated_gradients,
        integrated_gradients_loop,
    )

    n = len(images)
    baselines = images.roll(1, dims=0)
    target = [i % 2 for i in range(n)]
    loop, batched = [], []
    for _ in range(repeats):  # interleaved, so load drift hits both alike
        clock = time.perf_counter()
        looped = integrated_gradients_loop(model, images, baselines, target, n_steps=steps)
        loop.append(time.perf_counter() - clock)
        clock = time.perf_counter()
        together = integrated_gradients(
            model, images, baselines, target, n_steps=steps, batch_size=n
        )
        batched.append(time.perf_counter() - clock)
    return {
        "images": n,
        "n_steps": steps,
        "loop_seconds": min(loop),
        "batched_seconds": min(batched),
        "max_abs_diff": float((looped - together).abs().max()),
    }


@register("ig_throughput")
def ig_throughput(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """For an ERM run: Integrated Gradients images per second through its model, one
    batched Captum call (all images at once) against a per-image loop, same ``n_steps``
    (:data:`IG_STEPS`), on the first :data:`IG_IMAGES` test images; best of
    :data:`IG_REPEATS` interleaved repeats; and the largest difference between the two
    attributions (they compute the same integral)."""
    if (results.get("config") or {}).get("method", {}).get("name") != "erm":
        return {}
    if not (run_dir / "model").is_dir():
        return {}
    path = run_dir / "ig_throughput.json"
    record = _cached(path)
    if record is None:
        import torch

        from unspur.models.restore import load_checkpoint
        from unspur.pipeline import prepare_data

        prepared = prepare_data(_run_config(results))
        test = prepared.test if prepared.test is not None else prepared.train
        count = min(IG_IMAGES, len(test))
        images = torch.stack([test[i][0] for i in range(count)])
        record = ig_seconds(load_checkpoint(run_dir / "model"), images, IG_STEPS, IG_REPEATS)
        atomic_write_json(path, record)
    loop, batched = record["loop_seconds"], record["batched_seconds"]
    return {
        "IG images/s (loop)": record["images"] / loop,
        "IG images/s (batched)": record["images"] / batched,
        "IG speedup": loop / batched,
        "IG max |batched - loop|": record["max_abs_diff"],
    }


def _generator_of(results: dict[str, Any]) -> str | None:
    options = ((results.get("config") or {}).get("method") or {}).get("options") or {}
    generator = options.get("generator")
    return str(generator) if generator else None


def wrapper_overhead(weights: str, task: str, work: Path) -> dict[str, Any]:
    """Median seconds of unspur's :class:`DiffusersGenerator` and of bare pipeline calls
    for the same prompts, seeds (one CPU generator per image), steps and batches, and
    the largest 8-bit difference between their images (inside the mask for inpainting,
    where the wrapper pastes the original back outside)."""
    import torch
    from PIL import Image

    from unspur.generate.engine import generator_for
    from unspur.generate.pipelines import GenerationSettings

    generator = generator_for(weights, task, run_dir=work, device="cpu", cache=False)
    settings = GenerationSettings(steps=GEN_STEPS, batch_size=GEN_BATCH)
    height, width = generator.generation_size(settings)
    seeds = list(range(GEN_IMAGES))
    prompts = [f"a photo number {i}" for i in seeds]
    inputs = None
    if task == "inpaint":
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                  for _ in seeds]  # fmt: skip
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
        inputs = (images, [Image.fromarray(mask, mode="L")] * len(seeds))

    def ours():
        if inputs is None:
            return generator.text_to_image(prompts, seeds, settings)
        return generator.inpaint(inputs[0], inputs[1], prompts, seeds, settings)

    def bare():
        out = []
        for start in range(0, len(seeds), settings.batch_size):
            part = slice(start, start + settings.batch_size)
            extra = {}
            if inputs is not None:
                extra = {"image": inputs[0][part], "mask_image": inputs[1][part], "strength": 1.0}
            out += generator.pipeline(
                prompt=prompts[part],
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[part]],
                height=height,
                width=width,
                output_type="pil",
                **extra,
            ).images
        return out

    ours(), bare()  # warm-up
    wrapped_s, bare_s = [], []
    for _ in range(GEN_REPEATS):
        clock = time.perf_counter()
        wrapped = ours()
        wrapped_s.append(time.perf_counter() - clock)
        clock = time.perf_counter()
        plain = bare()
        bare_s.append(time.perf_counter() - clock)
    inside = np.ones((height, width), dtype=bool) if inputs is None else np.asarray(
        inputs[1][0]) > 127  # fmt: skip
    diff = max(
        int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))[inside].max())
        for a, b in zip(wrapped, plain)
    )
    return {
        "images": len(seeds),
        "wrapper_seconds": statistics.median(wrapped_s),
        "bare_seconds": statistics.median(bare_s),
        "max_pixel_diff": diff,
    }


@register("generation_overhead")
def generation_overhead(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """For a run whose method draws from a domain model (``method.options.generator``: a
    shipped name or a suite-built folder): images per second of unspur's diffusers
    wrapper (chunking, per-image generators, scheduler handling, and for inpainting
    mask handling and the paste-back) against bare ``pipeline(...)`` calls, text to
    image and inpainting (:data:`GEN_IMAGES` images, :data:`GEN_STEPS` DDIM steps,
    batches of :data:`GEN_BATCH`, median of :data:`GEN_REPEATS` interleaved repeats
    after a warm-up), their ratio (the wrapper's overhead) and the largest pixel
    difference between the two (0: the same images)."""
    from unspur.generate.engine import domain_model_dir

    weights = _generator_of(results)
    if weights == "domain":  # trained inside the run, into its directory
        weights = str(domain_model_dir(weights, run_dir))
    if weights is None or not (Path(weights).exists() or weights.startswith("unspur:")):
        return {}
    path = run_dir / "generation_overhead.json"
    record = _cached(path)
    if record is None:
        from unspur.errors import UnspurError

        record = {}
        for task in ("text2image", "inpaint"):
            try:
                record[task] = wrapper_overhead(weights, task, run_dir)
            except (UnspurError, OSError) as exc:  # e.g. a model without inpainting
                record[task] = {"skipped": str(exc).splitlines()[0]}
        atomic_write_json(path, record)
    columns: dict[str, Any] = {}
    for task, short in (("text2image", "t2i"), ("inpaint", "inpaint")):
        r = record.get(task) or {}
        if "wrapper_seconds" not in r:
            continue
        columns[f"{short} images/s (wrapper)"] = r["images"] / r["wrapper_seconds"]
        columns[f"{short} wrapper / bare"] = r["wrapper_seconds"] / r["bare_seconds"]
        columns[f"{short} max pixel diff"] = r["max_pixel_diff"]
    return columns


#: Clustered DreamBooth's recorded phases (``summary.json``'s ``cost``) and their columns.
CDB_PHASES = {
    "lora_training": "LoRA training s",
    "generation": "generation s",
    "clip_filter": "CLIP filter s",
    "stage1": "stage 1 s",
    "stage2": "stage 2 s",
}


@register("cdb_cost")
def cdb_cost(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Clustered DreamBooth's seconds per phase (was ``bench/clustered_dreambooth.py``'s
    cost table), as the run recorded them across resumptions (``summary.json``): LoRA
    training, generation (and seconds per image), the CLIP filter, stage 1 and stage 2.
    Empty for other runs."""
    found = sorted((run_dir / "clustered_dreambooth").glob("*/summary.json"))
    record = _cached(found[0]) if found else None
    cost = (record or {}).get("cost")
    if not isinstance(cost, dict):
        return {}
    columns: dict[str, Any] = {}
    for key, column in CDB_PHASES.items():
        value = cost.get(key)
        seconds = value.get("seconds") if isinstance(value, dict) else value
        if isinstance(seconds, int | float):
            columns[column] = float(seconds)
    generation = cost.get("generation")
    if isinstance(generation, dict) and generation.get("seconds_per_image") is not None:
        columns["s / generated image"] = float(generation["seconds_per_image"])
    return columns
