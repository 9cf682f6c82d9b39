"""The DiffInject suite (bench/suites/diffinject.yaml): the DDPM and judge asset builders,
the DiffInject measurements on fake run folders, and the whole suite end to end on
fixture data (tiny models)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from unspur.bench import load_suite
from unspur.bench.assets import DDPM_OPTIONS, build_asset
from unspur.bench.measurements import colour_rule, measure
from unspur.bench.suite import Asset
from unspur.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY_DDPM = {"image_size": 16, "channels": [8, 16], "steps": 2, "batch_size": 4,
             "lr": 1e-3, "hshare_pairs": 4}  # fmt: skip
CMNIST = ["data.root={asset:mnist}", "data.name=colored_mnist", "data.image_size=28",
          "data.normalize=false", "data.options.conflict_ratio=0.9", "data.options.seed=100"]  # fmt: skip


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_mnist(root: Path, per_class: int = 20) -> Path:
    """Fake t10k digits: class c is a bar at column 2c (a judge can learn it)."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 4:24, 4 + 2 * c : 7 + 2 * c] = 255
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar(root: Path, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def asset(build: str, data: list[str], options: dict, seed: int = 0) -> Asset:
    return Asset("a", None, "none", "", build, data, seed, options)


def test_ddpm_asset_trains_on_the_named_data_records_it_and_is_reused(tmp_path):
    from unspur.generate.ddpm import load_ddpm

    mnist = write_mnist(tmp_path / "data" / "mnist")
    logged = []
    spec = asset("ddpm", CMNIST, {**TINY_DDPM, "no_skip_below": 1, "skip_dropout": 0.5})
    folder, record = build_asset("cm", spec, tmp_path / "w", logged.append, {"mnist": mnist})
    unet, _ = load_ddpm(folder / "ddpm")
    assert int(unet.config.sample_size) == 16 and list(unet.config.block_out_channels) == [8, 16]
    assert record["build"] == "ddpm" and record["labels"] == "none"
    assert record["data"]["split"] == "train" and record["data"]["images"] == 140
    assert record["data"]["overrides"] == CMNIST  # the reference, not this machine's path
    assert str(tmp_path) not in json.dumps(record)
    assert record["steps"]["ddpm"] == 2 and record["settings"]["no_skip_below"] == 1
    assert set(record["h_share"]["by_t"]) == {"700", "500", "300"}
    assert record["h_share"]["pairs"] == 4 and record["cost"]["cpu_seconds"] >= 0
    assert json.loads((folder / "ddpm_settings.json").read_text())["skip_dropout_p"] == 0.5
    logged.clear()
    again = build_asset("cm", spec, tmp_path / "w", logged.append, {"mnist": mnist})
    assert again == (folder, record) and not logged  # found built: not trained again
    assert "resumed_from_step" not in record["cost"]
    # Interrupted after its last checkpoint: the rebuild resumes, and its cost says that
    # the seconds are those of the steps after the checkpoint only.
    import shutil

    (folder / "asset.json").unlink()
    shutil.rmtree(folder / "ddpm")
    _, resumed = build_asset("cm", spec, tmp_path / "w", logged.append, {"mnist": mnist})
    assert resumed["cost"]["resumed_from_step"] == 2


def test_ddpm_asset_on_clean_cifar10(tmp_path):
    cifar = write_cifar(tmp_path / "cifar10")
    spec = asset(
        "ddpm",
        ["data.root={asset:cifar10}", "data.name=corrupted_cifar10"],
        {**TINY_DDPM, "images": "clean_cifar10", "max_images": 12},
    )
    _, record = build_asset("cc", spec, tmp_path / "w", print, {"cifar10": cifar})
    assert record["data"]["images"] == 12 and record["data"]["split"] == "CIFAR-10 train"
    assert sum(record["data"]["per group"].values()) == 12
    assert "clean" in record["data"]["dataset"]


def test_judge_assets_learn_their_target_and_are_loadable(tmp_path):
    from unspur.bench.measurements import _judge

    mnist = write_mnist(tmp_path / "mnist", per_class=125)
    data = [*CMNIST, "model.arch=mlp", "train.epochs=4",
            "train.optimizer=adam", "train.lr=0.001", "train.augment=false",
            "train.batch_size=32", "train.progress=false"]  # fmt: skip
    for target, names in (("y", "0"), ("a", "red")):
        spec = asset("judge", data, {"target": target})
        folder, record = build_asset(f"j{target}", spec, tmp_path / "w", print, {"mnist": mnist})
        assert record["target"] == target and record["classes"][0].startswith(names)
        assert record["labels"] == "none" and record["transform"]["image_size"] == 28
        model, transform, loaded = _judge(folder)
        assert (
            loaded == record and model(transform(Image.new("RGB", (28, 28)))[None]).shape[1] == 10
        )
        assert record["val_accuracy"] > 0.5, record  # bars and colours are easy


@pytest.mark.parametrize(
    ("build", "options", "named"),
    [
        ("ddpm", {"stepz": 1}, "'stepz'"),
        ("ddpm", {"images": "test"}, "images='test'"),
        ("judge", {"target": "g"}, "target='g'"),
        ("judge", {"epochs": 1}, "'epochs'"),
    ],
)
def test_asset_options_are_checked_when_the_suite_is_read(tmp_path, build, options, named):
    suite = yaml.safe_load((REPO / "bench/suites/diffinject.yaml").read_text())
    suite["assets"]["x"] = {"build": build, "data": ["data.name=colored_mnist"], "options": options}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=named):
        load_suite(path)


def test_ddpm_defaults_are_the_methods_own():
    from unspur.methods.diffinject import DiffInject

    d = DiffInject.defaults
    assert (DDPM_OPTIONS["lr"], DDPM_OPTIONS["batch_size"], DDPM_OPTIONS["ema"]) == (
        d["ddpm_lr"], d["ddpm_batch_size"], d["ddpm_ema"])  # fmt: skip
    assert DDPM_OPTIONS["channels"] == d["ddpm_channels"] and DDPM_OPTIONS["steps"] == 10000
    assert (DDPM_OPTIONS["p2_gamma"], DDPM_OPTIONS["p2_k"]) == (1.0, 1.0)


def test_colour_rule_reads_the_colored_mnist_palette():
    from unspur.data.readers.colored_mnist import PALETTE, colorize

    rng = np.random.default_rng(0)
    digits = np.zeros((40, 28, 28), dtype=np.uint8)
    digits[:, 6:22, 10:16] = 255
    digits[:, 6:22, 9] = 120  # an anti-aliased rim
    attrs = np.arange(40) % len(PALETTE)
    images = colorize(digits, attrs, 0.005, rng)
    assert [colour_rule(Image.fromarray(x)) for x in images] == attrs.tolist()


class _BarJudge(torch.nn.Module):
    """Reads the class from the column of the bar (the fake digits of write_mnist)."""

    def forward(self, x):
        columns = x.amax(dim=(1, 2))  # (B, W)
        c = ((columns > 0.5).float().argmax(1) - 4).div(2, rounding_mode="floor").clamp(0, 9)
        return torch.nn.functional.one_hot(c, 10).float()


def _fake_run(run: Path, rows: list[tuple[int, int, int, int, int]]) -> None:
    """A DiffInject run folder: images with a bar at the column of ``shown`` in colour
    ``colour``; manifest extras name the content's class and the style's class / colour."""
    from unspur.data.readers.colored_mnist import PALETTE
    from unspur.generate.store import GenerationRequest, SyntheticStore, generate_into_store

    requests = [
        GenerationRequest(key=f"inject-{i}", prompt=None, seed=i, y=cy, a=sa, parent="p",
                          extra={"content_y": cy, "style_y": sy, "style_a": sa,
                                 "content_index": i, "style_index": i + 1,
                                 "shown": shown, "colour": colour})
        for i, (cy, sy, sa, shown, colour) in enumerate(rows)
    ]  # fmt: skip

    def draw(batch):
        out = []
        for r in batch:
            pixels = np.zeros((28, 28, 3), dtype=np.uint8)
            c = r.extra["shown"]
            pixels[4:24, 4 + 2 * c : 7 + 2 * c] = np.rint(PALETTE[r.extra["colour"]] * 255)
            out.append(Image.fromarray(pixels))
        return out

    store = SyntheticStore(run / "diffinject_synthetic")
    generate_into_store(store, requests, draw, generator_name="fake", weights_id="fake",
                        batch_size=4, process_index=0, num_processes=1)  # fmt: skip


def test_diffinject_judged_counts_content_style_and_colour(tmp_path, monkeypatch):
    from unspur.bench import measurements
    from unspur.data.transforms import eval_transform

    # (content y, style y, style a, digit shown, colour shown)
    rows = [(1, 2, 3, 1, 3), (1, 2, 3, 2, 3), (4, 5, 6, 4, 0), (7, 8, 9, 8, 1)]
    _fake_run(tmp_path / "run", rows)
    judge = (_BarJudge(), eval_transform(28, 1.0, False), {"target": "y", "val_accuracy": 0.9})
    monkeypatch.setattr(
        measurements, "_judge", lambda folder: judge if "j" in str(folder) else None
    )
    results = {"config": {"data": {"name": "colored_mnist"}},
               "bench_assets": {"judge": "j", "ddpm": "d"}}  # fmt: skip
    got = measure(["diffinject_judged"], tmp_path / "run", results)
    assert got["synthetic judged"] == 4 and got["judge of y: val acc. (%)"] == 90.0
    assert got["content class shown"] == 50.0 and got["style class shown"] == 50.0
    assert got["style bias kept"] == 50.0 and got["bias judged by"] == "colour rule"
    assert got["content class + style bias"] == 25.0
    # no judge of y and not Colored MNIST: nothing judged but the count
    bare = {"config": {"data": {"name": "corrupted_cifar10"}}}
    assert measure(["diffinject_judged"], tmp_path / "run", bare) == {"synthetic judged": 4}
    assert measure(["diffinject_judged"], tmp_path / "erm_run", results) == {}


def test_ddpm_h_share_reads_the_assets_record(tmp_path):
    folder = tmp_path / "assets" / "cm-abc"
    (folder / "ddpm").mkdir(parents=True)
    shares = {"700": {"median": 0.4, "mean": 0.5}, "500": {"median": 0.3, "mean": 0.3}}
    (folder / "asset.json").write_text(json.dumps({"build": "ddpm", "h_share": {"by_t": shares}}))
    results = {"config": {"method": {"options": {"ddpm": str(folder / "ddpm")}}}}
    got = measure(["ddpm_h_share", "test_accuracy"], tmp_path, results)
    assert got == {"h_share t=700": 0.4, "h_share t=500": 0.3}
    assert measure(["ddpm_h_share"], tmp_path, {"config": {"method": {"options": {}}}}) == {}
    accuracy = {"metrics": {"test": {"accuracy": 0.4321}}}
    assert measure(["test_accuracy"], tmp_path, accuracy) == {"test acc. (%)": 43.21}


def test_the_diffinject_suite_parses_with_the_papers_table_1():
    suite = load_suite(REPO / "bench/suites/diffinject.yaml")
    assert suite.seeds == [0, 1, 2] and list(suite.variants) == ["erm", "lff", "diffinject"]
    assert set(suite.settings) == {
        "colored_mnist-1%", "colored_mnist-1%/50steps", "colored_mnist-1%/50steps/allskips",
        "corrupted_cifar10-1%"}  # fmt: skip
    # the CPU-scale setting differs from the faithful one only in its two step grids
    faithful, cpu = suite.settings["colored_mnist-1%"], suite.settings["colored_mnist-1%/50steps"]
    assert (cpu.config, cpu.root, cpu.uses) == (faithful.config, faithful.root, faithful.uses)
    assert set(cpu.overrides) - set(faithful.overrides) == {
        "diffinject:method.options.inv_steps=50", "diffinject:method.options.gen_steps=50"}  # fmt: skip
    assert set(faithful.overrides) <= set(cpu.overrides)
    # and its table says so (the description's "faithful defaults" is about the method)
    assert "our choice" in cpu.note and "1000" in cpu.note and not faithful.note
    assert {"diffinject_judged", "diffinject_content", "ddpm_h_share", "test_accuracy",
            "diffinject_samples"} <= set(suite.measurements)  # fmt: skip
    # the ablation: the CPU-scale setting with a DDPM that differs only in keeping every skip
    ablation = suite.settings["colored_mnist-1%/50steps/allskips"]
    assert [o.replace("cmnist_ddpm_allskips", "cmnist_ddpm") for o in ablation.overrides] == (
        cpu.overrides) and (ablation.config, ablation.root, ablation.uses) == (
        cpu.config, cpu.root, cpu.uses) and "Ablation" in ablation.note  # fmt: skip
    full, cut = suite.assets["cmnist_ddpm_allskips"], suite.assets["cmnist_ddpm"]
    assert full.data == cut.data and cut.options["no_skip_below"] == 3
    assert full.options == {**cut.options, "no_skip_below": 0}
    cm, cc = suite.assets["cmnist_ddpm"], suite.assets["ccifar_ddpm"]
    assert cm.build == cc.build == "ddpm" and cc.options["images"] == "clean_cifar10"
    # the DDPM never sees the biased split: unbiased recolouring, another colouring seed
    assert "data.options.conflict_ratio=0.9" in cm.data and "data.options.seed=100" in cm.data
    assert suite.assets["ccifar_corruption_judge"].options["target"] == "a"
    for name in suite.settings:  # judges and DDPMs add no group label to the pipeline
        assert suite.asset_supervision(name, "diffinject") == 0
    # DiffInject's Table 1 at 1%: Colored MNIST, then Corrupted CIFAR-10
    notes = " ".join(suite.notes.split())
    for method, cmnist, ccifar in [("Vanilla", 32.59, 23.62), ("LfF", 74.23, 33.57),
                                   ("DisEnt", 78.89, 36.49), ("LfF + BE", 81.17, 34.77),
                                   ("A^2", 83.92, 27.54), ("AmpliBias", 67.79, 45.95),
                                   ("DiffInject", 85.58, 28.24)]:  # fmt: skip
        assert f"{method} {cmnist}" in notes and f"{method} {ccifar}" in notes
    assert "Table 1" in notes


def test_the_suite_runs_end_to_end_on_fixture_data(tmp_path, capsys):
    """One seed of vanilla and DiffInject on fixture digits with a suite-built DDPM and
    judge: the table carries the judged synthetic images, h_share and the assets."""
    from unspur.cli import main

    write_mnist(tmp_path / "data" / "mnist", per_class=125)
    suite = yaml.safe_load((REPO / "bench/suites/diffinject.yaml").read_text())
    di = [f"method.options.{k}={v}" for k, v in
          {"biased_epochs": 1, "top_k": 2, "synthetic_ratio": 0.05, "inv_steps": 4,
           "gen_steps": 4, "replace_steps": 4}.items()]  # fmt: skip
    suite["set"] = ["train.epochs=1", "train.progress=false"]
    suite["settings"] = {"colored_mnist-1%": suite["settings"]["colored_mnist-1%"]}
    (tmp_path / "configs").mkdir()  # a suite's configs are read from its repository
    config = "configs/colored_mnist_diffinject.yaml"
    (tmp_path / config).write_text((REPO / config).read_text())
    suite["methods"] = {"erm": None, "diffinject": {"set": di}}
    suite["assets"]["cmnist_ddpm"]["options"] = TINY_DDPM
    judge = suite["assets"]["cmnist_digit_judge"]
    judge["data"] = [o for o in judge["data"] if not o.startswith(("train.epochs", "model."))]
    judge["data"] += ["train.epochs=3", "model.arch=mlp", "train.progress=false"]
    path = tmp_path / "bench" / "suites" / "diffinject.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", str(path), "--data-dir", str(tmp_path / "data"), "--out", str(out),
            "--work", str(work), "--seeds", "0"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = list(__import__("csv").DictReader((out / "colored_mnist-1_.csv").open()))
    di_row = next(r for r in rows if r["method"] == "diffinject")
    assert float(di_row["synthetic judged"]) == 45  # int(0.05 * 900)
    assert 0 <= float(di_row["content class shown"]) <= 100 and di_row["h_share t=500"] != "-"
    assert di_row["supervision (pipeline)"] == "x"
    md = (out / "colored_mnist-1_.md").read_text()
    assert "`cmnist_ddpm`: ddpm built by this suite" in md and "Table 1" in md
    assert "cmnist_digit_judge" in md and str(tmp_path) not in md


def test_diffinject_content_and_sample_grid(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, [(1, 2, 3, 1, 3), (4, 5, 6, 4, 0)])
    record = {"n_synthetic": 2, "content_against_true_groups": {"precision": 0.25}}
    (run / "diffinject_content.json").write_text(json.dumps(record))
    mnist = write_mnist(tmp_path / "mnist")
    config = {"data": {"name": "colored_mnist", "root": str(mnist), "image_size": 28}}
    got = measure(["diffinject_content", "diffinject_samples"], run, {"config": config})
    assert got["top-K truly conflicting (precision)"] == 0.25 and got["synthetic planned"] == 2
    grid = run / "diffinject_samples.png"
    assert str(got["samples (content / style / injected)"]) == grid.name
    with Image.open(grid) as image:
        assert image.size == (2 * 32 * 2, 3 * 32 * 2)
    assert measure(["diffinject_content", "diffinject_samples"], tmp_path, {"config": config}) == {}
