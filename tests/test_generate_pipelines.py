"""The diffusers generation interface on tiny random pipelines saved and loaded offline."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unspur.errors import ConfigError, DataError
from unspur.generate.components import build_pipeline
from unspur.generate.maskers import dilate
from unspur.generate.pipelines import (
    SCHEDULER_NAMES,
    GenerationSettings,
    clear_generator_cache,
    feather_alpha,
    load_generator,
    paste_back,
)

FAST = GenerationSettings(steps=2, guidance_scale=3.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("weights")
    saved = {}
    for task in ("text2image", "inpaint"):
        build_pipeline(task).save_pretrained(root / task)
        saved[task] = root / task
    yield saved
    clear_generator_cache()


@pytest.fixture
def text2image(weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return load_generator(weights["text2image"], "text2image", device="cpu")


@pytest.fixture
def inpainter(weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return load_generator(weights["inpaint"], "inpaint", device="cpu")


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _scene(width: int = 40, height: int = 36, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, mode="L")


def test_text_to_image_sizes_and_seeds(text2image):
    images = text2image.text_to_image(["a cat", "a cat", "a cat"], [7, 7, 8], FAST)
    assert [image.size for image in images] == [(32, 32)] * 3
    assert all(image.mode == "RGB" for image in images)
    np.testing.assert_array_equal(_array(images[0]), _array(images[1]))  # same seed
    assert np.abs(_array(images[0]) - _array(images[2])).max() > 10  # different seed
    again = text2image.text_to_image("a cat", [7], FAST)[0]  # a later call, same seed
    np.testing.assert_array_equal(_array(again), _array(images[0]))
    larger = text2image.text_to_image("a cat", [7], GenerationSettings(steps=2, height=48))
    assert larger[0].size == (32, 48)


@pytest.mark.parametrize("scheduler", ["default", "euler_ancestral"])
def test_an_image_depends_on_its_own_seed_not_its_batch(text2image, scheduler):
    # euler_ancestral draws fresh noise at every step: from each image's own generator.
    settings = GenerationSettings(steps=3, guidance_scale=3.0, scheduler=scheduler)
    alone = text2image.text_to_image(["a dog"], [5], settings)[0]
    batch = text2image.text_to_image(["a cat", "a dog", "a bird"], [1, 5, 9], settings)
    split = text2image.text_to_image(
        ["a cat", "a dog", "a bird"],
        [1, 5, 9],
        GenerationSettings(**{**settings.to_dict(), "batch_size": 1}),
    )
    # Batched CPU kernels sum in another order: ~2e-6 in float, at most 1/255 in 8 bits.
    assert np.abs(_array(alone) - _array(batch[1])).max() <= 1
    assert np.abs(_array(batch[2]) - _array(split[2])).max() <= 1


def test_negative_prompt_and_guidance_change_the_image(text2image):
    base = text2image.text_to_image("a cat", [3], FAST)[0]
    negative = GenerationSettings(steps=2, guidance_scale=3.0, negative_prompt="blurry")
    other = text2image.text_to_image("a cat", [3], negative)[0]
    assert np.abs(_array(base) - _array(other)).max() > 0


def test_inpainting_keeps_every_pixel_outside_the_mask(inpainter):
    # 40x36 input, 32-px model: resized for the model, pasted back at the input's size.
    scene = _scene(40, 36)
    mask = _box_mask(40, 36, (10, 8, 26, 24))
    out = inpainter.inpaint([scene], [mask], ["a circle"], [0], FAST)[0]
    assert out.size == (40, 36) and out.mode == "RGB"
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(_array(out)[outside], _array(scene)[outside])
    assert np.abs(_array(out)[~outside] - _array(scene)[~outside]).mean() > 5

    unpasted = inpainter.inpaint(
        [scene], [mask], ["a circle"], [0], GenerationSettings(steps=2, paste_back=False)
    )[0]
    assert unpasted.size == (40, 36)
    # Without the paste the VAE round trip changes the background too.
    assert np.abs(_array(unpasted)[outside] - _array(scene)[outside]).mean() > 5


def test_dilation_grows_the_repainted_area(inpainter):
    scene = _scene(32, 32, seed=1)
    mask = _box_mask(32, 32, (12, 12, 18, 18))
    plain, grown = (
        inpainter.inpaint(
            [scene], [mask], ["x"], [2], GenerationSettings(steps=2, mask_dilation=dilation)
        )[0]
        for dilation in (0, 3)
    )
    changed_plain = np.any(_array(plain) != _array(scene), axis=-1)
    changed_grown = np.any(_array(grown) != _array(scene), axis=-1)
    region = dilate(np.asarray(mask) > 127, 3)
    assert region.sum() == 12 * 12
    assert not changed_plain[~(np.asarray(mask) > 127)].any()
    assert not changed_grown[~region].any()
    assert changed_grown.sum() > changed_plain.sum() + 50


def test_inpaint_seeds_are_per_image_and_sizes_may_differ(inpainter):
    scenes = [_scene(32, 32, seed=3), _scene(48, 40, seed=4)]
    masks = [_box_mask(32, 32, (4, 4, 20, 20)), _box_mask(48, 40, (0, 0, 24, 40))]
    settings = GenerationSettings(steps=2, scheduler="ddpm", batch_size=2)
    pair = inpainter.inpaint(scenes, masks, ["a", "b"], [11, 12], settings)
    alone = inpainter.inpaint(scenes[1:], masks[1:], ["b"], [12], settings)[0]
    assert [image.size for image in pair] == [(32, 32), (48, 40)]
    assert np.abs(_array(pair[1]) - _array(alone)).max() <= 1
    other = inpainter.inpaint(scenes[1:], masks[1:], ["b"], [13], settings)[0]
    assert np.abs(_array(other) - _array(alone)).max() > 10


def test_a_text_to_image_model_can_inpaint(weights):
    generator = load_generator(weights["text2image"], "inpaint", device="cpu")
    assert generator.pipeline.unet.config.in_channels == 4
    scene, mask = _scene(32, 32), _box_mask(32, 32, (8, 8, 24, 24))
    out = generator.inpaint([scene], [mask], "a square", [0], FAST)[0]
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(_array(out)[outside], _array(scene)[outside])


def test_the_wrong_task_is_a_clear_error(text2image, inpainter, weights):
    scene, mask = _scene(32, 32), _box_mask(32, 32, (0, 0, 8, 8))
    with pytest.raises(ConfigError, match="task='inpaint'"):
        text2image.inpaint([scene], [mask], "x", [0], FAST)
    with pytest.raises(ConfigError, match="task='text2image'"):
        inpainter.text_to_image("x", [0], FAST)
    with pytest.raises(ConfigError, match="inpainting model"):
        load_generator(weights["inpaint"], "text2image", device="cpu")


def test_bad_inputs_name_the_problem(inpainter):
    scene = _scene(32, 32)
    with pytest.raises(DataError, match="mask 0 is 16x16"):
        inpainter.inpaint([scene], [_box_mask(16, 16, (0, 0, 4, 4))], "x", [0], FAST)
    with pytest.raises(DataError, match="2 prompts for 1 seeds"):
        inpainter.inpaint([scene], [_box_mask(32, 32, (0, 0, 4, 4))], ["x", "y"], [0], FAST)
    with pytest.raises(ConfigError, match="multiple of 8"):
        inpainter.inpaint(
            [scene], [_box_mask(32, 32, (0, 0, 4, 4))], "x", [0], GenerationSettings(width=36)
        )
    with pytest.raises(ConfigError, match="no denoising step"):
        inpainter.inpaint(
            [scene], [_box_mask(32, 32, (0, 0, 4, 4))], "x", [0],
            GenerationSettings(steps=2, strength=0.3),
        )  # fmt: skip


def test_loading_twice_returns_the_cached_generator(weights):
    first = load_generator(weights["text2image"], "text2image", device="cpu")
    assert load_generator(str(weights["text2image"]), "text2image", "cpu", "float32") is first
    assert first.weights_id == str(weights["text2image"].resolve())
    assert first.dtype == torch.float32 and first.pipeline._progress_bar_config["disable"]
    private = load_generator(weights["text2image"], "text2image", device="cpu", cache=False)
    assert private is not first
    # A directory saved again (a retrained domain model) is loaded afresh.
    index = weights["text2image"] / "model_index.json"
    stat = index.stat()
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_generator(weights["text2image"], "text2image", device="cpu") is not first


def test_missing_weights_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=str(missing)):
        load_generator(missing, "text2image", device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        load_generator("./no/such/dir", "inpaint", device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"{empty}.*model_index.json"):
        load_generator(str(empty), "inpaint", device="cpu")


def test_an_uncached_hub_id_offline_says_to_download_it():
    with pytest.raises(ConfigError, match="hf download unspur-tests/not-a-model"):
        load_generator("unspur-tests/not-a-model", "inpaint", device="cpu")


def test_unknown_scheduler_lists_the_names():
    with pytest.raises(ConfigError, match="dpm_solver"):
        GenerationSettings(scheduler="karras_magic")
    with pytest.raises(ConfigError, match="steps"):
        GenerationSettings(steps=0)
    with pytest.raises(ConfigError, match="dtype"):
        load_generator("unused", "inpaint", device="cpu", dtype="float8")


def test_every_scheduler_runs_and_the_pipelines_own_comes_back(text2image):
    own = type(text2image.pipeline.scheduler)
    images = {}
    for name in SCHEDULER_NAMES:
        settings = GenerationSettings(steps=2, guidance_scale=3.0, scheduler=name)
        images[name] = _array(text2image.text_to_image("a cat", [4], settings)[0])
        assert type(text2image.pipeline.scheduler) is own
    assert np.abs(images["dpm_solver"] - images["default"]).max() > 0
    assert text2image.provenance(settings)["scheduler"] == "DPMSolverMultistepScheduler"


def test_feathered_paste_blends_only_inside_the_mask():
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:10, 2:10] = True
    alpha = feather_alpha(mask, 3)
    assert (alpha[~mask] == 0).all()
    assert alpha[2, 5] == pytest.approx(1 / 3) and alpha[3, 5] == pytest.approx(2 / 3)
    assert (alpha[5:7, 5:7] == 1).all()
    original = Image.new("RGB", (12, 12), (0, 0, 0))
    generated = Image.new("RGB", (12, 12), (255, 255, 255))
    out = np.asarray(paste_back(original, generated, mask, feather=3))
    assert (out[~mask] == 0).all() and (out[5, 5] == 255).all() and out[2, 5, 0] == 85


def test_a_pipeline_that_cannot_do_the_task_is_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ConfigError, match="DDPMPipeline .* cannot text2image: .*prompt"):
        load_generator(tmp_path / "ddpm", "text2image", device="cpu")


def test_safety_checker_is_dropped_only_when_asked(weights, tmp_path):
    import json
    import shutil

    # A pipeline whose model_index.json names a safety checker (its weights are absent
    # here, so loading it fails unless it is dropped).
    copy = tmp_path / "with-checker"
    shutil.copytree(weights["text2image"], copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["requires_safety_checker"] = True
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="could not load the pipeline in"):
        load_generator(copy, "text2image", device="cpu")
    generator = load_generator(copy, "text2image", device="cpu", safety_checker=False)
    assert generator.pipeline.safety_checker is None
    assert generator.text_to_image("a cat", [0], FAST)[0].size == (32, 32)


@pytest.mark.parametrize("mode", ["clean", "noised"])
def test_latent_blend_keeps_the_original_latents_outside_the_mask(inpainter, mode):
    """DBB's Eq. 2 on a 9-channel UNet (which diffusers never blends): after the last
    step the latents outside the pipeline's latent mask are exactly the original's z_0,
    inside they are generated; without the blend they are not z_0 anywhere."""
    from unspur.generate.latent_blend import LatentBlend

    pipeline = inpainter.pipeline
    assert pipeline.unet.config.in_channels == 9
    scene, mask = _scene(32, 32, seed=5), _box_mask(32, 32, (8, 8, 24, 24))

    def final_latents(callback):
        extra = callback.call_kwargs() if callback is not None else {}
        return pipeline(
            prompt=["a circle"], image=[scene], mask_image=[mask], num_inference_steps=3,
            guidance_scale=3.0, generator=[torch.Generator().manual_seed(7)],
            output_type="latent", **extra,
        ).images  # fmt: skip

    blend = LatentBlend(pipeline, [scene], [7], mode)
    latents = final_latents(blend)
    scale = pipeline.vae_scale_factor
    keep = torch.from_numpy(np.asarray(mask)[::scale, ::scale] == 0)
    torch.testing.assert_close(latents[..., keep], blend.z0[..., keep], rtol=0, atol=0)
    assert (latents[..., ~keep] - blend.z0[..., ~keep]).abs().mean() > 0.1
    plain = final_latents(None)
    assert (plain[..., keep] - blend.z0[..., keep]).abs().mean() > 0.1


def test_noised_blend_uses_the_pipelines_own_starting_noise(inpainter):
    from diffusers.utils.torch_utils import randn_tensor

    from unspur.generate.latent_blend import LatentBlend

    blend = LatentBlend(inpainter.pipeline, [_scene(32, 32)] * 2, [3, 4], "noised")
    shape = (1, *blend.z0.shape[1:])
    expected = torch.cat(
        [randn_tensor(shape, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    )
    torch.testing.assert_close(blend.noise, expected, rtol=0, atol=0)


def test_the_wrapper_applies_the_latent_blend(inpainter):
    """``GenerationSettings.latent_blend`` reaches the pipeline as the callback above:
    the wrapper's image is the pipeline's own call with it, pixel for pixel."""
    from unspur.generate.latent_blend import LatentBlend

    scene, mask = _scene(32, 32, seed=6), _box_mask(32, 32, (10, 10, 22, 22))
    settings = GenerationSettings(steps=3, guidance_scale=3.0, paste_back=False)
    blended = replace(settings, latent_blend="clean")
    out = inpainter.inpaint([scene], [mask], ["x"], [1], blended)[0]
    callback = LatentBlend(inpainter.pipeline, [scene], [1], "clean")
    direct = inpainter.pipeline(
        prompt=["x"], image=[scene], mask_image=[mask], num_inference_steps=3,
        guidance_scale=3.0, generator=[torch.Generator().manual_seed(1)],
        **callback.call_kwargs(),
    ).images[0]  # fmt: skip
    np.testing.assert_array_equal(_array(out), _array(direct))
    plain = inpainter.inpaint([scene], [mask], ["x"], [1], settings)[0]
    assert np.abs(_array(plain) - _array(out)).max() > 10


def test_unknown_latent_blend_lists_the_choices():
    with pytest.raises(ConfigError, match="latent_blend must be one of none, clean, noised"):
        GenerationSettings(latent_blend="paste")
