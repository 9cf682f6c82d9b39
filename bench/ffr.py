"""Benchmark: FFR vs USB, ASB and no synthetic data, like the paper's Table 1.

"From Fake to Real" (Qraitem et al.) Table 1 crosses a way of using synthetic images
(None, USB, ASB, FFR) with a training method (ERM, resampling, GroupDRO, DFR) at bias
levels 95 / 97 / 99 / 99.9 % and reports worst-group (WA) and balanced (BA) accuracy.
This script runs that grid on the synthetic benchmark with a CPU domain model as the
generator, and on UTKFace (gender target, age bias) when ``--data-dir`` holds it and
``--only`` names it (``utkface-99.9/ext``, ``utkface-99/ext``: see
:func:`utkface_universe` for the CPU-sized universe and the held-out images the external
generator learns from).

The generator (:mod:`unspur.generate.domain`): ``--domain DIR`` names a trained domain
model; else one is trained with the default config in ``--work/domain_model`` on the synthetic-99
training split (about an hour on one thread). Every synthetic method of every seed
draws from ONE pool of generated images (``--work/pool``, generation seed 0): USB, ASB
and FFR use the first images of each group of that pool, as the official loaders use
the first files of each group's folder, so the pool is generated once.

For every run the (B, G) probe (a linear probe telling real from synthetic images
within each group, on the final model's features) is recorded, and ``--judge`` labels
the pool's images with a shape judge and a background judge trained on real,
group-balanced images, to show how often the generator drew what each prompt asked.

    python bench/ffr.py --threads 1 --seeds 0,1,2
    python bench/ffr.py --threads 1 --data-dir ../shared/data --only utkface-99.9/ext

Runs live in ``--work`` and are reused when the bench is rerun (finished runs are not
trained again); ``--collect`` trains nothing and tabulates the finished runs only.
Writes ``ffr.md`` / ``ffr.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    SYNTHETIC,
    UTKFACE_TRAIN,
    Judges,
    failure_notes,
    markdown,
    row,
    write_results,
)

#: The shared CPU base with the paper's optimiser (Adam) for every run.
BASE = SYNTHETIC + ["train.optimizer=adam", "train.lr=0.001", "train.weight_decay=0"]
#: UTKFace on CPU: the benchmark's own universe (see utkface_universe), read as a CSV.
UTKFACE = [
    "data.name=csv",
    "data.options.class_names=[male,female]",
    "data.options.attr_names=[child,adult]",
    # The resplit's direction (the FFR release's UTKFace splits: males -> children,
    # females -> adults); the data alone cannot tell it, so the reader must be told.
    "data.options.majority=[child,adult]",
    "data.image_size=32",
    *UTKFACE_TRAIN,
]
SETTINGS: dict[str, tuple[list[str], str | None]] = {
    "synthetic-99": (BASE + ["data.options.bias=0.99"], None),
    "synthetic-99.9": (BASE + ["data.options.bias=0.99", "data.bias_ratio=0.999"], None),
    "utkface-99.9": (UTKFACE + ["data.bias_ratio=0.999"], "utkface"),
    "utkface-99": (UTKFACE + ["data.bias_ratio=0.99"], "utkface"),
}
# The same settings with the external generator (see generator_kind).
SETTINGS.update({f"{k}/ext": v for k, v in list(SETTINGS.items())})
#: Training data of the external generator: an independent, group-balanced draw.
EXTERNAL = [
    "data.name=synthetic",
    "data.options.n_train=2000",
    "data.options.bias=0.5",
    "data.options.seed=1000",
]
DEFAULT_SETTINGS = "synthetic-99,synthetic-99.9"
#: UTKFace universe: the reader's seeded split (seed 0: 70 / 10 / 20 %, stratified by
#: group); the benchmark trains on UTK_TRAIN_FRACTION of every training group (a CPU
#: budget: USB's synthetic total grows with the largest training group), evaluates on
#: the reader's whole val / test splits (group-balanced per run seed), and the external
#: generator learns from UTK_EXTERNAL_PER_GROUP held-out training images per group.
UTK_TRAIN_FRACTION = 0.1
UTK_EXTERNAL_PER_GROUP = 800
#: DDIM steps per UTKFace image (a CPU budget; ``--steps`` sets the synthetic settings').
UTK_STEPS = 15
#: The UTKFace domain model: captions "a headshot of a {male|female} {child|adult}",
#: text-to-image only (FFR needs no inpainting: one inpainting step, unused).
UTK_DOMAIN = {
    "caption_template": "a headshot of a {class} {bias}",
    "class_template": "a headshot of a {class}",
    "bias_template": "a headshot of a {bias}",
    "vae_steps": 300,
    "unet_steps": 1000,
    "inpaint_steps": 1,
    "mixed_modes": "convert",
}
#: The paper's UTKFace 99.9 % ERM numbers (Table 1): worst-group accuracy.
PAPER = {"utkface-99.9/ext": {"none+erm": 5.9, "ffr+erm": 42.9}}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=DEFAULT_SETTINGS, help="comma-separated settings")
    parser.add_argument("--augment", default="none,usb,asb,ffr")
    parser.add_argument("--train-methods", default="erm,groupdro")
    parser.add_argument("--domain", type=Path, default=None, help="a trained domain model dir")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/ffr"))
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per image")
    parser.add_argument("--judge", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", action="append", default=[], help="extra override, every run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--stem", default="ffr")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: tabulate the finished runs in --work, skip the others",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    return args


# ------------------------------------------------------------------ generator
def generator_kind(setting: str) -> str:
    """``in-run``: trained on the benchmark's own (synthetic-99) training split;
    ``external``: trained on an independent, group-balanced draw (synthetic: a separate
    draw of the generator; UTKFace: held-out images, see :func:`utkface_universe`);
    ``own``: trained on the UTKFace setting's own (biased) training split."""
    if setting.endswith("/ext"):
        return "external"
    return "in-run" if setting.startswith("synthetic") else "own"


def utkface_universe(data_dir: Path, work: Path) -> Path:
    """Write the UTKFace universe of the benchmark to ``work/utkface`` and return it.

    ``metadata.csv`` (the benchmark): UTK_TRAIN_FRACTION of every training group of the
    ``utkface`` reader's seeded split (gender target, age bias: child <= 10, adult >= 20)
    plus the reader's whole val and test splits. ``external.csv`` (the external
    generator's training data): UTK_EXTERNAL_PER_GROUP images per group drawn from the
    *other* training images, so the generator never sees a benchmark image, of any
    split or seed. Both are deterministic (numpy seed 0); the images are the archive's
    own JPEG bytes, written once.
    """
    import tarfile

    import pandas as pd

    from unspur.data.registry import load_dataset

    root = work / "utkface"
    if (root / "metadata.csv").is_file() and (root / "external.csv").is_file():
        return root
    raw = load_dataset("utkface", data_dir / "utkface", target="gender", bias="age", seed=0)
    frame = raw.frame.assign(reader_split=raw.frame["split"])
    rng = np.random.default_rng(0)
    train, held = [], []
    for _, part in frame[frame["split"] == "train"].groupby(["y", "a"]):
        order = rng.permutation(len(part))
        n_train = int(round(UTK_TRAIN_FRACTION * len(part)))
        train.append(part.iloc[order[:n_train]])
        held.append(part.iloc[order[n_train:]])
    per_group = min(UTK_EXTERNAL_PER_GROUP, *(len(h) for h in held))
    external = pd.concat([h.iloc[:per_group] for h in held]).assign(split="train")
    bench = pd.concat([*train, frame[frame["split"] != "train"]])
    assert not set(external["filename"]) & set(bench["filename"])
    wanted = set(bench["filename"]) | set(external["filename"])
    archive = data_dir / "utkface" / "UTKFace.tar.gz"
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.name in wanted:
                target = root / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                handle = tar.extractfile(member)
                assert handle is not None
                target.write_bytes(handle.read())
    columns = ["filename", "y", "a", "split", "age", "gender", "race", "reader_split"]
    external[columns].to_csv(root / "external.csv", index=False)
    bench[columns].to_csv(root / "metadata.csv", index=False)
    return root


def domain_model(args, setting: str, overrides: list[str]) -> tuple[Path, str]:
    """The domain model for a setting and where it came from (the default config).

    Order: ``--domain``; a model already trained in ``--work``; else trained here (never
    a generator cached outside the repository).
    """
    from unspur.config import load_config
    from unspur.generate.domain import DomainModelConfig, train_domain_model
    from unspur.pipeline import prepare_table

    if args.domain is not None:
        return args.domain, f"given ({args.domain})"
    kind = generator_kind(setting)
    utkface = setting.startswith("utkface")
    base = setting.removesuffix("/ext")
    if utkface and kind == "external":
        # One external UTKFace generator for every bias level: it never sees the
        # benchmark's images.
        name = "domain_model_utkface_external"
        source = [o for o in overrides if not o.startswith("data.bias_ratio")]
        source = source + ["data.options.csv=external.csv"]
        what = (
            f"{UTK_EXTERNAL_PER_GROUP} held-out UTKFace training images per group, in none of "
            "the benchmark's splits (group-balanced, numpy seed 0)"
        )
    else:
        name = {"in-run": "domain_model", "external": "domain_model_external"}.get(
            kind, f"domain_model_{base}"
        )
        source, what = {
            "in-run": (SETTINGS["synthetic-99"][0], "the synthetic-99 training split"),
            "external": (
                EXTERNAL,
                "an independent group-balanced draw (bias 0.5, data seed 1000)",
            ),
        }.get(kind, (overrides, f"the {base} training split"))
    config = DomainModelConfig(**UTK_DOMAIN) if utkface else DomainModelConfig()
    if utkface:
        what += (
            f"; captions 'a headshot of a {{male|female}} {{child|adult}}', "
            f"{config.vae_steps} autoencoder + {config.unet_steps} UNet steps"
        )
    if (args.work / name / "domain.json").is_file():
        return args.work / name, f"trained by this bench on {what}"
    if args.collect:  # --collect trains nothing, a generator included
        return Path(args.work / name), f"not trained yet (would be: {what})"
    table = prepare_table(load_config(None, source + ["seed=0"]))
    started = time.perf_counter()
    model = train_domain_model(table, args.work / name, config)
    took = time.perf_counter() - started
    return model.out_dir, f"trained here on {what} ({took / 60:.0f} min)"


# ------------------------------------------------------------------ runs
class NotRun(Exception):
    """A run that ``--collect`` found unfinished."""


def run_in(overrides: list[str], seed: int, directory: Path, collect: bool = False) -> dict:
    from unspur.config import load_config
    from unspur.pipeline import run
    from unspur.stages import is_finished

    config = load_config(None, overrides + [f"seed={seed}", "train.progress=false"])
    if collect and not is_finished(config, directory):
        raise NotRun(str(directory))
    started = time.perf_counter()
    results = run(config, directory)
    # A finished run is read back, not retrained: report the time it took when it ran.
    results["bench_wall_seconds"] = results.get("wall_seconds", time.perf_counter() - started)
    return results


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def judge_pool(args, pool: Path, table_overrides: list[str], title: str) -> list[str]:
    """Shape and background judges (small CNNs on real, group-balanced images) on the pool."""
    from unspur.data.store import FolderStore
    from unspur.generate.store import SyntheticStore

    judges = Judges(table_overrides, args.work)
    names = judges.class_names, judges.attr_names
    frame = SyntheticStore(pool).to_frame()
    frame = frame[frame["kept"]]
    folder = FolderStore(pool)
    labels = judges([folder.open(name) for name in frame["filename"]])
    shape, background = labels["shape"], labels["background"]
    frame = frame.assign(shape_ok=(shape == frame["y"].to_numpy()),
                         background_ok=(background == frame["a"].to_numpy()))  # fmt: skip
    rows = []
    for (y, a), part in frame.groupby(["y", "a"]):
        rows.append({
            "group": f"{names[0][y]} / {names[1][a]}",
            "minority": y != a,
            "images": len(part),
            "shape right %": round(100 * part["shape_ok"].mean(), 1),
            "background right %": round(100 * part["background_ok"].mean(), 1),
            "both right %": round(100 * (part["shape_ok"] & part["background_ok"]).mean(), 1),
        })  # fmt: skip
    return [
        f"## What the generator drew: {title}",
        "",
        f"Judges: small CNNs trained on real, group-balanced images (a separate draw, seed 7); "
        f"test accuracy on real images: shape {judges.accuracy['shape']}%, background "
        f"{judges.accuracy['background']}%. Every kept image of the pool, by the group its "
        "prompt asked for:",
        "",
        *markdown(rows),
        "",
    ]


def judge_utkface(args, pool: Path, overrides: list[str]) -> list[str]:
    """Gender and age judges (small CNNs trained on the external generator's real,
    group-balanced images; accuracy on the real val split of seed 0) on every kept image
    of the UTKFace pool. Cached in ``--work/judge_utkface.json``."""
    cache = args.work / "judge_utkface.json"
    if not cache.is_file() and not args.collect:
        from unspur.config import TrainConfig, load_config
        from unspur.data.dataset import GroupDataset
        from unspur.data.store import FolderStore
        from unspur.data.table import GroupTable
        from unspur.data.transforms import eval_transform
        from unspur.generate.store import SyntheticStore
        from unspur.models.factory import build_model
        from unspur.pipeline import prepare_table
        from unspur.train.loop import fit

        base = [o for o in overrides if not o.startswith("data.bias_ratio")]
        external = prepare_table(load_config(None, base + ["data.options.csv=external.csv"]))
        val = prepare_table(load_config(None, base + ["seed=0"])).split("val")

        def swap(t):
            return GroupTable(frame=t.frame.assign(y=t.frame["a"], a=t.frame["y"]),
                              store=t.store, class_names=t.attr_names,
                              attr_names=t.class_names, name="age")  # fmt: skip

        transform = eval_transform(32, 1.0, True)
        config = TrainConfig(epochs=6, batch_size=64, optimizer="adam", lr=1e-3,
                             weight_decay=0, augment=False, progress=False,
                             selection="last")  # fmt: skip
        frame = SyntheticStore(pool).to_frame()
        frame = frame[frame["kept"]]
        folder = FolderStore(pool)
        images = torch.stack([transform(folder.open(n)) for n in frame["filename"]])

        def predict(model, x):
            model.eval()
            with torch.no_grad():
                return torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])

        right, accuracy = {}, {}
        for what, train, test in (("gender", external, val), ("age", swap(external), swap(val))):
            model = build_model("small_cnn", 2)
            fit(model, GroupDataset(train, transform), None, config,
                args.work / f"judge_utk_{what}", seed=0, val_group_labels=False)  # fmt: skip
            x = torch.stack([transform(test.store.open(n)) for n in test.frame["filename"]])
            accuracy[what] = round(
                100 * float((predict(model, x).numpy() == test.frame["y"].to_numpy()).mean()), 1
            )
            truth = frame["y" if what == "gender" else "a"].to_numpy()
            right[what] = predict(model, images).numpy() == truth
        groups = {}
        parts = frame.assign(g_ok=right["gender"], a_ok=right["age"]).groupby(["y", "a"])
        for (y, a), part in parts:
            groups[f"{val.class_names[y]} / {val.attr_names[a]}"] = {
                "images": len(part),
                "gender right %": round(100 * part.g_ok.mean(), 1),
                "age right %": round(100 * part.a_ok.mean(), 1),
                "both %": round(100 * (part.g_ok & part.a_ok).mean(), 1),
            }
        cache.write_text(json.dumps({"judge_real_val_accuracy": accuracy, "groups": groups}))
    if not cache.is_file():
        return []
    result = json.loads(cache.read_text())
    rows = [{"group asked for": k, **v} for k, v in result["groups"].items()]
    acc = result["judge_real_val_accuracy"]
    return [
        "## What the generator drew: UTKFace external generator",
        "",
        "Judges: small CNNs trained on the external generator's real, group-balanced "
        f"images; accuracy on the real (balanced) val split: gender {acc['gender']}%, age "
        f"{acc['age']}%. Every kept image of the pool, by the group its prompt asked for:",
        "",
        *markdown(rows),
        "",
    ]


def probe_notes(probes: dict[tuple[str, str], list[dict]]) -> list[str]:
    if not probes:
        return []
    lines = [
        "## The (B, G) probe: real vs synthetic within each group",
        "",
        "Accuracy of a linear probe (standardised logistic regression, 5-fold, balanced "
        "real/synthetic subsets, so 50% = chance) on the final model's features, telling "
        "the real training images of a group from the method's synthetic images of that "
        "group; mean over seeds, `-` where a group has fewer than 2 real images.",
        "",
    ]
    tables: dict[tuple[str, ...], list[dict]] = {}  # one table per dataset's groups
    for (setting, method), runs in sorted(probes.items()):
        names = [g["name"] for g in runs[0]["groups"]]
        entry = {"setting": setting, "method": method}
        for k, name in enumerate(names):
            values = [
                r["groups"][k]["accuracy"] for r in runs if r["groups"][k]["accuracy"] is not None
            ]
            entry[name] = f"{100 * np.mean(values):.1f}" if values else "-"
        tables.setdefault(tuple(names), []).append(entry)
    for table in tables.values():
        lines += markdown(table) + [""]
    return lines


def paper_notes(rows: list[dict]) -> list[str]:
    lines = []
    for setting, numbers in PAPER.items():
        ours = {}
        for key in numbers:
            values = [
                r["worst_group_accuracy"]
                for r in rows
                if r["setting"] == setting and r["method"] == key
            ]
            ours[key] = f"{np.mean(values):.1f}" if values else "not run"
        lines += [f"| {setting} | {k} | {v} | {ours[k]} |" for k, v in numbers.items()]
    if not lines:
        return []
    return ["## Beside the paper", "", "| setting | method | paper WA | ours WA |", "|---|---|---|---|",
            *lines, ""]  # fmt: skip


def verdict_notes(rows: list[dict]) -> list[str]:
    """Is FFR's mean worst-group accuracy above None, USB and ASB (same training method)?"""
    means: dict[tuple[str, str], tuple[float, float, int]] = {}
    for key in {(r["setting"], r["method"]) for r in rows}:
        values = [r["worst_group_accuracy"] for r in rows if (r["setting"], r["method"]) == key]
        means[key] = (float(np.mean(values)), float(np.std(values)), len(values))
    lines = []
    for setting in sorted({r["setting"] for r in rows}):
        for method in sorted({m.split("+", 1)[1] for s, m in means if s == setting}):
            ffr = means.get((setting, f"ffr+{method}"))
            others = {a: means.get((setting, f"{a}+{method}")) for a in ("none", "usb", "asb")}
            if ffr is None or any(v is None for v in others.values()):
                continue
            best = max(others, key=lambda a: others[a][0])
            margin = ffr[0] - others[best][0]
            text = ", ".join(f"{a} {v[0]:.1f} ± {v[1]:.1f}" for a, v in others.items())
            lines.append(
                f"| {setting} | {method} | {ffr[0]:.1f} ± {ffr[1]:.1f} | {text} | "
                f"{'yes' if margin > 0 else 'no'} ({margin:+.1f} vs {best}) | {ffr[2]} |"
            )
    if not lines:
        return []
    return ["## Is FFR above None, USB and ASB? (worst-group accuracy, mean ± std over seeds)",
            "", "| setting | training method | FFR | None / USB / ASB | FFR above all three | "
            "seeds |", "|---|---|---|---|---|---|", *lines, ""]  # fmt: skip


def main() -> int:
    args = arguments()
    args.work.mkdir(parents=True, exist_ok=True)
    augments = args.augment.split(",")
    train_methods = args.train_methods.split(",")
    rows, failures, notes_domain = [], [], []
    probes: dict[tuple[str, str], list[dict]] = {}
    budgets: dict[str, dict] = {}
    judged: dict[str, list[str]] = {}
    for setting in args.only.split(","):
        overrides, needs = SETTINGS[setting]
        overrides = overrides + args.set
        if needs is not None:
            if args.data_dir is None or not (args.data_dir / needs).exists():
                print(f"skip {setting}: needs {needs} under --data-dir", file=sys.stderr)
                continue
            root = utkface_universe(args.data_dir, args.work)
            overrides = overrides + [f"data.root={root}"]
        if augments == ["none"]:  # no generator needed (nor trained)
            domain, note = Path("none"), "not used (no synthetic data)"
        else:
            domain, note = domain_model(args, setting, overrides)
            notes_domain.append(f"- {setting}: {note}")
        print(f"{setting}: domain model {domain} ({note})", flush=True)
        pool = args.work / f"pool_{Path(domain).name}"
        synthetic_options = [
            f"method.options.generator={domain}",
            f"method.options.store={pool}",
            "method.options.generation_seed=0",
            f"method.options.steps={UTK_STEPS if setting.startswith('utkface') else args.steps}",
            "method.options.batch_size=32",
            "method.options.probe=true",
        ]
        if setting.startswith("utkface"):
            synthetic_options.append("method.options.grayscale_filter=true")
        for seed in args.seed_list:
            for augment in augments:
                for method in train_methods:
                    label = f"{augment}+{method}"
                    # Without synthetic data the generator plays no part: the /ext
                    # settings reuse the runs of their base setting.
                    where = setting.removesuffix("/ext") if augment == "none" else setting
                    directory = args.work / where / f"seed{seed}" / label
                    if augment == "none":
                        chosen = overrides + [f"method.name={method}"]
                    else:
                        chosen = overrides + [f"method.name={augment}",
                                              f"method.options.train_method={method}",
                                              *synthetic_options]  # fmt: skip
                    try:
                        results = run_in(chosen, seed, directory, args.collect)
                    except NotRun:
                        print(f"not finished, skipped: {directory}", flush=True)
                        continue
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        failures.append(
                            f"| {setting} {label} | seed {seed} | {str(exc).splitlines()[0]} |"
                        )
                        print(
                            f"FAILED {setting} {label} seed {seed}: {exc}",
                            file=sys.stderr,
                            flush=True,
                        )
                        continue
                    entry = row(setting, seed, results)
                    entry["method"] = label
                    info = (
                        read_json(directory / augment / "budget.json")
                        if augment != "none"
                        else None
                    )
                    entry["synthetic"] = info["budget"]["synthetic_total"] if info else 0
                    probe = (info or {}).get("probe")
                    entry["probe_mean"] = (
                        round(100 * probe["mean_accuracy"], 1)
                        if probe and probe.get("mean_accuracy") is not None
                        else ""
                    )
                    # FFR's stage 1 (synthetic images only) on the real validation set.
                    stage1 = ((info or {}).get("stage1") or {}).get("val") or {}
                    for key, name in (("worst_group_accuracy", "stage1_val_wga"),
                                      ("balanced_accuracy", "stage1_val_ba")):  # fmt: skip
                        entry[name] = round(100 * stage1[key], 1) if key in stage1 else ""
                    if probe and "groups" in probe:
                        probes.setdefault((setting, label), []).append(probe)
                    if info and seed == args.seed_list[0]:
                        budgets[f"{setting} {augment}"] = info["budget"]
                    rows.append(entry)
                    print(entry, flush=True)
                    write_results(rows, args.out, args.stem,
                                  extra_notes(notes_domain, budgets, probes, judged, rows, failures))  # fmt: skip
        kind = generator_kind(setting)
        if args.judge and setting.startswith("utkface") and pool.is_dir() and kind == "external":
            judged.setdefault("utkface", judge_utkface(args, pool, overrides))
        if (
            args.judge
            and not args.collect
            and setting.startswith("synthetic")
            and pool.is_dir()
            and kind not in judged
        ):
            judged[kind] = judge_pool(
                args, pool, SETTINGS["synthetic-99"][0] + args.set, f"{kind} generator ({note})"
            )
    write_results(rows, args.out, args.stem,
                  extra_notes(notes_domain, budgets, probes, judged, rows, failures))  # fmt: skip
    return 0


def extra_notes(notes_domain, budgets, probes, judged, rows, failures) -> list[str]:
    lines = [
        "Methods are `<synthetic data>+<training method>`: `none` = the registry's method on "
        "real data only; `usb` / `asb` = real + synthetic (USB tops every group up to the "
        "largest, ASB adds USB's budget split equally over the groups); `ffr` = stage 1 on "
        "the balanced synthetic set only (Adam, no augmentation, selection by real-val "
        "worst-group accuracy), stage 2 the training method on real data from the stage-1 "
        "weights. Every run: small CNN, 32 px, Adam lr 1e-3, no weight decay, no "
        "augmentation (stage 1 and stage 2 alike); synthetic settings 8 epochs, batch 64; "
        "UTKFace 6 epochs, batch 128; selection by validation worst-group accuracy. "
        "`synthetic` = generated images used; `probe_mean` = mean (B, G) probe accuracy "
        "over the groups it could score; `stage1_val_wga` / `stage1_val_ba` = FFR's "
        "stage-1 model (synthetic images only, the selected epoch) on the real validation "
        "set: worst-group and balanced accuracy.",
        "",
        f"UTKFace (`utkface-*`): target gender, bias age (child <= 10, adult >= 20; "
        f"majority groups male child and female adult), the `utkface` reader's seeded "
        f"split (seed 0, 70 / 10 / 20 %, stratified by group). To fit a CPU budget the "
        f"benchmark trains on {UTK_TRAIN_FRACTION:.0%} of every training group (before "
        f"the bias resplit: male child / adult 108 / 718, female child / adult 118 / 619), so at 99.9 % the resplit keeps "
        f"one image of each conflicting group (male 99.1 %, female 99.8 % majority: a "
        f"class cannot drop below one conflicting image); val and test are the reader's "
        f"whole splits, group-balanced per seed (154 and 307 per group). The external "
        f"generator (`/ext`) learns from {UTK_EXTERNAL_PER_GROUP} images per group drawn "
        f"from the remaining {1 - UTK_TRAIN_FRACTION:.0%} of the training split, so it "
        f"never sees an image of the benchmark (train, val or test, any seed), as Stable "
        f"Diffusion never saw the paper's splits; the paper's grayscale filter is on.",
        "",
        "Generator:",
        *notes_domain,
        "- one shared pool per generator, generation seed 0, DDIM (the domain model's "
        f"scheduler; 25 steps for the synthetic settings, {UTK_STEPS} for UTKFace), "
        "guidance 4.0 (domain.json), prompts = the domain model's captions "
        '("a photo of a {class} on {bias}"; UTKFace "a headshot of a {male|female} '
        '{child|adult}").',
        "",
    ]
    if budgets:
        lines += ["## Synthetic budgets (first seed)", "", "| setting | mode | real per group | "
                  "synthetic per group | total | matched to |", "|---|---|---|---|---|---|"]  # fmt: skip
        for key, b in budgets.items():
            real = [g["real"] for g in b["groups"]]
            synth = [g["synthetic"] for g in b["groups"]]
            lines.append(f"| {key.split()[0]} | {b['mode']} | {real} | {synth} | "
                         f"{b['synthetic_total']} | {b['matched_total']} |")  # fmt: skip
        lines.append("")
    judges = [line for kind in sorted(judged) for line in judged[kind]]
    return (
        lines
        + verdict_notes(rows)
        + paper_notes(rows)
        + probe_notes(probes)
        + judges
        + failure_notes(failures)
    )


if __name__ == "__main__":
    sys.exit(main())
