"""Cutting the skip connections of a U-Net's lowest decoder levels (``no_skip_below``).

A tiny ``UNet2DModel`` (16 px, channels (8, 16, 16), attention at the 4 px level, so the
cut covers both ``AttnUpBlock2D`` and ``UpBlock2D``); no training.
"""

from __future__ import annotations

import json

import pytest
import torch

from unspur.errors import ConfigError
from unspur.generate.ddpm import (
    NO_SKIP_KEY,
    build_ddpm_scheduler,
    build_ddpm_unet,
    load_ddpm,
    remove_skips,
    save_ddpm,
    skips_removed_below,
)
from unspur.generate.hspace import HSpace

SIZE = 16
CHANNELS = (8, 16, 16)


def _unet(no_skip_below: int = 0):
    torch.manual_seed(0)
    unet = build_ddpm_unet(SIZE, 3, block_out_channels=CHANNELS, no_skip_below=no_skip_below)
    return unet.eval()


def _outputs_with_fixed_h(unet, x: torch.Tensor, h: torch.Tensor) -> list[torch.Tensor]:
    """Every up block's output (and the U-Net's) for input ``x`` with h replaced by ``h``."""
    outputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
        for block in unet.up_blocks
    ]
    t = torch.full((x.shape[0],), 700)
    try:
        with torch.no_grad(), HSpace(unet, replace=lambda old, _: h.to(old.dtype)):
            outputs.append(unet(x, t).sample)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _h(unet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), HSpace(unet, record=True) as recorder:
        unet(x, torch.full((x.shape[0],), 700))
    return recorder.h[700]


@pytest.mark.parametrize("cut", [1, 2])
def test_the_cut_decoder_levels_depend_on_the_input_only_through_h(cut):
    unet = _unet(cut)
    torch.manual_seed(1)
    x, other = torch.randn(2, 2, 3, SIZE, SIZE)
    h = _h(unet, x)
    # Another image, hence other skip tensors everywhere, but the same h.
    a = _outputs_with_fixed_h(unet, x, h)
    b = _outputs_with_fixed_h(unet, other, h)
    for level in range(cut):
        assert torch.equal(a[level], b[level]), f"level {level} reads the encoder's skips"
    for level in range(cut, len(unet.up_blocks)):  # above the cut the skips still count
        assert not torch.allclose(a[level], b[level])
    assert not torch.allclose(a[-1], b[-1])


def test_without_the_cut_the_lowest_level_reads_the_skips():
    """The check above can fail: a plain U-Net's lowest decoder level changes with x."""
    unet = _unet(0)
    torch.manual_seed(1)
    x, other = torch.randn(2, 2, 3, SIZE, SIZE)
    h = _h(unet, x)
    assert not torch.allclose(
        _outputs_with_fixed_h(unet, x, h)[0], _outputs_with_fixed_h(unet, other, h)[0]
    )
    assert skips_removed_below(unet) == 0


def test_every_skip_cut_makes_the_output_a_function_of_h():
    unet = _unet(len(CHANNELS))
    torch.manual_seed(2)
    x, other = torch.randn(2, 2, 3, SIZE, SIZE)
    h = _h(unet, x)
    assert torch.equal(
        _outputs_with_fixed_h(unet, x, h)[-1], _outputs_with_fixed_h(unet, other, h)[-1]
    )


def test_the_cut_keeps_diffusers_weights_and_can_be_undone():
    plain, cut = _unet(0), _unet(2)
    assert plain.state_dict().keys() == cut.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in cut.state_dict().items())
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([500, 500])
    with torch.no_grad():
        assert not torch.allclose(plain(x, t).sample, cut(x, t).sample)
        remove_skips(cut, 0)
        assert torch.equal(plain(x, t).sample, cut(x, t).sample)
    assert skips_removed_below(cut) == 0


def test_the_cut_survives_save_and_load(tmp_path):
    unet = _unet(2)
    save_ddpm(tmp_path / "m", unet, build_ddpm_scheduler())
    config = json.loads((tmp_path / "m" / "unet" / "config.json").read_text())
    assert config[NO_SKIP_KEY] == 2
    loaded, _ = load_ddpm(tmp_path / "m")
    assert skips_removed_below(loaded) == 2
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([300, 300])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, loaded(x, t).sample)


def test_cutting_twice_replaces_the_first_cut():
    unet = _unet(2)
    remove_skips(unet, 1)
    assert skips_removed_below(unet) == 1
    assert len(unet._unspur_skip_cuts) == 1


@pytest.mark.parametrize("bad", [-1, len(CHANNELS) + 1])
def test_a_cut_outside_the_decoder_is_refused(bad):
    with pytest.raises(ConfigError, match="no_skip_below"):
        _unet(bad)


def test_training_a_cut_unet_records_the_cut_and_never_feeds_the_cut_skips(tmp_path):
    from unspur.generate.ddpm import train_ddpm
    from unspur.generate.training import GenerativeTrainConfig

    unet = _unet(1).train()
    images = torch.rand(8, 3, SIZE, SIZE) * 2 - 1
    config = GenerativeTrainConfig(steps=2, batch_size=4, learning_rate=1e-3, seed=0)
    seen: list[torch.Tensor] = []
    handle = (
        unet.up_blocks[0]
        .resnets[0]
        .register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    )
    trained = train_ddpm(unet, images, config, tmp_path)
    handle.remove()
    h_channels = CHANNELS[-1]
    assert seen and all(not s[:, h_channels:].any() for s in seen)  # the skip half is zeros
    settings = json.loads((tmp_path / "ddpm_settings.json").read_text())
    assert settings["no_skip_below"] == 1
    loaded, _ = load_ddpm(trained.model_dir)
    assert skips_removed_below(loaded) == 1


def test_diffinject_trains_its_ddpm_with_the_cut_it_is_given(tmp_path):
    from types import SimpleNamespace

    from unspur.methods.diffinject import DiffInject, _ddpm

    assert DiffInject.defaults["ddpm_no_skip_below"] == 0  # every skip, as ADM
    options = {**DiffInject.defaults, **DiffInject.debug_options, "ddpm_no_skip_below": 1}
    context = SimpleNamespace(
        config=SimpleNamespace(seed=0, train=SimpleNamespace(device="cpu")),
        train=torch.rand(8, 3, 16, 16) * 2 - 1,
        out_dir=tmp_path,
    )
    unet, _, _ = _ddpm(context, options)
    assert skips_removed_below(unet) == 1
    loaded, _ = load_ddpm(tmp_path / "diffinject_ddpm" / "ddpm")  # what `ddpm: DIR` reads
    assert skips_removed_below(loaded) == 1
