"""The shipped CIFAR-10 backbone: loads by name from the package, its card, its recipe."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unspur.config import config_from_dict
from unspur.errors import CheckpointError, UnspurError
from unspur.models import build_model, load_backbone_weights
from unspur.models import shipped as shipped_module
from unspur.models.shipped import shipped_card, shipped_names
from unspur.pretrain.cifar10 import augment, lr_factor, train_cifar10_backbone

NAME = "unspur:cifar10-resnet18"
WEIGHTS = Path(shipped_module.__file__).parent / "weights"
OPTIONS = {"small_images": True, "width": 16}
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
DIGEST = "f42a0ba62c2466480acf670f77352a730a4d978458100f184e32fc7c273a8c06"


def _file_state() -> dict[str, torch.Tensor]:
    return load_file(str(WEIGHTS / "cifar10-resnet18.safetensors"))


def test_shipped_name_is_listed_and_file_is_small_fp16_torchvision_layout() -> None:
    assert NAME in shipped_names()
    path = WEIGHTS / "cifar10-resnet18.safetensors"
    assert path.stat().st_size <= 10 * 2**20
    state = _file_state()
    assert state["conv1.weight"].dtype == torch.float16
    assert state["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    # torchvision's key layout: stem, four stages of two BasicBlocks, downsample, fc
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.1.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer3.0.downsample.1.running_mean",
        "layer4.1.bn2.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in state, key
    assert {k.split(".")[0] for k in state} == {
        "conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"
    }  # fmt: skip
    assert tuple(state["fc.weight"].shape) == (10, 128)


def test_config_with_shipped_name_loads_the_file_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no data directory anywhere near
    config = config_from_dict(
        {"model": {"arch": "resnet18", "pretrained": NAME, "options": dict(OPTIONS)}}
    )
    model = build_model(config.model.arch, 10, config.model.pretrained, **config.model.options)
    assert model.pretrained == NAME
    loaded = model.state_dict()
    file_state = _file_state()
    assert set(loaded) == set(file_state)
    for key, value in file_state.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
    # another class count: the backbone loads, the head stays fresh
    two = build_model("resnet18", 2, NAME, **OPTIONS)
    assert torch.equal(two.state_dict()["layer4.1.conv2.weight"], loaded["layer4.1.conv2.weight"])
    assert tuple(two.fc.weight.shape) == (2, 128)


def test_shipped_backbone_through_load_backbone_weights_reports_the_name() -> None:
    model = build_model("resnet18", 10, **OPTIONS)
    report = load_backbone_weights(model, NAME)
    assert report.head_loaded and report.path == NAME and NAME in report.message


def test_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(UnspurError, match="cifar10-resnet18") as info:
        build_model("resnet18", 10, "unspur:imagenet-resnet50", **OPTIONS)
    assert isinstance(info.value, CheckpointError)
    assert "unspur:imagenet-resnet50" in str(info.value)


def test_wrong_build_options_say_which_options_the_shipped_backbone_needs() -> None:
    with pytest.raises(CheckpointError) as info:
        build_model("resnet18", 10, NAME)  # torchvision width and stem
    message = str(info.value)
    assert "shape mismatch" in message and '"width": 16' in message
    assert "model.options" in message and "ImageNet" not in message


def test_damaged_install_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "cifar10-resnet18.json").write_bytes((WEIGHTS / "cifar10-resnet18.json").read_bytes())
    data = bytearray((WEIGHTS / "cifar10-resnet18.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "cifar10-resnet18.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(shipped_module, "_weights_dir", lambda: folder)
    with pytest.raises(CheckpointError, match="damaged"):
        build_model("resnet18", 10, NAME, **OPTIONS)


def test_card_fields() -> None:
    card = shipped_card(NAME)
    assert card["name"] == "cifar10-resnet18" and card["load_as"] == NAME
    assert card["arch"] == "resnet18" and card["options"] == OPTIONS
    weights = WEIGHTS / card["weights"]
    assert card["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card["dtype"] == "float16"
    assert card["recipe"]["command"].startswith("unspur pretrain cifar10-resnet18 --data-dir")
    assert "/tmp" not in card["recipe"]["command"] and "/work" not in card["recipe"]["command"]
    assert card["data"]["sha256"] == {"cifar10-images.tar.gz": DIGEST}
    assert card["data"]["n_train"] == 50000 and card["data"]["n_test"] == 10000
    assert card["data"]["limit_per_class"] is None
    results = card["results"]
    assert 0.5 < results["test_accuracy"] <= 1.0
    assert abs(results["test_accuracy_fp32"] - results["test_accuracy_fp16"]) <= 0.002
    cost = card["cost"]
    assert cost["wall_seconds"] > 0 and cost["cpu_seconds"] > 0 and cost["threads"] >= 1
    assert cost["cpu_seconds"] <= 40 * 60  # the budget: about 30 CPU-minutes
    assert card["torch_version"] and len(card["git_commit"].split("+")[0]) == 40
    assert any("corrupted_cifar10" in line for line in card["not_for"])


def test_pyproject_ships_the_weights_as_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["unspur.models"]
    assert "weights/*.safetensors" in patterns and "weights/*.json" in patterns


@pytest.mark.parametrize("module", ["checkpoint", "factory", "resnet", "restore"])
def test_each_models_module_imports_alone(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import unspur.models.{module}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------ recipe
def test_schedule_and_augmentation() -> None:
    assert lr_factor(0, 100, 0.15) == pytest.approx(0.1)
    assert lr_factor(15, 100, 0.15) == pytest.approx(1.0)
    assert lr_factor(100, 100, 0.15) == 0.0
    assert lr_factor(50, 100, 0.15) < lr_factor(20, 100, 0.15)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def _fake_cifar(root: Path, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., label % 3] = 25 * label  # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_recipe_end_to_end_on_a_cifar_shaped_fixture(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _fake_cifar(data / "cifar10")
    out = tmp_path / "out"
    lines: list[str] = []
    card = train_cifar10_backbone(
        data, out, epochs=1, command=["unspur", "pretrain", "x"], log=lines.append
    )
    assert (out / "cifar10-resnet18.safetensors").is_file()
    assert json.loads((out / "cifar10-resnet18.json").read_text()) == card
    assert card["data"]["n_train"] == 30 and card["data"]["n_test"] == 30
    assert set(card["data"]["sha256"]) == {
        f"{s}/class{c}/{i:04d}.png" for s in ("train", "test") for c in range(10) for i in range(3)
    }
    assert 0.0 <= card["results"]["test_accuracy"] <= 1.0
    assert card["cost"]["threads"] == 1 and card["recipe"]["command"] == "unspur pretrain x"
    assert any(line.startswith("epoch 1/1") for line in lines)
    # the recipe's own output loads like a user's file
    model = build_model("resnet18", 10, str(out / "cifar10-resnet18.safetensors"), **OPTIONS)
    assert model.fc.weight.shape == (10, 128)


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_recipe_cli_on_real_cifar10_with_limit(tmp_path: Path) -> None:
    from unspur.cli import main

    out = tmp_path / "out"
    argv = ["pretrain", "cifar10-resnet18", "--data-dir", str(SHARED_CIFAR.parent)]
    assert main([*argv, "--out", str(out), "--limit", "2", "--epochs", "1"]) == 0
    card = json.loads((out / "cifar10-resnet18.json").read_text())
    assert card["data"]["sha256"] == {"cifar10-images.tar.gz": DIGEST}
    assert card["data"]["n_train"] == 20 and card["data"]["limit_per_class"] == 2


def test_recipe_refuses_a_missing_data_dir(tmp_path: Path) -> None:
    from unspur.cli import main

    assert main(["pretrain", "cifar10-resnet18", "--data-dir", str(tmp_path / "no"),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip


def test_recipe_provenance_names_the_commit_of_the_code_it_depends_on():
    import re
    import subprocess

    from unspur.pretrain.provenance import cpu_seconds, git_commit

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    # A committed, unchanged file: HEAD alone; a path nobody changed stays clean too.
    assert git_commit(["src/unspur/pretrain/provenance.py"]) == head.stdout.strip() or re.fullmatch(
        r"[0-9a-f]{40}\+local-changes", git_commit(["src/unspur/pretrain/provenance.py"])
    )
    assert git_commit(["no/such/path"]) == head.stdout.strip()
    assert cpu_seconds() > 0


def test_shipped_backbone_is_refused_on_a_dataset_its_card_rules_out() -> None:
    """The CIFAR-10 backbone has seen Corrupted CIFAR-10's images and labels (card
    ``not_for``): a config that starts from it there is an error, elsewhere it is fine."""
    model = {
        "arch": "resnet18",
        "pretrained": "unspur:cifar10-resnet18",
        "options": {"small_images": True, "width": 16},
    }
    with pytest.raises(UnspurError, match="corrupted_cifar10.*seen its labels"):
        config_from_dict({"data": {"name": "corrupted_cifar10"}, "model": model})
    config = config_from_dict({"data": {"name": "synthetic"}, "model": model})
    assert config.model.pretrained == "unspur:cifar10-resnet18"
