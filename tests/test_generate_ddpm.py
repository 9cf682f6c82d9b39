"""DDPM with P2 weighting, DDIM sampling and inversion, and h-space reading/injection.

Everything runs on one tiny ``UNet2DModel`` (16 x 16 px, channels (16, 32), ~0.2 M
parameters) trained for a few seconds on disks-on-backgrounds images.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from unspur.errors import CheckpointError, ConfigError, UnspurError
from unspur.generate.ddpm import (
    ADM_64,
    DiffusionImages,
    build_ddpm_scheduler,
    build_ddpm_unet,
    ddim_invert,
    ddim_sample,
    ddim_timesteps,
    ddpm_loss,
    load_ddpm,
    p2_weights,
    save_ddpm,
    train_ddpm,
)
from unspur.generate.hspace import (
    HSpace,
    ddim_sample_with_h,
    h_norms,
    h_share,
    inject,
    slerp,
)
from unspur.generate.training import GenerativeTrainConfig

SIZE = 16
CHANNELS = (16, 32)
MID_SHAPE = (CHANNELS[-1], SIZE // 2, SIZE // 2)  # the middle block works at the lowest level


pytestmark = pytest.mark.usefixtures("one_thread")


def disks(n: int, seed: int = 0) -> torch.Tensor:
    """A coloured disk on a plain background per image, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = []
    for _ in range(n):
        cx, cy = torch.randint(4, SIZE - 4, (2,), generator=generator).tolist()
        radius = 2 + int(torch.randint(0, 3, (1,), generator=generator))
        colour, background = torch.rand(2, 3, 1, 1, generator=generator) * 2 - 1
        disk = (((xx - cx) ** 2 + (yy - cy) ** 2) <= radius**2).float()
        images.append(colour * disk + background * (1 - disk))
    return torch.stack(images)


def tiny_unet(num_classes: int | None = None):
    torch.manual_seed(0)
    return build_ddpm_unet(SIZE, 3, num_classes, block_out_channels=CHANNELS)


def config(**changes) -> GenerativeTrainConfig:
    base = dict(steps=40, batch_size=16, learning_rate=2e-3, log_every=10, save_every=1000)
    base.update(changes)
    return GenerativeTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DDPM trained for 40 steps with P2 (gamma=1, k=1): ~3 s on an idle thread."""
    out = tmp_path_factory.mktemp("ddpm")
    return train_ddpm(tiny_unet(), disks(32), config(), out)


# --------------------------------------------------------------------------- P2


def test_p2_weights_formula_and_shape():
    scheduler = build_ddpm_scheduler()
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(p2_weights(scheduler, 0.0, 1.0), torch.ones(1000))
    for gamma, k in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.1)):
        weights = p2_weights(scheduler, gamma, k)
        assert weights.shape == (1000,)
        torch.testing.assert_close(weights, (1 / (k + snr) ** gamma).float())
        # SNR falls with t, so the weights rise: low-noise steps count least.
        assert bool((weights[1:] > weights[:-1]).all())
    default = p2_weights(scheduler)  # gamma=1, k=1: from ~1e-4 at t=0 to ~1 at T-1
    assert default[0] < 1e-3 and default[-1] > 0.99
    with pytest.raises(ConfigError):
        p2_weights(scheduler, -1.0)


def test_gamma_zero_is_the_plain_epsilon_loss():
    unet, scheduler = tiny_unet(), build_ddpm_scheduler()
    x0 = disks(4)
    torch.manual_seed(3)
    weighted = ddpm_loss(unet, scheduler, x0, p2_weights(scheduler, gamma=0.0))
    torch.manual_seed(3)  # the same timesteps and noise, by hand
    t = torch.randint(0, 1000, (4,))
    noise = torch.randn(x0.shape)
    eps = unet(scheduler.add_noise(x0, noise, t), t).sample
    torch.testing.assert_close(weighted, torch.nn.functional.mse_loss(eps, noise))


# --------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_saves_a_pipeline_directory(trained):
    losses = [entry["loss"] for entry in trained.result.losses]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    index = json.loads((trained.model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert (trained.model_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()

    from diffusers import DDPMPipeline  # the standard pipeline reads it as is

    pipeline = DDPMPipeline.from_pretrained(trained.model_dir)
    assert pipeline.unet.config.sample_size == SIZE


def test_changed_ddpm_settings_refuse_to_resume(tmp_path):
    train_ddpm(tiny_unet(), disks(8), config(steps=2, batch_size=4), tmp_path)
    with pytest.raises(CheckpointError, match="p2_gamma"):
        train_ddpm(tiny_unet(), disks(8), config(steps=4, batch_size=4), tmp_path, p2_gamma=0.5)


def test_class_conditional_training_and_sampling(tmp_path):
    unet = tiny_unet(num_classes=2)
    images = disks(8)
    labels = torch.tensor([0, 1] * 4)
    with pytest.raises(ConfigError, match="conditional=True"):
        train_ddpm(unet, images, config(steps=1), tmp_path, conditional=False)
    result = train_ddpm(unet, images, config(steps=2, batch_size=4), tmp_path, labels=labels)
    assert result.result.steps == 2
    out = ddim_sample(unet, result.scheduler, seeds=[0, 1], steps=3, class_labels=[0, 1])
    assert out.shape == (2, 3, SIZE, SIZE)
    with pytest.raises(UnspurError, match="class_labels"):
        ddim_sample(unet, result.scheduler, seeds=[0], steps=2)
    # The label changes the sample of the same seed.
    other = ddim_sample(unet, result.scheduler, seeds=[0, 1], steps=3, class_labels=[1, 0])
    assert not torch.equal(out, other)


def test_raw_images_are_resized_and_scaled_not_classifier_normalised():
    class Raw:  # the GroupDataset interface: raw(i) -> PIL, y
        y = torch.tensor([0, 1])

        def __len__(self):
            return 2

        def raw(self, i):
            return Image.new("RGB", (40, 24), (255, 0, 128) if i else (0, 0, 0))

    data = DiffusionImages(Raw(), image_size=SIZE)
    item = data[1]
    assert item["x"].shape == (3, SIZE, SIZE) and int(item["y"]) == 1
    torch.testing.assert_close(item["x"][:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    with pytest.raises(UnspurError, match=r"\[-1, 1\]"):
        DiffusionImages(torch.rand(2, 3, 4, 4) * 255)


def test_build_unet_sizes():
    assert tiny_unet().mid_block is not None
    adm = ADM_64 | {"block_out_channels": (16, 32, 48, 64), "attention_head_dim": 8}
    unet = build_ddpm_unet(64, 3, **adm)  # the ADM-64 layout, narrowed to stay cheap
    assert unet.config.down_block_types == (
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    )
    with pytest.raises(ConfigError):
        build_ddpm_unet(20, 3, block_out_channels=(16, 32, 32, 32))


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_samples(trained, tmp_path):
    before = ddim_sample(trained.unet, trained.scheduler, seeds=[5, 6], steps=4)
    save_ddpm(tmp_path / "m", trained.unet, trained.scheduler)
    unet, scheduler = load_ddpm(tmp_path / "m")
    assert torch.equal(ddim_sample(unet, scheduler, seeds=[5, 6], steps=4), before)

    flat = tmp_path / "flat"  # a bare U-Net directory with its scheduler config beside it
    trained.unet.save_pretrained(flat)
    trained.scheduler.save_pretrained(flat)
    unet, scheduler = load_ddpm(flat)
    assert torch.equal(ddim_sample(unet, scheduler, seeds=[5, 6], steps=4), before)


@pytest.mark.filterwarnings("ignore::UserWarning")  # huggingface_hub's deprecation notes
def test_load_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        load_ddpm(tmp_path)
    with pytest.raises(CheckpointError, match="cannot load a DDPM"):
        load_ddpm("nobody/no-such-ddpm")  # offline in tests: no hub


# --------------------------------------------------------------------------- DDIM


def test_grid_runs_from_zero_to_the_last_timestep():
    scheduler = build_ddpm_scheduler()
    assert ddim_timesteps(scheduler, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert ddim_timesteps(scheduler, 1) == [999]
    assert len(set(ddim_timesteps(scheduler, 1000))) == 1000
    with pytest.raises(ConfigError):
        ddim_timesteps(scheduler, 0)


def test_seeds_are_per_image_and_reproducible(trained):
    unet, scheduler = trained.unet, trained.scheduler
    for eta in (0.0, 1.0):  # eta=1: every step also draws noise from the image's seed
        batch = ddim_sample(unet, scheduler, seeds=[7, 8, 9], steps=5, eta=eta)
        again = ddim_sample(unet, scheduler, seeds=[7, 8, 9], steps=5, eta=eta)
        assert torch.equal(batch, again)
        alone = ddim_sample(unet, scheduler, seeds=[8], steps=5, eta=eta)
        # Same image from the same seed in a batch of one; not bit-equal only because
        # CPU kernels may sum in a different order for another batch size.
        torch.testing.assert_close(alone[0], batch[1], atol=1e-4, rtol=1e-4)
        assert (batch[0] - batch[1]).abs().max() > 0.1
    with pytest.raises(UnspurError, match="seed"):
        ddim_sample(unet, scheduler, torch.randn(1, 3, SIZE, SIZE), steps=3, eta=1.0)


def test_inversion_is_the_exact_mirror_of_sampling_when_the_noise_is_constant():
    # With a noise prediction that does not depend on x or t, DDIM inversion has no
    # approximation left: invert-then-sample must give the image back to float error,
    # which checks the two loops use the same grid and coefficients.
    unet, scheduler = tiny_unet(), build_ddpm_scheduler()
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.constant_(unet.conv_out.bias, 0.3)
    images = disks(2)
    x_t = ddim_invert(unet, scheduler, images, steps=10)
    back = ddim_sample(unet, scheduler, x_t, steps=10)
    torch.testing.assert_close(back, images, atol=1e-4, rtol=0)


def test_invert_then_sample_reconstructs_the_image(trained):
    # With a real model the inversion evaluates the noise at the lower end of each step
    # and the sampler at the upper end, so what is left is a discretisation error. Two
    # checks that make the tolerance meaningful: the error collapses as the grid gets
    # finer (at 20 steps this barely trained model is off by about the distance between
    # two images, at 80 it is tens of times smaller), and at 80 steps it is far below
    # the mean squared distance between two images of the training set (~0.67 here),
    # i.e. the reconstruction is recognisably this image and not another one.
    unet, scheduler = trained.unet, trained.scheduler
    images = disks(3, seed=11)
    errors = {}
    for steps in (20, 80):
        x_t = ddim_invert(unet, scheduler, images, steps=steps)
        back = ddim_sample(unet, scheduler, x_t, steps=steps)
        errors[steps] = (back - images).pow(2).mean(dim=(1, 2, 3))
    assert 0.7 < float(x_t.std()) < 1.5  # x_T looks like unit noise
    train = disks(32).flatten(1)
    between = torch.cdist(train, train).pow(2).sum() / (32 * 31 * train.shape[1])
    assert float(errors[80].max()) < 0.05 * float(between)
    assert float(errors[80].mean()) < 0.1 * float(errors[20].mean())


# --------------------------------------------------------------------------- h-space


def test_h_is_recorded_at_the_requested_timesteps(trained):
    unet, scheduler = trained.unet, trained.scheduler
    with HSpace(unet, record=[999, 555]) as hs:
        ddim_sample(unet, scheduler, seeds=[1, 2], steps=10)
    assert sorted(hs.h) == [555, 999]
    for h in hs.h.values():
        assert h.shape == (2, *MID_SHAPE)
    assert not torch.equal(hs.h[555], hs.h[999])
    assert not hs.attached and not unet._forward_pre_hooks and not unet.mid_block._forward_hooks
    with HSpace(unet, record=True, to_cpu=True) as every:
        ddim_sample(unet, scheduler, seeds=[1], steps=4)
    assert sorted(every.h) == ddim_timesteps(scheduler, 4)


def test_replacing_h_changes_the_sample_and_removal_restores_it_bit_for_bit(trained):
    unet, scheduler = trained.unet, trained.scheduler
    plain = ddim_sample(unet, scheduler, seeds=[3, 4], steps=6)
    seen = []

    def scale(h, t):
        seen.append(t)
        return 2.0 * h

    hs = HSpace(unet, replace=scale, replace_at=lambda t: t >= 500).attach()
    edited = ddim_sample(unet, scheduler, seeds=[3, 4], steps=6)
    with hs.paused():  # paused: the plain model again
        assert torch.equal(ddim_sample(unet, scheduler, seeds=[3, 4], steps=6), plain)
    hs.remove()
    assert seen == [t for t in reversed(ddim_timesteps(scheduler, 6)) if t >= 500]  # 999, 799, 599
    assert (edited - plain).abs().max() > 1e-2
    assert torch.equal(ddim_sample(unet, scheduler, seeds=[3, 4], steps=6), plain)

    with HSpace(unet, replace=lambda h, t: h[:1]):  # a wrong shape is refused
        with pytest.raises(UnspurError, match="shape"):
            ddim_sample(unet, scheduler, seeds=[3, 4], steps=2)


def test_slerp_endpoints_norm_and_angle():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, *MID_SHAPE, generator=generator)
    b = 3.0 * torch.randn(3, *MID_SHAPE, generator=generator)
    norm_a, norm_b = h_norms(a), h_norms(b)
    rescaled = b * (norm_a / norm_b).view(-1, 1, 1, 1)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), rescaled)  # b's direction, a's length
    for t in (0.25, 0.5, 0.9):
        torch.testing.assert_close(h_norms(slerp(a, b, t)), norm_a)  # "first": keeps |a|
    mid = slerp(a, b, 0.5).flatten(1)
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(cos(mid, a.flatten(1)), cos(mid, b.flatten(1)))  # on the arc
    # "lerp" ends exactly at b and interpolates the lengths; "none" is the raw formula.
    torch.testing.assert_close(slerp(a, b, 1.0, norm="lerp"), b)
    torch.testing.assert_close(h_norms(slerp(a, b, 0.5, norm="lerp")), (norm_a + norm_b) / 2)
    torch.testing.assert_close(slerp(a, b, 1.0, norm="none"), b)
    # One t per sample, and parallel vectors (no angle) fall back to linear weights.
    per_sample = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(per_sample[0], a[0])
    torch.testing.assert_close(per_sample[2], rescaled[2])
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), a)
    with pytest.raises(ConfigError):
        slerp(a, b, 0.5, norm="max")


def test_local_injection_touches_only_the_mask():
    generator = torch.Generator().manual_seed(1)
    h, content = torch.randn(2, 2, *MID_SHAPE, generator=generator)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :, : SIZE // 2] = 1  # left half of the image = left half of h
    out = inject(h, content, 0.7, mask=mask)
    right = slice(MID_SHAPE[2] // 2, None)
    left = slice(None, MID_SHAPE[2] // 2)
    assert torch.equal(out[..., right], h[..., right])
    assert not torch.allclose(out[..., left], h[..., left])
    torch.testing.assert_close(h_norms(out[..., left]), h_norms(h[..., left]))


def test_injection_global_local_recorded_and_boosted(trained):
    unet, scheduler = trained.unet, trained.scheduler
    steps, t_edit = 8, 400
    targets = ddim_invert(unet, scheduler, disks(2, seed=21), steps=steps)
    sources = ddim_invert(unet, scheduler, disks(2, seed=22), steps=steps)
    plain = ddim_sample(unet, scheduler, targets, steps=steps)

    def run(**options):
        options = {"steps": steps, "t_edit": t_edit} | options
        return ddim_sample_with_h(unet, scheduler, targets, **options)

    # gamma=0 keeps the target's own process (slerp at t=0 is h up to rounding).
    torch.testing.assert_close(run(source_latents=sources, gamma=0.0), plain, atol=1e-4, rtol=0)
    injected = run(source_latents=sources, gamma=0.8)
    assert (injected - plain).abs().max() > 1e-2
    # The same injection from h recorded beforehand on the sources' own reconstruction.
    with HSpace(unet, record=lambda t: t >= t_edit) as recorder:
        ddim_sample(unet, scheduler, sources, steps=steps)
    recorded = run(source_h=recorder.h, gamma=0.8)
    torch.testing.assert_close(recorded, injected, atol=1e-4, rtol=1e-4)
    # Local: an empty mask injects nothing; a full mask is the global injection (up to
    # the rounding of running targets and sources in one batch).
    empty, full = torch.zeros(1, 1, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)
    torch.testing.assert_close(
        run(source_latents=sources, gamma=0.8, mask=empty), plain, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        run(source_latents=sources, gamma=0.8, mask=full), injected, atol=1e-4, rtol=0
    )
    # Asymmetric (Asyrp): runs, and differs from the symmetric process.
    asym = run(source_latents=sources, gamma=0.8, asymmetric=True)
    assert (asym - injected).abs().max() > 1e-4
    # Quality boosting: stochastic below t_boost, reproducible per seed.
    boosted = run(source_latents=sources, gamma=0.8, t_boost=300, seeds=[1, 2])
    assert torch.equal(boosted, run(source_latents=sources, gamma=0.8, t_boost=300, seeds=[1, 2]))
    assert (boosted - injected).abs().max() > 1e-3
    with pytest.raises(UnspurError, match="seed"):
        run(source_latents=sources, gamma=0.8, t_boost=300)
    with pytest.raises(UnspurError, match="exactly one"):
        run()
    with pytest.raises(UnspurError, match="no h for timestep"):
        run(source_h={999: recorder.h[999]})
    assert not unet._forward_pre_hooks and not unet.mid_block._forward_hooks


def test_asymmetric_step_takes_x0_from_the_injected_and_direction_from_the_plain_call(trained):
    """Asyrp's asymmetric process, written out for one edited step (grid [0, 999])."""
    unet, scheduler = trained.unet, trained.scheduler
    targets = ddim_invert(unet, scheduler, disks(2, seed=31), steps=2)
    sources = ddim_invert(unet, scheduler, disks(2, seed=32), steps=2)
    gamma = 0.7
    out = ddim_sample_with_h(
        unet, scheduler, targets, sources, steps=2, gamma=gamma, t_edit=999, asymmetric=True
    )

    alpha_bar = scheduler.alphas_cumprod.double()
    a_top, a_low = float(alpha_bar[999]), float(alpha_bar[0])
    t_top = torch.full((2,), 999)
    with torch.no_grad():
        with HSpace(unet, record=[999]) as recorder:
            unet(sources, t_top)
        content = recorder.h[999]
        plain = unet(targets, t_top).sample
        with HSpace(unet, replace=lambda h, t: slerp(h, content, gamma)):
            injected = unet(targets, t_top).sample
        x0 = (targets - (1 - a_top) ** 0.5 * injected) / a_top**0.5
        x_low = a_low**0.5 * x0 + (1 - a_low) ** 0.5 * plain  # direction: the plain call
        eps_low = unet(x_low, torch.zeros(2, dtype=torch.long)).sample
        expected = (x_low - (1 - a_low) ** 0.5 * eps_low) / a_low**0.5  # t = 0: not edited
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # gamma = 1: the injected h is the content's direction at the target's norm.
    with torch.no_grad(), HSpace(unet, record=[999]) as recorder:
        unet(targets, t_top)
    full = slerp(recorder.h[999], content, 1.0)
    torch.testing.assert_close(h_norms(full), h_norms(recorder.h[999]))
    cos = torch.nn.functional.cosine_similarity(full.flatten(1), content.flatten(1))
    torch.testing.assert_close(cos, torch.ones(2))


def test_h_share_measures_how_far_h_alone_moves_the_prediction(trained):
    unet, scheduler = trained.unet, trained.scheduler
    images, donors = disks(4, seed=41), disks(4, seed=42)
    same = h_share(unet, scheduler, images, images, 500)
    torch.testing.assert_close(same, torch.zeros(4))  # the own h: nothing moves
    share = h_share(unet, scheduler, images, donors, 500)
    assert share.shape == (4,) and bool(torch.isfinite(share).all())
    assert bool((share > 0).all())  # this U-Net's decoder reads h, a little
    assert not unet._forward_pre_hooks and not unet.mid_block._forward_hooks


def test_skip_dropout_makes_the_decoder_depend_on_h_alone_while_training():
    from unspur.generate.ddpm import skip_dropout

    unet = tiny_unet().eval()
    a, b = disks(2, seed=5)
    x = torch.stack([a, b])
    t = torch.full((2,), 500)
    fixed = torch.randn(2, *MID_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = unet(x, t).sample
        with HSpace(unet, replace=lambda h, _: fixed[: len(h)]):
            with skip_dropout(unet, 1.0):  # every skip dropped: only h reaches the decoder
                same = unet(torch.stack([a, a]), t).sample, unet(torch.stack([b, b]), t).sample
            assert torch.allclose(same[0], same[1], atol=1e-6)
            with skip_dropout(unet, 1.0, levels=[0]):  # the lowest level only: skips remain
                other = unet(torch.stack([a, a]), t).sample, unet(torch.stack([b, b]), t).sample
            assert (other[0] - other[1]).abs().max() > 1e-4
        with skip_dropout(unet, 0.0):
            torch.testing.assert_close(unet(x, t).sample, before)
        torch.testing.assert_close(unet(x, t).sample, before)  # hooks removed on exit
    with pytest.raises(ConfigError):
        with skip_dropout(unet, 1.5):
            pass
