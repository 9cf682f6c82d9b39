"""`unspur bench`: suite files, resumable runs with exact invalidation, measurements,
provenance, and no absolute machine path in anything committed under bench/ or configs/."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import helpers
import pytest
import yaml

from unspur.bench import load_suite
from unspur.bench.measurements import MEASUREMENTS, get_measurement, measure, register
from unspur.bench.provenance import machine_paths
from unspur.cli import main
from unspur.compare import plan
from unspur.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEBUG = [o for o in helpers.DEBUG if not o.startswith("train.epochs")] + ["train.epochs=1"]


def write_suite(path: Path, methods: dict, **extra) -> Path:
    suite = {
        "description": "test suite",
        "seeds": [0, 1],
        "set": DEBUG,
        "settings": {"tiny": {"set": ["data.options.bias=0.9"]}},
        "methods": methods,
        "measurements": ["timing"],
        **extra,
    }
    path.write_text(yaml.safe_dump(suite, allow_unicode=True, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seedz": [0]}, "'seedz'"),
        ({"methods": {"ermm": None}}, "'ermm'"),
        ({"methods": {"mac_x": {"method": "macc"}}}, "'macc'"),
        ({"methods": {"mac_x": {"method": "mac", "sett": []}}}, "methods.mac_x.'sett'"),
        ({"measurements": ["timingg"]}, "'timingg'"),
        ({"settings": {"a": {"root": "mnist"}}}, "'mnist'"),
        ({"settings": {"a": {"sett": []}}}, "settings.a.'sett'"),
        ({"methods": {"x": {"method": "erm", "set": ["method.name=jtt"]}}}, "method.name"),
        ({"assets": {"g": {"path": "/abs/g"}}}, "assets.g.path"),
        ({"assets": {"g": {"build": "domain_modle", "data": ["data.name=synthetic"]}}}, "modle"),
        (
            {"assets": {"g": {"build": "domain_model", "data": ["a=1"], "options": {"unet_s": 1}}}},
            "'unet_s'",
        ),
        ({"assets": {"g": {"build": "domain_model"}}}, "assets.g.data"),
        ({"methods": {"x": {"method": "usb", "set": ["m.o.generator={asset:gne}"]}}}, "gne"),
        ({"settings": {"a": {"set": ["groupdrop:method.options.eta=1"]}}}, "'groupdrop'"),
        ({"settings": {"a": {"methods": ["erm", "groupdrop"]}}}, "'groupdrop'"),
        ({"settings": {"a": {"methods": "erm"}}}, "settings.a.methods"),
        ({"methods": ["erm", "jtt"], "settings": {"a": {"methods": ["jtt"]}}}, "leaves out erm"),
        (
            {
                "methods": ["erm", "jtt"],
                "settings": {"a": {"methods": ["erm"], "set": ["jtt:method.options.upweight=5"]}},
            },
            "settings.a.methods leaves out",
        ),  # fmt: skip
    ],
)
def test_suite_errors_name_the_key(tmp_path, change, named):
    path = write_suite(tmp_path / "s.yaml", {"erm": None})
    values = yaml.safe_load(path.read_text())
    values.update(change)
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("'", "'")) as info:
        load_suite(path)
    assert str(path) in str(info.value)


def test_a_bad_override_fails_before_anything_trains_and_the_cli_exits_2(tmp_path, capsys):
    path = write_suite(
        tmp_path / "s.yaml", {"erm": None, "jtt_x": {"method": "jtt", "set": ["train.lrr=1"]}}
    )
    work = tmp_path / "work"
    argv = ["bench", str(path), "--out", str(tmp_path / "out"), "--work", str(work)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "jtt_x" in err and "tiny" in err
    assert not work.exists() and not (tmp_path / "out").exists()


def test_check_reads_each_settings_data_and_trains_nothing(tmp_path, capsys):
    path = write_suite(tmp_path / "s.yaml", {"erm": None, "groupdro": None})
    argv = ["bench", str(path), "--check", "--work", str(tmp_path / "w")]
    assert main(argv) == 0 and "every config is valid" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()
    values = yaml.safe_load(path.read_text())
    # a valid config whose data cannot be read: only reading the data finds it
    values["settings"]["tiny"]["set"] += ["data.name=waterbirds", f"data.root={tmp_path / 'no'}"]
    path.write_text(yaml.safe_dump(values))
    assert main([*argv, "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "setting 'tiny'" in err and "'waterbirds'" in err  # the reader's own message


def test_a_setting_runs_only_the_methods_it_lists(tmp_path, capsys):
    """`settings.X.methods`: a subset of the suite's variants for one setting (e.g. a
    learning-rate search only where it is asked); the others run every variant."""
    path = write_suite(tmp_path / "s.yaml", {"erm": None, "groupdro": None})
    values = yaml.safe_load(path.read_text())
    values["settings"]["small"] = {"set": ["data.options.bias=0.8"], "methods": ["erm"]}
    values["seeds"] = [0]
    path.write_text(yaml.safe_dump(values))
    suite = load_suite(path)
    assert suite.labels_of("tiny") == ["erm", "groupdro"] and suite.labels_of("small") == ["erm"]
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["bench", str(path), "--check", "--work", str(work)]) == 0
    assert "2 setting(s), 3 run(s) over 1 seed(s)" in capsys.readouterr().out
    assert main(["bench", str(path), "--out", str(out), "--work", str(work)]) == 0
    assert sorted(p.parent.name for p in (work / "small").glob("*/seed0-*")) == ["erm"]
    assert [r["method"] for r in csv.DictReader((out / "small.csv").open())] == ["erm"]
    assert "`groupdro`" not in (out / "small.md").read_text()  # not among its methods
    assert [r["method"] for r in csv.DictReader((out / "tiny.csv").open())] == ["erm", "groupdro"]


def test_plan_runs_variants_in_their_own_fingerprinted_directories(tmp_path):
    variants = {"dfr_b": ("dfr_val", ["method.options.num_retrains=2"])}
    runs = plan({}, ["dfr_b"], [0], [], tmp_path, variants, True)
    (erm, _, erm_config, erm_dir), (label, _, config, run_dir) = runs
    assert (erm, label) == ("erm", "dfr_b")  # ERM first: the variant starts from it
    assert config.method.name == "dfr_val" and config.method.options == {"num_retrains": 2}
    assert run_dir.parent.name == "dfr_b" and run_dir.name.startswith("seed0-")
    assert config.method.reference == str(erm_dir / "model")
    again = plan({}, ["dfr_b"], [0], [], tmp_path, variants, True)
    assert [r[3] for r in again] == [erm_dir, run_dir]  # same config, same directory


def _stamps(work: Path) -> dict[str, int]:
    return {
        str(p.parent.relative_to(work)): p.stat().st_mtime_ns for p in work.glob("*/*/results.json")
    }


def test_bench_writes_tables_resumes_and_reruns_exactly_what_changed(tmp_path, capsys):
    methods = {"erm": None, "groupdro": None, "dfr_val": None}
    (tmp_path / "suites").mkdir()
    path = write_suite(tmp_path / "suites" / "mini.yaml", methods)
    out, work = tmp_path / "results" / "mini", tmp_path / "work"
    argv = ["bench", str(path), "--work", str(work), "--threads", "1"]
    assert main(argv) == 0
    assert "table:" in capsys.readouterr().out
    md = (out / "tiny.md").read_text()
    # provenance: the command from a fresh clone (relative), commit, libraries, threads,
    # wall and CPU time, machine
    assert "`unspur bench mini.yaml --data-dir ../shared/data --threads 1`" in md
    for field in ("- commit:", "torch ", "- threads: ", "run CPU time", "- machine: ", "cores"):
        assert field in md
    assert "Seeds: 2, fewer than 5; the suite gives no reason." in md
    record = json.loads((out / "provenance.json").read_text())
    assert {"command", "git", "versions", "threads", "cost", "machine"} <= set(record)
    assert record["cost"]["runs"] == 6 and record["cost"]["trained by this invocation"] == 6
    assert not machine_paths(md) and not machine_paths((out / "tiny_runs.csv").read_text())
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert [r["method"] for r in rows] == ["erm", "groupdro", "dfr_val"]
    assert [r["supervision (pipeline)"] for r in rows] == ["✓", "✓✓", "✓"]
    assert all(r["n"] == "2" and "±" in r["wall s"] for r in rows)
    assert rows[2]["worst-group vs ERM (paired, 95% CI)"].count("[") == 1
    runs = list(csv.DictReader((out / "tiny_runs.csv").open()))
    assert len(runs) == 6 and all(float(r["CPU s"]) > 0 for r in runs)
    first = _stamps(work / "tiny")
    assert len(first) == 6

    # Unchanged: nothing trains again.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 6
    assert _stamps(work / "tiny") == first
    assert (
        json.loads((out / "provenance.json").read_text())["cost"]["trained by this invocation"] == 0
    )

    # A changed option of one method reruns that method only.
    methods["groupdro"] = {"set": ["method.options.eta=0.05"]}
    write_suite(path, methods)
    assert main(argv) == 0
    now = _stamps(work / "tiny")
    new = sorted(set(now) - set(first))
    assert [k.split("/")[0] for k in new] == ["groupdro", "groupdro"]
    assert all(now[k] == first[k] for k in first)

    # A changed ERM reruns ERM and the method that reuses it (DFR), not GroupDRO.
    methods["erm"] = {"set": ["train.lr=0.02"]}
    write_suite(path, methods)
    assert main(argv) == 0
    latest = _stamps(work / "tiny")
    assert sorted({k.split("/")[0] for k in set(latest) - set(now)}) == ["dfr_val", "erm"]


def test_measurement_registry(tmp_path):
    assert {"timing", "mac_mask_quality", "mac_search", "head_epoch_cost", "dbb_pruning"} <= set(
        MEASUREMENTS
    )
    with pytest.raises(ConfigError, match="'timing'"):
        get_measurement("timng")

    @register("test_constant")
    def constant(run_dir, results):
        return {"constant": 3.0, "seed seen": results["seed"]}

    try:
        with pytest.raises(ValueError, match="twice"):
            register("test_constant")(constant)
        run = tmp_path / "run"
        (run / "mac").mkdir(parents=True)
        (run / "cost.json").write_text(json.dumps({"cpu_seconds": 2.5, "wall_seconds": 3.0}))
        (run / "mac" / "mask_quality.csv").write_text(
            "group,name,n,saliency_fg,saliency_bg,mask_fg,mask_bg\n"
            "0,a,3,0.9,0.1,0.8,0.2\n-1,all,6,0.7,0.3,0.6,0.4\n"
        )
        (run / "mac" / "search.json").write_text(json.dumps({"alpha": 1.0, "beta": 4.0}))
        (run / "dbb").mkdir()
        classes = [
            {"generated": 10, "pass_psi": 6, "pass_rho": 9, "kept_paper_rule": 5, "used": 5},
            {"generated": 8, "pass_psi": 8, "pass_rho": 7, "kept_paper_rule": 7, "used": 8},
        ]
        (run / "dbb" / "statistics.json").write_text(json.dumps({"classes": classes}))
        results = {"seed": 7, "wall_seconds": 3.5, "stages": []}
        (run / "ffr").mkdir()
        (run / "ffr" / "probe.json").write_text(json.dumps({"mean_accuracy": 0.9, "groups": []}))
        assert measure(["bg_probe"], run, results) == {"real-vs-synthetic probe": 0.9}
        pruning = measure(["dbb_pruning"], run, results)
        assert pruning == {
            "generated": 18,
            "pass psi": 14,
            "pass rho": 16,
            "kept (paper)": 12,
            "used": 13,
        }
        (run / "dbb" / "retrain_search.json").write_text(json.dumps({"chosen_lr": 1e-4}))
        assert measure(["dbb_pruning"], run, results)["retrain lr (val)"] == "0.0001"
        columns = measure(
            ["timing", "mac_mask_quality", "mac_search", "test_constant"], run, results
        )
        assert columns["wall s"] == 3.5 and columns["CPU s"] == 2.5
        assert (columns["mask_fg"], columns["mask_bg"]) == (0.6, 0.4)  # the "all" row
        assert (columns["alpha"], columns["beta"]) == ("1", "4")
        assert (columns["constant"], columns["seed seen"]) == (3.0, 7)
        assert measure(["mac_mask_quality"], tmp_path, results) == {}  # not a MaC run
    finally:
        MEASUREMENTS.pop("test_constant")


def test_oracle_inputs_are_marked(tmp_path):
    path = write_suite(
        tmp_path / "s.yaml",
        {
            "erm": None,
            "mac_gt": {"method": "mac", "set": ["method.options.saliency=ground_truth"]},
            "mac_named": {"method": "mac", "oracle": "hand-drawn masks"},
        },
    )
    from unspur.bench.suite import oracle_mark

    suite = load_suite(path)
    configs = {
        label: config
        for label, _, config, _ in plan(
            {}, suite.labels, [0], [], tmp_path, suite.compare_variants()
        )
    }
    assert oracle_mark(suite.variants["erm"], configs["erm"]) == ""
    assert oracle_mark(suite.variants["mac_gt"], configs["mac_gt"]) == "exact object masks"
    assert oracle_mark(suite.variants["mac_named"], configs["mac_named"]) == "hand-drawn masks"
    # DBB inpainting inside the dataset's exact object masks (the synthetic configs)
    from types import SimpleNamespace

    dbb = SimpleNamespace(method=SimpleNamespace(name="dbb", options={"masker": "ground_truth"}))
    assert oracle_mark(suite.variants["erm"], dbb) == "exact object masks"


def test_pipeline_supervision_counts_what_the_assets_saw(tmp_path):
    """A generator trained with group captions makes the whole pipeline ✓✓, whatever the
    method's own supervision."""
    from unspur.bench.suite import pipeline_symbol

    path = write_suite(
        tmp_path / "s.yaml",
        {"erm": None},
        assets={
            "gen": {"path": "gen", "labels": "train_groups", "what": "captions name the bias"},
            "digits": {"path": "digits"},
        },
        settings={"with_gen": {"uses": ["gen"]}, "plain": {"root": "digits"}},
    )
    suite = load_suite(path)
    assert suite.asset_supervision("with_gen") == 2 and suite.asset_supervision("plain") == 0
    assert pipeline_symbol("x", 2) == "✓✓" and pipeline_symbol("✓", 0) == "✓"
    assert pipeline_symbol("✓✓", 1) == "✓✓"


def test_a_setting_generator_marks_only_the_methods_that_receive_it(tmp_path):
    """A setting's unprefixed ``method.options`` reach only the method its config names
    (compare's rule), a ``LABEL:`` override only that variant: ERM beside DBB with a
    group-captioned generator stays at its own supervision."""
    (tmp_path / "bench" / "suites").mkdir(parents=True)
    (tmp_path / "dbb.yaml").write_text("method:\n  name: dbb\n")
    path = write_suite(
        tmp_path / "bench" / "suites" / "s.yaml",
        {"erm": None, "dbb": None, "jtt": None, "asb": None},
        assets={
            "gen": {"path": "gen", "labels": "train_groups", "what": "captions"},
            "gen2": {"path": "gen2", "labels": "train_groups", "what": "captions"},
        },
        settings={
            "s": {
                "config": "dbb.yaml",
                "set": [
                    "method.options.generator={asset:gen}",
                    "asb:method.options.generator={asset:gen2}",
                    "data.options.bias=0.9",
                ],
            }
        },
    )
    suite = load_suite(path)
    assert suite.base_method("s") == "dbb"
    assert suite.assets_of("s", "dbb") == ["gen"]
    assert suite.assets_of("s", "asb") == ["gen2"]
    assert suite.assets_of("s", "erm") == [] and suite.asset_supervision("s", "jtt") == 0
    assert suite.asset_supervision("s", "dbb") == 2 and suite.asset_supervision("s") == 2
    assert sorted(suite.assets_of("s")) == ["gen", "gen2"]


def test_a_generator_asset_is_built_once_recorded_and_invalidates_its_runs(tmp_path, capsys):
    """A suite-built domain model: its provenance (data, split, images, labels seen, seed,
    steps, cost) in the table, reused on a rerun, and a changed asset reruns the runs that
    use it (not ERM)."""
    from unspur.methods import get_method

    usb = get_method("usb").debug_options
    tiny = dict(usb["domain"])
    debug = [f"method.options.{k}={v}" for k, v in usb.items() if k != "domain"]
    data = [o for o in DEBUG if o.startswith("data.")] + ["data.options.seed=5"]
    methods = {
        "erm": None,
        "usb_gen": {"method": "usb", "set": [*debug, "method.options.generator={asset:gen}"]},
    }
    assets = {"gen": {"build": "domain_model", "data": data, "options": tiny}}
    path = write_suite(tmp_path / "s.yaml", methods, seeds=[0], assets=assets)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["bench", str(path), "--out", str(out), "--work", str(work)]
    assert main(argv) == 0, capsys.readouterr().err
    md = (out / "tiny.md").read_text()
    assert "## Assets" in md and "domain_model built by this suite" in md
    assert re.search(r"\(built [^)]*, by this code\)", md)  # its code version recorded
    assert "its train split: 160 images" in md and "Labels seen: train_groups" in md
    assert "data.options.seed: None -> 5" in md  # another draw than the benchmark's
    folders = [f for f in (work / "assets").iterdir() if f.is_dir()]
    assert len(folders) == 1 and (folders[0] / "asset.json").is_file()
    record = json.loads((out / "provenance.json").read_text())["assets"]["gen"]
    assert record["data"]["images"] == 160 and record["steps"]["unet"] == tiny["unet_steps"]
    config = json.loads(next((work / "tiny" / "usb_gen").glob("*/results.json")).read_text())
    assert config["config"]["method"]["options"]["generator"] == str(folders[0])
    first = _stamps(work / "tiny")
    capsys.readouterr()

    assert main(argv) == 0
    assert "training a domain model" not in capsys.readouterr().out

    assets["gen"]["options"] = {**tiny, "unet_steps": tiny["unet_steps"] + 1}
    write_suite(path, methods, seeds=[0], assets=assets)
    assert main(argv) == 0
    assert len([f for f in (work / "assets").iterdir() if f.is_dir()]) == 2
    changed = sorted({k.split("/")[0] for k in set(_stamps(work / "tiny")) - set(first)})
    assert changed == ["usb_gen"]


def test_an_asset_only_an_unlisted_method_reads_is_not_built(tmp_path, capsys):
    """A setting whose base method reads a built asset through ``method.options`` but
    whose ``methods:`` lists ERM alone: ERM never receives the option, so the asset is
    neither built nor needed (this raised a KeyError)."""
    data = [o for o in DEBUG if o.startswith("data.")]
    assets = {"gen": {"build": "domain_model", "data": data, "options": {"unet_steps": 1}}}
    path = write_suite(tmp_path / "s.yaml", {"erm": None, "usb": None}, seeds=[0], assets=assets)
    values = yaml.safe_load(path.read_text())
    values["settings"]["tiny"] = {
        "set": ["method.name=usb", "method.options.generator={asset:gen}"],
        "methods": ["erm"],
    }
    path.write_text(yaml.safe_dump(values))
    work = tmp_path / "work"
    assert main(["bench", str(path), "--check", "--work", str(work)]) == 0
    assert "1 setting(s), 1 run(s)" in capsys.readouterr().out
    assert not (work / "assets").exists()


def test_an_asset_built_by_other_code_says_so():
    """Assets are found by their spec alone (a DDPM costs CPU-hours), so a table says
    when one was built by other code, and how to rebuild it."""
    from unspur.bench.runner import _built_by
    from unspur.code_version import code_version

    assert _built_by(code_version()) == ", by this code"
    assert "**by other code** (0123456789: delete its folder" in _built_by("0123456789")
    assert "not recorded" in _built_by(None)


def test_a_second_process_waits_for_an_asset_being_built_and_does_not_build_it_again(
    tmp_path, monkeypatch
):
    """Two ``unspur bench`` processes needing one unbuilt asset: the one that finds the
    asset's lock held waits, then takes the built asset instead of training it twice."""
    import threading

    from unspur.bench import assets
    from unspur.bench.suite import Asset
    from unspur.io import exclusive_lock

    built: list[str] = []

    def fake_build(name, overrides, seed, options, work, log, resolved=None):
        folder = assets.asset_folder(name, overrides, seed, options, work)
        if (folder / "asset.json").is_file():  # as the real builders: finished is reused
            return folder, {"reused": True}
        built.append(name)
        folder.mkdir(parents=True)
        (folder / "asset.json").write_text("{}")
        return folder, {"reused": False}

    monkeypatch.setattr(assets, "build_ddpm", fake_build)
    spec = Asset("g", None, build="ddpm", data=["data.name=synthetic"], options={"steps": 1})
    work, logged, result = tmp_path / "work", [], {}
    folder = assets.asset_folder("g", spec.data, spec.seed, spec.options, work)
    with exclusive_lock(folder.parent / f".{folder.name}.lock") as held:  # "the other process"
        assert held
        waiter = threading.Thread(
            target=lambda: result.update(r=assets.build_asset("g", spec, work, logged.append, {}))
        )
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and any("waiting for it" in m for m in logged)
        fake_build("g", spec.data, spec.seed, spec.options, work, print)  # it finishes
    waiter.join(timeout=30)
    assert not waiter.is_alive() and built == ["g"] and result["r"] == (folder, {"reused": True})


def test_a_setting_can_override_one_method(tmp_path):
    """``LABEL:key=value`` in a setting's set reaches that method or variant only."""
    from unspur.bench.runner import setting_base, variants_with

    path = write_suite(
        tmp_path / "s.yaml",
        {"erm": None, "groupdro": None, "gdro_b": {"method": "groupdro"}},
        settings={"tiny": {"set": ["groupdro:method.options.eta=0.05"]}},
    )
    suite = load_suite(path)
    base, per_label = setting_base(suite, "tiny", None, None)
    assert per_label == ["groupdro:method.options.eta=0.05"] and "groupdro:method" not in base
    runs = plan(base, suite.labels, [0], per_label, tmp_path, variants_with(suite, {}), True)
    options = {label: config.method.options for label, _, config, _ in runs}
    assert options == {"erm": {}, "groupdro": {"eta": 0.05}, "gdro_b": {}}


def test_shared_names_the_settings_shared_folder(tmp_path):
    """``{shared}`` in a setting's or a variant's set is ``WORK/<setting>/shared``."""
    OPTION = "method.options.shared_cache"  # noqa: N806
    from unspur.bench.runner import setting_base, shared_folder, variants_with

    path = write_suite(
        tmp_path / "s.yaml",
        {"erm": None, "dbb": None, "dbb_b": {"method": "dbb", "set": [f"{OPTION}={{shared}}/b"]}},
        settings={"tiny": {"set": [f"dbb:{OPTION}={{shared}}/a"]}},
    )
    suite = load_suite(path)
    shared = shared_folder(tmp_path / "work" / "tiny")
    assert shared == tmp_path / "work" / "tiny" / "shared"
    _, per_label = setting_base(suite, "tiny", None, None, {}, shared)
    assert per_label == [f"dbb:{OPTION}={shared}/a"]
    assert variants_with(suite, {}, shared)["dbb_b"] == ("dbb", [f"{OPTION}={shared}/b"])


def test_variants_share_a_synthetic_pool_through_the_settings_shared_folder(tmp_path, capsys):
    """End to end: ``shared_cache={shared}`` lets USB with GroupDRO restore the pool USB
    with ERM generated for the same seed, in ``WORK/<setting>/shared``."""
    from unspur.methods import get_method

    usb = get_method("usb").debug_options
    debug = [f"method.options.{k}={v}" for k, v in usb.items() if k != "domain"]
    data = [o for o in DEBUG if o.startswith("data.")] + ["data.options.seed=5"]
    share = [*debug, "method.options.generator={asset:gen}", "method.options.shared_cache={shared}"]
    methods = {
        "erm": None,
        "usb_erm": {"method": "usb", "set": share},
        "usb_gdro": {"method": "usb", "set": [*share, "method.options.train_method=groupdro"]},
    }
    assets = {"gen": {"build": "domain_model", "data": data, "options": dict(usb["domain"])}}
    path = write_suite(tmp_path / "s.yaml", methods, seeds=[0], assets=assets)
    work = tmp_path / "work"
    argv = ["bench", str(path), "--out", str(tmp_path / "out"), "--work", str(work)]
    assert main(argv) == 0, capsys.readouterr().err

    def restored(label):
        (budget,) = (work / "tiny" / label).glob("*/usb/budget.json")
        return json.loads(budget.read_text())["generation"]["restored_from_shared_cache"]

    assert restored("usb_erm") == {}
    (entry,) = (work / "tiny" / "shared").iterdir()
    assert restored("usb_gdro") == {"synthetic": entry.name}


def test_a_work_folder_spelled_absolutely_finds_the_runs_made_relatively(
    tmp_path, capsys, monkeypatch
):
    """The ERM reference's path is part of a run's config: ``--work runs`` and the same
    folder spelled absolutely are the same runs."""
    path = write_suite(tmp_path / "s.yaml", {"erm": None, "dfr_val": None}, seeds=[0])
    monkeypatch.chdir(tmp_path)
    base = ["bench", str(path), "--out", "out", "--threads", "1"]
    assert main([*base, "--work", "work"]) == 0
    capsys.readouterr()
    assert main([*base, "--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 2 and "running in" not in out


def test_a_change_of_code_trains_again_and_reuse_takes_the_old_runs(tmp_path, capsys, monkeypatch):
    """Run folders carry the code version: other code trains every run again in new
    folders (the old ones kept); ``--reuse-other-code`` takes the old runs and the table
    says so (an ERM reference found under other code carries its dependants with it)."""
    import unspur.bench.runner as runner

    path = write_suite(tmp_path / "s.yaml", {"erm": None, "dfr_val": None}, seeds=[0])
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["bench", str(path), "--work", str(work), "--out", str(out), "--threads", "1"]
    monkeypatch.setattr(runner, "code_version", lambda: "aaaaaaaaaa")
    assert main(argv) == 0
    first = sorted(p.parent.parent.name + "/" + p.parent.name
                   for p in (work / "tiny").glob("*/seed0-*/results.json"))  # fmt: skip
    assert len(first) == 2 and all(name.endswith("-aaaaaaaaaa") for name in first)
    capsys.readouterr()

    monkeypatch.setattr(runner, "code_version", lambda: "bbbbbbbbbb")
    assert main([*argv, "--reuse-other-code"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    md = (out / "tiny.md").read_text()
    assert "--reuse-other-code" in md and "**2 run(s) trained by other code**" in md
    runs = list(csv.DictReader((out / "tiny_runs.csv").open()))
    assert all(r["run"].endswith("-aaaaaaaaaa") for r in runs)

    assert main(argv) == 0
    out_text = capsys.readouterr().out
    assert "finished earlier" not in out_text and out_text.count("running in") == 2
    now = sorted(p.parent.parent.name + "/" + p.parent.name
                 for p in (work / "tiny").glob("*/seed0-*/results.json"))  # fmt: skip
    assert len(now) == 4 and set(first) < set(now)  # the old runs are kept
    assert "trained by other code" not in (out / "tiny.md").read_text()
    runs = list(csv.DictReader((out / "tiny_runs.csv").open()))
    assert all(r["run"].endswith("-bbbbbbbbbb") for r in runs)


def test_reuse_finds_a_run_folder_named_before_code_versions(tmp_path, capsys, monkeypatch):
    """``seed<k>-<fingerprint>`` (no code version: runs made before folders carried it) is
    found by ``--reuse-other-code`` and trained again without it."""
    import unspur.bench.runner as runner

    path = write_suite(tmp_path / "s.yaml", {"erm": None}, seeds=[0])
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["bench", str(path), "--work", str(work), "--out", str(out), "--threads", "1"]
    monkeypatch.setattr(runner, "code_version", lambda: "aaaaaaaaaa")
    assert main(argv) == 0
    (made,) = (work / "tiny" / "erm").glob("seed0-*")
    legacy = made.with_name(made.name.removesuffix("-aaaaaaaaaa"))
    made.rename(legacy)
    capsys.readouterr()
    assert main([*argv, "--reuse-other-code"]) == 0
    assert f"finished earlier, skipped ({legacy}" in capsys.readouterr().out.replace("\\", "/")
    assert main(argv) == 0
    assert "running in" in capsys.readouterr().out
    assert sorted(p.name for p in (work / "tiny" / "erm").glob("seed0-*")) == sorted(
        [legacy.name, legacy.name + "-aaaaaaaaaa"]
    )


def test_only_invocations_keep_each_settings_provenance(tmp_path, capsys):
    """Settings regenerated by separate ``--only`` calls each keep their own record in
    provenance.json, next to the last call's at the top level."""
    path = write_suite(tmp_path / "two.yaml", {"erm": None}, seeds=[0])
    suite = yaml.safe_load(path.read_text())
    suite["settings"]["other"] = {"set": ["data.options.bias=0.8"]}
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out, work = tmp_path / "out", tmp_path / "work"
    base = ["bench", str(path), "--out", str(out), "--work", str(work), "--threads", "1"]
    assert main([*base, "--only", "tiny"]) == 0
    assert main([*base, "--only", "other"]) == 0
    assert (out / "tiny.md").exists() and (out / "other.md").exists()
    record = json.loads((out / "provenance.json").read_text())
    # A record written before provenance.json kept one per setting stands for the
    # settings its command named.
    legacy = {k: v for k, v in record["settings"]["tiny"].items() if k != "assets"}
    legacy = {"suite": record["suite"], **legacy, "assets": {}}
    for written in (record, None):
        if written is None:
            (out / "provenance.json").write_text(json.dumps(legacy))
            assert main([*base, "--only", "other"]) == 0
            written = json.loads((out / "provenance.json").read_text())
        capsys.readouterr()
        assert list(written["settings"]) == ["tiny", "other"]
        assert "--only tiny " in written["settings"]["tiny"]["command"]
        assert "--only other " in written["settings"]["other"]["command"]
        assert "--only other " in written["command"]


def test_the_suites_own_results_do_not_count_as_a_changed_checkout(tmp_path):
    """An earlier ``--only`` invocation rewrote the suite's tracked provenance.json: the
    next one's tables still say "clean checkout"; a changed source file still counts."""
    import subprocess

    from unspur.bench.provenance import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results" / "suite").mkdir(parents=True)
    (tmp_path / "results" / "suite" / "provenance.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    outputs = tmp_path / "results" / "suite"
    assert git_state(tmp_path, outputs)["changed_files"] == 0
    (outputs / "provenance.json").write_text('{"a": 1}')
    assert git_state(tmp_path, outputs)["changed_files"] == 0
    assert git_state(tmp_path)["changed_files"] == 1
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path, outputs)["changed_files"] == 1


def test_other_suites_tables_do_not_count_as_a_changed_checkout(tmp_path):
    """Tables written to their default folder leave every suite's results out of the
    count (another suite's tables in the same checkout are outputs, not code); tables
    sent elsewhere leave out only their own folder."""
    from unspur.bench.runner import bench_outputs

    suite = tmp_path / "bench" / "suites" / "mac.yaml"
    assert bench_outputs(suite, "mac", tmp_path / "bench" / "results" / "mac") == (
        tmp_path / "bench" / "results"
    )
    assert bench_outputs(suite, "mac", tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_a_run_is_stamped_with_its_commit_as_it_finishes(tmp_path, monkeypatch):
    """An invocation stopped after its runs and before its table (a session's end) still
    leaves each finished run's commit stamp; a later tabulation reads it, not "unknown"."""
    import unspur.bench.runner as runner
    from unspur.bench.provenance import TRAINED_AT

    path = write_suite(tmp_path / "s.yaml", {"erm": None}, seeds=[0])
    work, out = tmp_path / "work", tmp_path / "out"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped before the table")

    monkeypatch.setattr(runner, "measure", stopped)
    argv = ["bench", str(path), "--work", str(work), "--out", str(out), "--threads", "1"]
    assert main(argv) != 0  # "interrupted; run the same command again to resume"
    (run_dir,) = [p.parent for p in (work / "tiny").glob("erm/seed0-*/results.json")]
    stamp = json.loads((run_dir / TRAINED_AT).read_text())
    assert stamp["code_version"] == runner.code_version() and "commit" in stamp
    assert not (out / "tiny.md").exists()


def test_each_run_records_the_commit_that_trained_it_and_the_table_lists_them(tmp_path):
    """Runs are found again by config, which a code change does not move: the table says
    which commits trained its runs, so a stale run shows."""
    from unspur.bench.provenance import provenance_lines, trained_at

    old, new, before = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (old, new, before):
        folder.mkdir()
    assert trained_at(before, None) == "unknown"  # trained before the bench recorded it
    assert trained_at(old, {"commit": "abcdef123456", "changed_files": 0}) == "abcdef1"
    # found again later, under other code: the stamp is the training's, not today's
    assert trained_at(old, {"commit": "9999999999", "changed_files": 0}) == "abcdef1"
    assert trained_at(new, {"commit": "1234567890", "changed_files": 2}) == "1234567 +2 changed"
    record = {"command": "c", "git": {"commit": "x", "changed_files": 0}, "versions": {}, "date": "d",
              "threads": {"bench process": 1, "runs": [1]},
              "cost": {"runs": 3, "trained by this invocation": 0, "run wall seconds (sum)": 1,
                       "run CPU seconds (sum, known runs)": 1, "runs with known CPU seconds": 3,
                       "this invocation": {"wall_seconds": 1, "cpu_seconds": 1}},
              "machine": {"platform": "p", "machine": "m", "processor": "c", "cores": 2,
                          "usable cores": 2},
              "runs trained at": {"abcdef1": 2, "unknown": 1}}  # fmt: skip
    line = provenance_lines(record)[-1]
    assert line.startswith("- runs trained at: `abcdef1` (2), unknown (1: trained before")
