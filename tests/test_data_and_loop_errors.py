"""User mistakes in data and training get one clear message (issue 21, sections 3 and 5).

CSV metadata as other toolkits write it (split codes 0/1/2, the file outside the image
root), label typos caught where they are read, damaged checkpoints, unreadable images
behind DataLoader workers, ``unspur data inspect`` verdicts, thread settings and wall
time summed over resumed invocations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from unspur.data import load_dataset
from unspur.errors import DataError


def write_images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i % 256, 90, 30)).save(path)


def write_csv(root: Path, rows: list[str], name: str = "metadata.csv") -> Path:
    """Images for every row plus ``root/name`` with a ``filename,y,a,split`` header."""
    write_images(root, [row.split(",")[0] for row in rows])
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("filename,y,a,split\n" + "\n".join(rows) + "\n")
    return path


FOUR_GROUPS = [
    f"img/{s}{y}{a}.png,{y},{a},{s}"
    for s in ("train", "val", "test")
    for y in (0, 1)
    for a in (0, 1)
]


# ------------------------------------------------------------------ section 5: CSV metadata
def test_csv_split_codes_0_1_2_read_as_train_val_test(tmp_path: Path) -> None:
    rows = [
        f"img/{code}{y}{a}.png,{y},{a},{code}" for code in (0, 1, 2) for y in (0, 1) for a in (0, 1)
    ]
    write_csv(tmp_path, rows)
    table = load_dataset("csv", tmp_path)
    assert table.frame["split"].value_counts().to_dict() == {"train": 4, "val": 4, "test": 4}
    assert table.frame.loc[table.frame["filename"] == "img/100.png", "split"].item() == "val"
    with pytest.raises(DataError, match=r"'3' is not one of train/val/test or the codes 0/1/2"):
        write_csv(tmp_path, rows + ["img/x.png,0,0,3"])
        load_dataset("csv", tmp_path)


def test_csv_metadata_outside_the_root_is_allowed_but_its_paths_stay_inside(
    tmp_path: Path,
) -> None:
    root = tmp_path / "images"
    write_images(root, [row.split(",")[0] for row in FOUR_GROUPS])
    outside = tmp_path / "meta" / "spuco.csv"
    outside.parent.mkdir()
    outside.write_text("filename,y,a,split\n" + "\n".join(FOUR_GROUPS) + "\n")
    for csv in (str(outside), "../meta/spuco.csv"):
        table = load_dataset("csv", root, csv=csv)
        assert len(table.frame) == 12 and table.info["csv"] == str(root / csv)
    # The image paths inside the file must still stay inside the root.
    (tmp_path / "secret.png").write_bytes(b"")
    outside.write_text(
        "filename,y,a,split\n" + "\n".join(FOUR_GROUPS + ["../secret.png,0,0,train"])
    )
    with pytest.raises(
        DataError, match=r"row 13 \(line 14\), column 'filename'.*escapes the data root"
    ):
        load_dataset("csv", root, csv=str(outside))


# ------------------------------------------------------------------ section 3: label typos
def test_label_typo_is_caught_where_it_is_read(tmp_path: Path) -> None:
    write_csv(tmp_path, FOUR_GROUPS + ["img/typo.png,5,0,train"])
    with pytest.raises(DataError) as error:
        load_dataset("csv", tmp_path)
    message = str(error.value)
    assert "row 13 (line 14), column 'y': label 5 makes 6 class ids" in message
    assert "no training row has y=2, 3, 4" in message and "fix the typo" in message


def test_class_without_training_images_is_refused(tmp_path: Path) -> None:
    rows = [r for r in FOUR_GROUPS if not r.startswith("img/train1")]
    write_csv(tmp_path, rows)
    with pytest.raises(
        DataError,
        match=r"row 5 \(line 6\), column .y.: class 1 has no training row, only 4 row\(s\)",
    ):
        load_dataset("csv", tmp_path)


def test_attribute_typo_is_caught(tmp_path: Path) -> None:
    write_csv(tmp_path, FOUR_GROUPS + ["img/typo.png,0,7,val"])
    with pytest.raises(
        DataError, match=r"column 'a': label 7 makes 8 attribute ids.*a=2, 3, 4, 5, 6"
    ):
        load_dataset("csv", tmp_path)


# ------------------------------------------------------------------ CLI runs on a CSV dataset
def csv_run_args(root: Path, out: Path, *extra: str) -> list[str]:
    """``unspur run`` on a ``write_csv`` dataset: tiny CNN, 8-pixel images, two epochs."""
    values = [
        "data.name=csv",
        f"data.root={root}",
        "data.image_size=8",
        "model.arch=small_cnn",
        "model.options.widths=[4,4]",
        "train.epochs=2",
        "train.batch_size=4",
        "train.progress=false",
        "train.augment=false",
        "train.threads=1",
        *extra,
    ]
    return ["run", "--out", str(out), *[arg for v in values for arg in ("--set", v)]]


def one_clean_paragraph(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("unspur: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_corrupt_trainer_checkpoint_says_which_file_and_how_to_restart(tmp_path: Path, capsys):
    import torch

    from unspur.cli import main

    write_csv(tmp_path / "data", FOUR_GROUPS)
    out = tmp_path / "run"
    args = csv_run_args(tmp_path / "data", out)
    assert main(args) == 0
    trainer = out / "erm" / "checkpoints" / "last" / "trainer.pt"
    good = trainer.read_bytes()
    capsys.readouterr()

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    def pickled(path: Path) -> None:
        torch.save({"epoch": Evil()}, path)

    for corrupt, reason in (
        (lambda path: path.write_bytes(b"not a checkpoint at all"), "not a tensor-only"),
        (lambda path: path.write_bytes(good[: len(good) // 2]), "truncated or corrupt"),
        # Arbitrary objects: refused by weights_only=True, never executed.
        (pickled, "torch.load(weights_only=True) refused it"),
    ):
        corrupt(trainer)
        assert main([*args, "--force"]) == 2
        message = one_clean_paragraph(capsys.readouterr().err)
        assert f"cannot resume from {trainer}" in message and reason in message
        assert "weights_only` set to `False" not in message
        assert f"delete {trainer.parent}" in message and "stage 'erm'" in message
        assert not (tmp_path / "pwned").exists()
    # The advice works: without that folder the stage trains again from its first epoch.
    import shutil

    shutil.rmtree(trainer.parent)
    assert main([*args, "--force"]) == 0


def test_unreadable_image_behind_dataloader_workers_is_one_clean_message(
    tmp_path: Path, capsys
) -> None:
    from unspur.cli import main

    write_csv(tmp_path / "data", FOUR_GROUPS)
    (tmp_path / "data" / "img" / "train01.png").write_bytes(b"not an image")
    args = csv_run_args(tmp_path / "data", tmp_path / "run", "train.num_workers=1")
    assert main(args) == 2
    err = capsys.readouterr().err
    message = one_clean_paragraph(err)
    assert "cannot decode image" in message and "train01.png" in message
    assert "data.on_bad_image=skip" in message
    assert "Original Traceback" not in err and "worker.py" not in err


# ------------------------------------------------------------------ threads and wall time
def test_threads_default_to_the_cores_this_process_may_use(monkeypatch) -> None:
    import os

    import torch

    from unspur.errors import ConfigError
    from unspur.train import loop

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        assert loop.available_cores() == 2
        assert loop.resolve_threads(None) == 2  # the affinity mask, not every core
        torch.set_num_threads(1)
        assert loop.resolve_threads(None) == 1  # never more than OMP_NUM_THREADS / torch
        assert loop.apply_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 5)
        assert loop.available_cores() == 5
        with pytest.raises(ConfigError, match=r"train.threads=0 must be a whole number >= 1"):
            loop.resolve_threads(0)
    finally:
        torch.set_num_threads(before)


def test_run_records_threads_and_sums_wall_time_over_invocations(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The first invocation is slow (sleeps) and interrupted after its first epoch; the
    resumed run's ``wall_seconds`` includes that checkpointed time."""
    import json
    import time

    from unspur.cli import main
    from unspur.train.objectives import Objective

    write_csv(tmp_path / "data", FOUR_GROUPS)
    out = tmp_path / "run"
    args = csv_run_args(tmp_path / "data", out)
    original = Objective.__call__
    calls = {"n": 0}

    def slow_then_interrupt(self, logits, y, g, index):
        calls["n"] += 1
        if calls["n"] > 1:  # one batch per epoch: the second epoch is interrupted
            raise KeyboardInterrupt
        time.sleep(2.0)
        return original(self, logits, y, g, index)

    with monkeypatch.context() as patch:
        patch.setattr(Objective, "__call__", slow_then_interrupt)
        assert main(args) == 130
    capsys.readouterr()
    started = time.perf_counter()
    assert main(args) == 0
    second = time.perf_counter() - started
    results = json.loads((out / "results.json").read_text())
    timing = json.loads((out / "erm" / "timing.json").read_text())
    assert results["threads"] == 1 and timing["threads"] == 1
    assert results["config"]["train"]["threads"] == 1
    assert timing["earlier_seconds"] >= 2.0
    assert results["wall_seconds"] >= timing["earlier_seconds"] + 0.0
    assert results["wall_seconds"] > second + 1.5  # today's code: this invocation only


# ------------------------------------------------------------------ unspur data inspect
def inspect_csv(root: Path, capsys, *extra: str) -> tuple[int, str, str]:
    from unspur.cli import main

    code = main(["data", "inspect", "--dataset", "csv", "--root", str(root), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_passes_usable_data_and_warns_with_counts(tmp_path: Path, capsys) -> None:
    rows = [r for r in FOUR_GROUPS if not r.startswith("img/train11")]  # train lacks a group
    rows = [r for r in rows if ",test" not in r]  # no test split
    write_csv(tmp_path, rows)
    code, out, err = inspect_csv(tmp_path, capsys)
    assert code == 0, err
    assert "warning: split train (3 images) has no images of 1 of 4 group(s): g3" in out
    assert "warning: no test split: no test metrics" in out
    assert "checks: usable for a run (2 warning(s))" in out


def test_inspect_fails_on_a_corrupt_image_and_a_split_missing_a_group(
    tmp_path: Path, capsys
) -> None:
    rows = [r for r in FOUR_GROUPS if not r.startswith("img/val10")]
    write_csv(tmp_path, rows)
    (tmp_path / "img" / "test01.png").write_bytes(b"not an image")
    code, out, err = inspect_csv(tmp_path, capsys)
    assert code == 2
    message = one_clean_paragraph(err)
    assert "2 problem(s)" in message
    assert "(1) 1 of 11 image(s) are missing or do not decode (img/test01.png)" in message
    assert "--on-bad-image skip" in message
    assert (
        "(2) split val (3 images) has no images of 1 of 4 group(s): g2 (class1 / attr0)" in message
    )
    # Leaving the image out is a warning, but then test lacks its group too.
    code, out, err = inspect_csv(tmp_path, capsys, "--on-bad-image", "skip")
    assert code == 2 and "warning: 1 unreadable image(s) are left out" in out
    message = one_clean_paragraph(err)
    assert "2 problem(s): (1) split val" in message and "(2) split test (3 images)" in message


def test_inspect_reports_a_label_typo_where_it_is_read(tmp_path: Path, capsys) -> None:
    write_csv(tmp_path, FOUR_GROUPS + ["img/typo.png,5,0,train"])
    code, out, err = inspect_csv(tmp_path, capsys)
    assert code == 2
    assert "label 5 makes 6 class ids" in one_clean_paragraph(err)


def test_check_table_finds_classes_without_training_images(tmp_path: Path) -> None:
    from unspur.data.checks import check_table

    write_csv(tmp_path, FOUR_GROUPS)
    table = load_dataset("csv", tmp_path, class_names="cat,dog,bird")  # no bird images
    inspection = check_table(table, [])
    assert not inspection.usable
    assert "1 class(es) have no training images: bird" in inspection.errors[0].message


# ------------------------------------------------------------------ output while training
def test_training_says_at_once_what_it_trains_then_times_each_epoch(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import sys

    from unspur.config import TrainConfig
    from unspur.data.dataset import GroupDataset
    from unspur.data.transforms import eval_transform
    from unspur.models.factory import build_model
    from unspur.train import loop

    write_csv(tmp_path / "data", FOUR_GROUPS)
    table = load_dataset("csv", tmp_path / "data")
    transform = eval_transform(8, 1.0)
    train = GroupDataset(table.split("train"), transform)
    val = GroupDataset(table.split("val"), transform)
    model = build_model("small_cnn", 2, widths=[4, 4])
    config = TrainConfig(epochs=3, batch_size=2, threads=1, augment=False, progress=True)
    monkeypatch.setattr(loop, "PROGRESS_EVERY", 0.0)  # not a terminal: a line per batch
    loop.fit(model, train, val, config, tmp_path / "stage", description="erm")
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("[erm] training on 4 images (4 groups, 2 classes), validating on 4")
    assert "3 epoch(s) of 2 batch(es) of 2; device cpu, 1 torch thread(s)" in lines[0]
    assert lines[1].startswith("[erm] epoch 1/3: loss") and "left" in lines[1]
    assert lines[3].startswith("[erm] epoch 3/3") and "left" not in lines[3]
    assert "[erm] epoch 1/3: 1/2 batches" in captured.err and "left in this epoch" in captured.err

    # On a terminal: a tqdm bar instead of the plain lines.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    loop.fit(model, train, val, config, tmp_path / "again", description="erm")
    err = capsys.readouterr().err
    assert "[erm] epoch 1/3" in err and ("it/s" in err or "s/it" in err)
    assert "batches," not in err


def test_an_empty_group_from_a_rare_label_points_at_its_row(tmp_path: Path, capsys) -> None:
    from unspur.data.table import require_nonempty_groups

    write_csv(tmp_path, FOUR_GROUPS + ["img/typo.png,1,2,val"])  # a=2: one row only
    table = load_dataset("csv", tmp_path)
    with pytest.raises(
        DataError,
        match=r"g2 \(class0 / attr2\).*A label typo\? a=2 \(attr2\) "
        r"occurs only in img/typo.png: fix those rows",
    ):
        require_nonempty_groups(table, "val")
    code, out, err = inspect_csv(tmp_path, capsys)
    assert code == 2 and "a=2 (attr2) occurs only in img/typo.png" in one_clean_paragraph(err)


# ------------------------------------------------------------------ where a user looks
def test_final_epoch_selection_and_jtt_epochs_are_documented(capsys) -> None:
    from unspur.cli import main

    assert main(["methods"]) == 0
    jtt = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("jtt"))
    assert "train.epochs sets stage 2 only" in jtt and "N + lambda_up * |E|" in jtt
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`last` — final-epoch evaluation" in readme and "train.selection=last" in readme


def test_damaged_selected_model_says_how_to_retrain_the_stage(tmp_path: Path) -> None:
    from unspur.config import TrainConfig
    from unspur.data.dataset import GroupDataset
    from unspur.data.transforms import eval_transform
    from unspur.errors import CheckpointError
    from unspur.models.factory import build_model
    from unspur.train.loop import fit

    write_csv(tmp_path / "data", FOUR_GROUPS)
    table = load_dataset("csv", tmp_path / "data")
    train = GroupDataset(table.split("train"), eval_transform(8, 1.0))
    config = TrainConfig(epochs=1, batch_size=4, threads=1, progress=False)
    stage = tmp_path / "stage"
    fit(build_model("small_cnn", 2, widths=[4, 4]), train, None, config, stage)
    (stage / "best" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match=rf"stage 'train'.*Delete {stage} to train"):
        fit(build_model("small_cnn", 2, widths=[4, 4]), train, None, config, stage)


def test_a_spuco_style_csv_on_real_images_inspects_and_trains(
    tmp_path: Path, shared_data: Path, capsys
) -> None:
    """SpuCo Animals' birds with a metadata file outside the image folder, split codes
    0/1/2 as SpuCo writes them: inspect passes and a one-epoch run trains on it."""
    import json

    from unspur.cli import main

    root = shared_data / "spuco_animals"
    rows = [
        f"{bird}{place}{i}.png,{'lw'.index(bird)},{'lw'.index(place)},{(0, 0, 1, 2)[i - 1]}"
        for bird in "lw"
        for place in "lw"
        for i in range(1, 5)
    ]
    meta = tmp_path / "birds.csv"
    meta.write_text("filename,y,a,split\n" + "\n".join(rows) + "\n")
    option = ["--option", f"csv={meta}", "--option", "class_names=landbird,waterbird"]
    assert main(["data", "inspect", "--dataset", "csv", "--root", str(root), *option]) == 0
    out = capsys.readouterr().out
    assert "total   train=8  val=4  test=4" in out and "checks: usable" in out
    args = csv_run_args(root, tmp_path / "run", f"data.options.csv={meta}", "train.epochs=1")
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["info"]["csv"] == str(meta) and results["threads"] == 1
    assert {g["n"] for g in results["metrics"]["test"]["groups"]} == {1}


def test_inspect_refuses_train_only_data_like_a_run(tmp_path: Path, capsys) -> None:
    write_csv(tmp_path, [r for r in FOUR_GROUPS if ",train" in r])
    code, out, err = inspect_csv(tmp_path, capsys)
    assert code == 2 and "warning: no val split" not in out
    assert "1 problem(s): (1) only train rows (4 images)" in one_clean_paragraph(err)
