"""FFR's training presets (ffr.md section 4, Appendix A, Table 2) and prompt words."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from unspur.config import DataConfig, RunConfig, TrainConfig
from unspur.errors import ConfigError
from unspur.methods import ffr_presets as presets
from unspur.methods.ffr import PROMPT_WORDS, Prompter, readable, stage_config

#: Table 2 as printed (exponents of ten, columns 95 / 97 / 99 / 99.9 %).
PAPER = {
    "celeba_hq": {
        ("none", "erm"): "-3 -3 -4 -2", ("none", "groupdro"): "-3 -3 -3 -4",
        ("none", "resample_group"): "-2 -2 -3 -2", ("usb", "erm"): "-3 -2 -3 -3",
        ("usb", "groupdro"): "-3 -2 -3 -3", ("usb", "resample_group"): "-3 -2 -7 -7",
        ("asb", "erm"): "-3 -3 -3 -2", ("asb", "groupdro"): "-3 -2 -3 -3",
        ("asb", "resample_group"): "-2 -7 -7 -7", ("ffr", "pretrain"): "-5 -4 -4 -4",
        ("ffr", "erm"): "-7 -7 -7 -7", ("ffr", "groupdro"): "-3 -3 -7 -7",
        ("ffr", "resample_group"): "-7 -6 -7 -7",
    },
    "utkface": {
        ("none", "erm"): "-3 -3 -3 -3", ("none", "groupdro"): "-4 -4 -4 -3",
        ("none", "resample_group"): "-2 -2 -2 -2", ("usb", "erm"): "-4 -2 -2 -2",
        ("usb", "groupdro"): "-5 -4 -2 -2", ("usb", "resample_group"): "-3 -2 -2 -2",
        ("asb", "erm"): "-3 -4 -2 -2", ("asb", "groupdro"): "-4 -4 -3 -2",
        ("asb", "resample_group"): "-6 -6 -6 -2", ("ffr", "pretrain"): "-4 -4 -4 -4",
        ("ffr", "erm"): "-5 -6 -6 -6", ("ffr", "groupdro"): "-4 -6 -6 -6",
        ("ffr", "resample_group"): "-5 -6 -6 -6",
    },
    "spuco_animals": {
        ("none", "erm"): "-5 -5 -4 -4", ("none", "groupdro"): "-5 -5 -4 -4",
        ("none", "resample_group"): "-5 -5 -4 -4", ("usb", "erm"): "-5 -7 -7 -7",
        ("usb", "groupdro"): "-7 -7 -7 -7", ("usb", "resample_group"): "-7 -7 -7 -7",
        ("asb", "erm"): "-6 -5 -5 -7", ("asb", "groupdro"): "-7 -6 -7 -7",
        ("asb", "resample_group"): "-7 -7 -7 -7", ("ffr", "pretrain"): "-6 -5 -5 -5",
        ("ffr", "erm"): "-7 -7 -7 -7", ("ffr", "groupdro"): "-5 -7 -7 -7",
        ("ffr", "resample_group"): "-6 -7 -7 -7",
    },
}  # fmt: skip


def test_table2_is_pinned_for_every_dataset_mode_method_stage_and_level():
    assert presets.LEVELS == (0.95, 0.97, 0.99, 0.999)
    assert set(presets.TABLE2) == set(PAPER)
    for dataset, rows in PAPER.items():
        assert set(presets.TABLE2[dataset]) == set(rows), dataset
        for (mode, method), text in rows.items():
            expected = [float(f"1e{e}") for e in text.split()]
            for level, lr in zip(presets.LEVELS, expected):
                assert presets.table2_lr(dataset, mode, method, level) == lr, (
                    dataset, mode, method, level)  # fmt: skip
    # The example: UTKFace 99.9 %, stage 1 1e-4, stage 2 ERM 1e-6.
    assert presets.table2_lr("utkface", "ffr", "pretrain", 0.999) == 1e-4
    assert presets.table2_lr("utkface", "ffr", "erm", 0.999) == 1e-6
    assert presets.table2_lr("utkface", "ffr", "dfr_val", 0.999) == 1e-6  # DFR: its ERM
    assert presets.LR_GRID == (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
    assert presets.WEIGHT_DECAY == {"celeba_hq": 1e-5, "utkface": 1e-5, "spuco_animals": 1e-3}
    with pytest.raises(ConfigError, match="no column"):
        presets.table2_lr("utkface", "ffr", "erm", 0.9)
    with pytest.raises(ConfigError, match="no 'ffr' x 'jtt' row"):
        presets.table2_lr("utkface", "ffr", "jtt", 0.99)


@dataclass
class _Context:
    config: RunConfig = field(default_factory=RunConfig)


def _options(**changes):
    return {"preset": None, "level": None, "lr_search": False, "lr_grid": "paper", **changes}


def test_every_stage_uses_adam_without_scheduler_or_augmentation():
    # The run's own train section says SGD, cosine, augmentation: no FFR stage takes it.
    train = TrainConfig(optimizer="sgd", scheduler="cosine", augment=True, lr=0.1)
    context = _Context(RunConfig(train=train, data=DataConfig(bias_ratio=0.999)))
    for mode, method in (("ffr", "erm"), ("usb", "groupdro"), ("asb", "erm"), ("none", "erm")):
        config, _ = stage_config(context, _options(), mode, method, {}, "finetune")
        assert (config.optimizer, config.scheduler, config.augment) == ("adam", "none", False)
        assert config.lr == 0.1  # no preset: the run's rate
    config, sources = stage_config(context, _options(preset="utkface"), "ffr", "erm", {}, "f")
    assert (config.lr, config.weight_decay, config.batch_size, config.epochs) == (
        1e-6, 1e-5, 128, 50)  # fmt: skip
    assert "Table 2(b)" in sources["lr"] and sources["weight_decay"] == "ffr.md Appendix A"
    config, _ = stage_config(context, _options(preset="spuco_animals"), "ffr", "pretrain", {}, "p")
    assert (config.lr, config.weight_decay) == (1e-5, 1e-3)
    level = _options(preset="celeba_hq", level=0.95)
    config, sources = stage_config(context, level, "usb", "resample_group", {"epochs": 3}, "train")
    assert (config.lr, config.epochs, sources["epochs"]) == (1e-3, 3, "method.options.train")
    unset = _Context(RunConfig())
    with pytest.raises(ConfigError, match="data.bias_ratio"):
        stage_config(unset, _options(preset="utkface"), "ffr", "erm", {}, "finetune")


def test_prompts_never_carry_a_readers_internal_names():
    utk = Prompter(["male", "female"], ["child (age<=10)", "adult (age>=20)"],
                   "A photo of {bias} {class}", PROMPT_WORDS["utkface"]["class_words"],
                   PROMPT_WORDS["utkface"]["bias_words"])  # fmt: skip
    celeba = Prompter(["not Smiling", "Smiling"], ["not Male", "Male"],
                      "A photo of {bias} {class}", PROMPT_WORDS["celeba_hq"]["class_words"],
                      PROMPT_WORDS["celeba_hq"]["bias_words"])  # fmt: skip
    prompts = [p(y, a, 0, 2 * y + a, 0) for p in (utk, celeba) for y in (0, 1) for a in (0, 1)]
    assert prompts[1] == "A photo of an adult who is male"
    assert prompts[6] == "A photo of a woman smiling"
    for prompt in prompts:
        assert readable(prompt[len("A photo of ") :]), prompt
        assert "not " not in prompt and "(" not in prompt and "<" not in prompt
    with pytest.raises(ConfigError, match="internal names"):
        Prompter(["not Smiling", "Smiling"], ["not Male", "Male"], "A photo of {bias} {class}")
    # A domain model's own captions are not templates: no words needed.
    assert readable("land") and not readable("not Male") and not readable("child (age<=10)")


@pytest.mark.parametrize(
    ("name", "preset", "dataset"),
    [("utkface_ffr", "utkface", "utkface"), ("celeba_hq_ffr", "celeba_hq", "celeba_hq"),
     ("spuco_animals_ffr", "spuco_animals", "spuco_animals")],
)  # fmt: skip
def test_shipped_configs_select_the_preset_by_level(name, preset, dataset):
    from pathlib import Path

    from unspur.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    options = config.method.options
    assert config.data.name == dataset and options["preset"] == preset
    assert options["level"] is None and config.data.bias_ratio == 0.999  # level from data
    assert options["generator"] == "CompVis/stable-diffusion-v1-4"
    assert config.train.weight_decay == presets.WEIGHT_DECAY[preset]
