"""Models: torchvision-compatible ResNets, small models, HF backbones, checkpoint IO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from unspur.errors import CheckpointError, ConfigError
from unspur.models import (
    HFBackbone,
    ResNet,
    available_architectures,
    build_model,
    load_checkpoint,
    load_imagenet_weights,
    load_state,
    read_checkpoint_meta,
    read_state_dict,
    save_checkpoint,
    save_state,
)

# ----------------------------------------------------------------- torchvision spec
# torchvision.models.resnet, written out independently of unspur's implementation:
# stem conv1/bn1, four stages of blocks, downsample = Sequential(conv1x1, BN) on the
# first block of a stage when stride != 1 or channels change, then fc.
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
TV_LAYOUT = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


def torchvision_keys(depth: int) -> list[str]:
    kind, blocks = TV_LAYOUT[depth]
    n_conv = 2 if kind == "basic" else 3
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in BN_KEYS]
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            for i in range(1, n_conv + 1):
                keys.append(f"{p}.conv{i}.weight")
                keys += [f"{p}.bn{i}.{k}" for k in BN_KEYS]
            # basic: only stages 2-4 change shape; bottleneck: stage 1 too (64 -> 256).
            if b == 0 and (stage > 1 or kind == "bottleneck"):
                keys.append(f"{p}.downsample.0.weight")
                keys += [f"{p}.downsample.1.{k}" for k in BN_KEYS]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def resnet50() -> ResNet:
    """One ResNet-50, built once for the whole module (it is the slow one)."""
    torch.manual_seed(0)
    return build_model("resnet50", 1000)  # type: ignore[return-value]


@pytest.fixture
def resnet18() -> ResNet:
    torch.manual_seed(0)
    return build_model("resnet18", 1000).eval()  # type: ignore[return-value]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------- ResNets
def test_resnet18_matches_torchvision_keys_and_params(resnet18: ResNet) -> None:
    sd = resnet18.state_dict()
    assert list(sd) == torchvision_keys(18)
    assert len(sd) == 122
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == 102
    assert n_params(resnet18) == 11_689_512
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["layer3.0.downsample.0.weight"].shape) == (256, 128, 1, 1)
    assert tuple(sd["layer4.1.bn2.running_var"].shape) == (512,)
    assert "layer1.0.downsample.0.weight" not in sd
    assert tuple(sd["fc.weight"].shape) == (1000, 512)


def test_resnet50_matches_torchvision_keys_and_params(resnet50: ResNet) -> None:
    sd = resnet50.state_dict()
    assert list(sd) == torchvision_keys(50)
    assert len(sd) == 320  # 267 without the 53 num_batches_tracked counters
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == 267
    assert n_params(resnet50) == 25_557_032
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer3.0.downsample.1.weight"].shape) == (1024,)
    assert tuple(sd["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    # v1.5: the stride sits on the 3x3 conv of the first bottleneck of a stage.
    assert resnet50.layer2[0].conv2.stride == (2, 2)
    assert resnet50.layer2[0].conv1.stride == (1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)


def test_resnet50_forward_and_split(resnet50: ResNet) -> None:
    model = resnet50.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (1, 2048) and model.feature_dim == 2048
        assert torch.allclose(model(x), model.head(feats))
    assert model.head is model.fc
    assert model.cam_layer is model.layer4


def test_resnet18_split_and_small_stem(resnet18: ResNet) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert resnet18(x).shape == (2, 1000)
        assert torch.equal(resnet18(x), resnet18.fc(resnet18.features(x)))
    small = build_model("resnet18", 10, small_images=True, in_channels=1)
    assert isinstance(small.maxpool, nn.Identity)
    assert tuple(small.state_dict()["conv1.weight"].shape) == (64, 1, 3, 3)
    assert small.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert small.spec == {
        "arch": "resnet18",
        "n_classes": 10,
        "options": {"small_images": True, "in_channels": 1},
    }


def test_head_reset_and_freeze(resnet18: ResNet) -> None:
    old = resnet18.fc
    head = resnet18.reset_head(3)
    assert resnet18.fc is head and head is not old and resnet18.n_classes == 3
    assert "fc.weight" in resnet18.state_dict() and "head.weight" not in resnet18.state_dict()
    resnet18.freeze_backbone()
    resnet18.train()
    assert resnet18.fc.training and not resnet18.bn1.training and not resnet18.layer4.training
    assert all(not p.requires_grad for p in resnet18.backbone_parameters())
    assert all(p.requires_grad for p in resnet18.head_parameters())
    trainable = [p for p in resnet18.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 512 * 3 + 3
    before = resnet18.bn1.running_mean.clone()
    resnet18(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, resnet18.bn1.running_mean)  # frozen BN statistics
    resnet18.freeze_backbone(False)
    resnet18.train()
    assert resnet18.bn1.training and all(p.requires_grad for p in resnet18.parameters())


# ------------------------------------------------------------- ImageNet weights
def test_load_imagenet_weights_pth_with_1000_classes(tmp_path: Path, resnet18: ResNet) -> None:
    file = tmp_path / "resnet18.pth"
    torch.save(resnet18.state_dict(), file)
    torch.manual_seed(1)
    fresh = build_model("resnet18", 1000).eval()
    report = load_imagenet_weights(fresh, file)  # type: ignore[arg-type]
    assert report.head_loaded
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), resnet18(x))
    # The same through build_model(pretrained=...).
    again = build_model("resnet18", 1000, pretrained=str(file)).eval()
    assert again.pretrained == str(file)
    with torch.no_grad():
        assert torch.equal(again(x), resnet18(x))


def test_load_imagenet_weights_safetensors_replaces_head(tmp_path: Path, resnet18: ResNet) -> None:
    file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18.state_dict().items()}, str(file))
    model = build_model("resnet18", 2, pretrained=str(file)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.features(x), resnet18.features(x))
        assert model(x).shape == (1, 2)
    report = load_imagenet_weights(model, file)  # type: ignore[arg-type]
    assert not report.head_loaded and "2-class head" in report.message


def test_imagenet_weights_tolerate_missing_bn_counters_and_wrappers(
    tmp_path: Path, resnet18: ResNet
) -> None:
    # Old torchvision files have no num_batches_tracked; DataParallel adds "module.".
    state = {
        f"module.{k}": v
        for k, v in resnet18.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    file = tmp_path / "old.pth"
    torch.save({"state_dict": state, "epoch": 90}, file)
    assert set(read_state_dict(file)) == {k[len("module.") :] for k in state}
    model = build_model("resnet18", 1000, pretrained=str(file)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), resnet18(x))


def test_imagenet_weights_strict_errors(tmp_path: Path, resnet18: ResNet) -> None:
    sd = resnet18.state_dict()
    missing = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: .*layer4\.1\.bn1\.bias"):
        build_model("resnet18", 2, pretrained=str(tmp_path / "missing.pth"))

    extra = dict(sd, **{"layer5.0.conv1.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        build_model("resnet18", 2, pretrained=str(tmp_path / "extra.pth"))

    torch.save(sd, tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"conv1\.weight .*small_images"):
        build_model("resnet18", 2, pretrained=str(tmp_path / "r18.pth"), small_images=True)
    with pytest.raises(CheckpointError, match="missing keys"):
        build_model("resnet50", 2, pretrained=str(tmp_path / "r18.pth"))

    with pytest.raises(CheckpointError, match="not found"):
        build_model("resnet18", 2, pretrained=str(tmp_path / "nope.pth"))

    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pth")  # a whole module, not a state dict
    with pytest.raises(CheckpointError, match="weights_only"):
        build_model("resnet18", 2, pretrained=str(tmp_path / "pickled.pth"))

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        build_model("resnet18", 2, pretrained=str(tmp_path / "junk.safetensors"))


# ------------------------------------------------------------------ small models
def test_small_cnn_and_mlp() -> None:
    cnn = build_model("small_cnn", 10, in_channels=3, widths=[8, 16, 32]).eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert cnn(x).shape == (4, 10) and cnn.features(x).shape == (4, 32)
        assert torch.equal(cnn(x), cnn.head(cnn.features(x)))
    assert cnn.cam_layer is cnn.body.block2

    mlp = build_model("mlp", 10).eval()  # LfF Colored MNIST: 2352 -> 100 -> 100 -> 100 -> 10
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2352, 100),
        (100, 100),
        (100, 100),
        (100, 10),
    ]
    with torch.no_grad():
        assert mlp(x).shape == (4, 10) and mlp.features(x).shape == (4, 100)
    with pytest.raises(ConfigError, match="in_features=3072"):
        mlp(torch.randn(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="no convolutional"):
        _ = mlp.cam_layer


def test_factory_errors() -> None:
    assert {"resnet18", "resnet50", "small_cnn", "mlp", "hf"} <= set(available_architectures())
    with pytest.raises(ConfigError, match="unknown architecture 'vgg16'"):
        build_model("vgg16", 2)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['width'\]"):
        build_model("small_cnn", 2, width=3)
    with pytest.raises(ConfigError, match="n_classes"):
        build_model("mlp", 0)
    with pytest.raises(ConfigError, match="hf needs a model"):
        build_model("hf", 2)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    ("arch", "options", "shape"),
    [
        ("resnet18", {"small_images": True}, (2, 3, 32, 32)),
        ("small_cnn", {"widths": [8, 16]}, (2, 3, 28, 28)),
        ("mlp", {"in_features": 3 * 8 * 8, "hidden": [16, 16]}, (2, 3, 8, 8)),
    ],
)
def test_checkpoint_round_trip(
    tmp_path: Path, arch: str, options: dict, shape: tuple[int, ...]
) -> None:
    model = build_model(arch, 3, **options)
    model.train()
    model(torch.randn(*shape))  # move BN statistics away from their initial values
    model.eval()
    out = save_checkpoint(model, tmp_path / "ckpt", config={"lr": 0.1}, extra={"epoch": 3})
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    meta = read_checkpoint_meta(out)
    assert meta["arch"] == arch and meta["n_classes"] == 3 and meta["extra"] == {"epoch": 3}
    assert meta["config"] == {"lr": 0.1}
    loaded = load_checkpoint(out)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_strict_and_integrity_errors(tmp_path: Path) -> None:
    model = build_model("small_cnn", 2, widths=[4, 8])
    ckpt = save_checkpoint(model, tmp_path / "c")
    state = load_state(ckpt / "model.safetensors")

    # A stray tensor: unexpected key, named along with the file.
    save_state(ckpt / "model.safetensors", {**state, "body.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*unexpected keys: body\.extra"):
        load_checkpoint(ckpt, verify=False)

    # A missing tensor.
    save_state(ckpt / "model.safetensors", {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys: head\.bias"):
        load_checkpoint(ckpt, verify=False)

    # model.json that describes another shape.
    save_state(ckpt / "model.safetensors", state)
    meta = json.loads((ckpt / "model.json").read_text())
    meta["n_classes"] = 5
    (ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"shape mismatch: head\.bias"):
        load_checkpoint(ckpt, verify=False)

    (ckpt / "model.json").unlink()
    with pytest.raises(CheckpointError, match=r"model\.json is missing"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")


def test_atomic_save_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("mlp", 2, in_features=12, hidden=[4])
    ckpt = save_checkpoint(model, tmp_path / "c")
    save_checkpoint(model, ckpt)  # overwrite in place
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.json", "model.safetensors"]
    good = (ckpt / "model.safetensors").read_bytes()

    import unspur.models.checkpoint as ck

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_model("mlp", 2, in_features=12, hidden=[4]), ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.json", "model.safetensors"]
    assert (ckpt / "model.safetensors").read_bytes() == good
    assert isinstance(load_checkpoint(ckpt), nn.Module)

    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(model, tmp_path / "d", config={"bad": object()})
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_save_state_round_trip_and_shared_tensors(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    file = save_state(
        tmp_path / "t.safetensors", {"a": base, "b": base[:3], "c": base.view(2, 3).t()}
    )
    back = load_state(file)
    assert torch.equal(back["a"], base) and torch.equal(back["b"], base[:3])
    assert torch.equal(back["c"], base.view(2, 3).t())
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


# --------------------------------------------------------------- transformers
def _tiny_vit_dir(tmp_path: Path, with_classifier: bool = False) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    model = ViTForImageClassification(config) if with_classifier else ViTModel(config)
    out = tmp_path / ("vit_cls" if with_classifier else "vit")
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    )
    return out


def test_hf_vit_round_trip(tmp_path: Path) -> None:
    directory = _tiny_vit_dir(tmp_path)
    model = build_model(f"hf:{directory}", 3).eval()
    assert isinstance(model, HFBackbone)
    assert model.feature_dim == 32 and model.options["pooling"] == "auto"
    assert model.image_mean == [0.5, 0.5, 0.5]
    assert model.cam_layer_name == "backbone.layers.0"  # transformers 5 layout
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (2, 32)
        assert torch.allclose(feats, model.backbone(pixel_values=x).pooler_output)
        assert torch.equal(model(x), model.head(feats))

    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    meta = read_checkpoint_meta(ckpt)
    assert meta["pretrained"] == str(directory) and meta["options"]["config"]["model_type"] == "vit"
    loaded = load_checkpoint(ckpt)  # rebuilt from the stored config: no hub, no directory
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_hf_missing_pooler_falls_back_to_cls(tmp_path: Path) -> None:
    directory = _tiny_vit_dir(tmp_path, with_classifier=True)
    model = build_model("hf", 2, pretrained=str(directory)).eval()
    assert model.options["pooling"] == "cls"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hidden = model.backbone(pixel_values=x).last_hidden_state
        assert torch.equal(model.features(x), hidden[:, 0])


def test_hf_resnet_pooler_is_flattened(tmp_path: Path) -> None:
    from transformers import ResNetConfig

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = build_model("hf", 4, config=config.to_dict()).eval()
    with torch.no_grad():
        assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    assert model.feature_dim == 16 and model.cam_layer_name == "backbone.encoder.stages.1"
    model.backbone.save_pretrained(tmp_path / "hfres")
    again = build_model(f"hf:{tmp_path / 'hfres'}", 4).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(again.features(x), model.features(x))


def test_hf_clip_keeps_vision_tower() -> None:
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "vocab_size": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    model = build_model("hf", 2, config=config.to_dict()).eval()
    assert model.options["config"]["model_type"] == "clip_vision_model"
    assert not any(k.startswith("backbone.text_model") for k in model.state_dict())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_hf_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model directory not found"):
        build_model(f"hf:{tmp_path / 'missing'}", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        build_model(f"hf:{tmp_path / 'empty'}", 2)
    # HF_HUB_OFFLINE=1 (conftest): a hub id that is not cached fails fast and clearly.
    with pytest.raises(CheckpointError, match="local directory"):
        build_model("hf:unspur-test/not-a-model", 2)
    with pytest.raises(ConfigError, match="either pretrained"):
        build_model("hf", 2, pretrained="x", config={"model_type": "vit"})
