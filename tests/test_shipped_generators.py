"""The generators shipped with unspur: load by name offline, provenance, packaging, use.

``unspur:synthetic-domain`` is the Stable Diffusion stand-in of the synthetic benchmark
(text-to-image and inpainting domain models trained by
:mod:`unspur.pretrain.synthetic_domain` on an independent draw).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image

from unspur.config import load_config
from unspur.errors import ConfigError, UnspurError
from unspur.generate import shipped
from unspur.generate.engine import (
    domain_model_dir,
    generator_for,
    is_domain_model_dir,
    pipeline_weights,
)
from unspur.generate.pipelines import GenerationSettings
from unspur.methods import get_method
from unspur.pipeline import run
from unspur.pretrain import synthetic_domain as recipe

NAME = "unspur:synthetic-domain"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network: the shipped generators must load from the package alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_the_synthetic_domain_generator_is_shipped_and_verified():
    assert NAME in shipped.shipped_generator_names()
    folder = shipped.verify_shipped_generator(NAME)  # every file against its card's SHA-256
    assert is_domain_model_dir(NAME)
    assert domain_model_dir(NAME, "unused") == folder
    for task in ("text2image", "inpaint"):
        assert Path(pipeline_weights(NAME, task)) == folder / task


def test_both_pipelines_load_by_name_offline_and_draw_32px_images():
    settings = GenerationSettings(steps=2, guidance_scale=4.0)
    text2image = generator_for(NAME, "text2image", device="cpu", cache=False)
    assert text2image.dtype == torch.float32  # fp16 files load into fp32 on a CPU
    assert text2image.weights_id == f"{NAME}/text2image"  # the name, not the install path
    images = text2image.text_to_image("a photo of a cross on land", [0], settings)
    assert images[0].size == (32, 32)

    inpaint = generator_for(NAME, "inpaint", device="cpu", cache=False)
    assert inpaint.pipeline.unet.config.in_channels == 9  # 2 * 4 latents + the mask
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    out = inpaint.inpaint(images, [Image.fromarray(mask)], "a photo of a circle on land", [1],
                          settings)  # fmt: skip
    assert out[0].size == (32, 32)


def test_plain_diffusers_from_pretrained_gives_an_fp32_pipeline():
    """``StableDiffusion(Inpaint)Pipeline.from_pretrained(dir)`` with no dtype: every
    component fp32 (transformers would keep an fp16 text encoder in fp16 and the UNet
    would then get fp16 prompt embeddings)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    for task, cls in (("text2image", StableDiffusionPipeline),
                      ("inpaint", StableDiffusionInpaintPipeline)):  # fmt: skip
        pipe = cls.from_pretrained(pipeline_weights(NAME, task), local_files_only=True)
        dtypes = {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype}
        assert dtypes == {torch.float32}, (task, dtypes)


def test_an_unknown_name_lists_the_shipped_generators():
    with pytest.raises(UnspurError, match="shipped generators: unspur:synthetic-domain"):
        generator_for("unspur:stable-diffusion", "text2image")
    with pytest.raises(ConfigError, match="unspur:synthetic-domain"):
        is_domain_model_dir("unspur:cifar10-resnet18")  # a backbone is not a generator


def test_the_card_records_an_independent_draw_and_the_labels_it_saw():
    card = shipped.shipped_generator_card(NAME)
    data = card["data"]
    assert data["data_seed"] == recipe.DATA_SEED
    assert data["data_seed"] not in {d["seed"] for d in recipe.BENCHMARK_DRAWS}
    assert data["bias"] == recipe.BIAS and data["n_images"] == recipe.N_TRAIN
    assert data["disjoint_from_benchmark"]["disjoint"] is True
    assert data["disjoint_from_benchmark"]["shared_images"] == 0
    labels = card["labels_seen"]
    assert labels["class"] is True and labels["bias_attribute"] is True
    assert "independent draw" in labels["statement"]
    assert card["weights_dtype"] == "float16"
    assert card["size_bytes"] < 15e6
    cost = card["cost"]
    assert cost["threads"] >= 1 and cost["cpu_seconds_total"] > 0
    for key in ("torch", "diffusers"):
        assert card["versions"][key]
    assert card["git_commit"]
    assert set(card["steps"]) == {"vae", "unet", "inpaint"}
    info = json.loads((shipped.shipped_generator_dir(NAME) / "domain.json").read_text())
    assert info["class_names"] == ["circle", "cross"] and info["attr_names"] == ["land", "water"]


def test_every_shipped_file_is_package_data():
    """A fresh (non-editable) install carries exactly what pyproject's package-data names."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["unspur.generate"]
    folder = shipped.shipped_generator_dir(NAME).parent.parent
    files = [p.relative_to(folder).as_posix() for p in folder.joinpath("weights").rglob("*")]
    files = [f for f in files if (folder / f).is_file()]
    assert files
    for name in files:
        # setuptools' ``**`` spans zero or more folders; fnmatch's ``*`` spans "/" too.
        assert any(fnmatch.fnmatch(name, p.replace("**/", "*")) for p in patterns), name


def test_the_recipe_draw_is_disjoint_and_refuses_a_benchmark_seed():
    table = recipe.draw(n_train=40)
    assert table.info["seed"] == recipe.DATA_SEED and table.info["bias"] == recipe.BIAS
    record = recipe.check_disjoint(table, draws=recipe.BENCHMARK_DRAWS[:1])
    assert record["disjoint"] and record["shared_images"] == 0
    with pytest.raises(ConfigError, match="data seed 0"):
        recipe.check_disjoint(recipe.draw(data_seed=0, n_train=40))


def test_dbb_reads_the_shipped_models_sampling_settings(tmp_path):
    from types import SimpleNamespace

    from unspur.methods.dbb import _sampling, inversion_weights

    options = {"generator": NAME, "steps": None, "guidance_scale": None, "inversion_model": None,
               "domain": {}}  # fmt: skip
    context = SimpleNamespace(out_dir=tmp_path, train=None)
    assert _sampling(options, context) == (25, 4.0)
    assert Path(inversion_weights(options, context)).name == "text2image"


def test_ffr_runs_with_the_shipped_generator_by_name(tmp_path):
    """FFR end to end on the debug benchmark at the generator's 32 px, nothing trained
    for generation: the images come from the shipped text-to-image model."""
    debug = dict(get_method("ffr").debug_options)
    debug.pop("domain")
    overrides = [o for o in helpers.DEBUG if "size=" not in o]
    overrides += ["data.options.size=32", "data.image_size=32", "method.name=ffr"]
    overrides += [f"method.options.{k}={v}" for k, v in debug.items()]
    overrides += [f"method.options.generator={NAME}"]
    results = run(load_config(None, overrides), tmp_path)
    assert results["method"] == "ffr"
    assert not (tmp_path / "domain_model").exists()  # nothing trained for generation
    info = json.loads((tmp_path / "ffr" / "budget.json").read_text())
    assert info["generation"]["example_prompts"]["cross / land"] == "a photo of a cross on land"
    assert sum(info["generation"]["used_per_group"]) > 0
    assert info["generation"]["weights"] == f"{NAME}/text2image"
