"""Measurements: what a benchmark table reports besides accuracy.

A measurement is a function ``(run_dir, results) -> {column: value}`` registered under a
name; a suite lists the names it wants (``measurements: [timing, mac_mask_quality]``) and
the runner adds their columns to the table (numbers: mean ± sample std over seeds). A
measurement that does not apply to a run (MaC's mask quality on a DFR run) returns ``{}``.
Measurements read what a run left in its directory; they never train anything (a
trained judge is a ``build: judge`` asset the run's setting ``uses``; its folder reaches
the measurement as ``results["bench_assets"]``). A column's value may be an
:class:`~unspur.bench.artefacts.Artefact`, a file the measurement wrote into the run
directory (a sample grid): the runner publishes it next to the table. Measurements of
generated images and timings live in :mod:`unspur.bench.generated` and
:mod:`unspur.bench.timings`, registered when the package is imported.

    from unspur.bench.measurements import register

    @register("my_column")
    def my_column(run_dir, results):
        return {"my value": 1.0}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unspur.errors import ConfigError, did_you_mean

Measurement = Callable[[Path, dict[str, Any]], dict[str, Any]]
MEASUREMENTS: dict[str, Measurement] = {}


def register(name: str) -> Callable[[Measurement], Measurement]:
    """Register ``function`` as measurement ``name`` (a name is registered once)."""

    def add(function: Measurement) -> Measurement:
        if name in MEASUREMENTS:
            raise ValueError(f"measurement {name!r} is registered twice")
        MEASUREMENTS[name] = function
        return function

    return add


def get_measurement(name: str) -> Measurement:
    if name not in MEASUREMENTS:
        raise ConfigError(
            f"unknown measurement {name!r}{did_you_mean(name, MEASUREMENTS)}; "
            f"available: {', '.join(sorted(MEASUREMENTS))}"
        )
    return MEASUREMENTS[name]


def measure(names: list[str], run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Every listed measurement's columns for one run, in the order listed."""
    columns: dict[str, Any] = {}
    for name in names:
        columns.update(get_measurement(name)(Path(run_dir), results))
    return columns


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def epoch_seconds(stage_dir: Path) -> float | None:
    """Mean seconds of one training epoch of a stage (its ``history.json``), or None."""
    history = _read_json(stage_dir / "history.json")
    seconds = [e["seconds"] for e in history or [] if isinstance(e, dict) and "seconds" in e]
    return float(np.mean(seconds)) if seconds else None


@register("timing")
def timing(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Wall seconds of the run (earlier interrupted invocations included), CPU seconds of
    the process that trained it (``cost.json``; absent for a run resumed after an
    interruption only in part), and the mean epoch seconds of its first trained stage."""
    cost = _read_json(run_dir / "cost.json") or {}
    stages = results.get("stages") or []
    epoch = epoch_seconds(run_dir / stages[0]) if stages else None
    return {
        "wall s": results.get("wall_seconds"),
        "CPU s": cost.get("cpu_seconds"),
        "epoch s": epoch,
    }


@register("head_epoch_cost")
def head_epoch_cost(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """For a method that trains on a reference ERM model (DFR, LLR): the cost of its
    cheapest stage's epoch relative to an epoch of that ERM model (goal: at most 0.05)."""
    reference = (results.get("config") or {}).get("method", {}).get("reference")
    if not reference:
        return {}
    erm = epoch_seconds(Path(reference).parent / "erm")
    own = [epoch_seconds(run_dir / s) for s in results.get("stages") or [] if s != "erm"]
    own = [s for s in own if s is not None]
    if erm is None or not own or erm <= 0:
        return {}
    return {"head epoch / ERM epoch": min(own) / erm}


@register("mac_mask_quality")
def mac_mask_quality(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """MaC's mask quality against the dataset's exact object masks (the MaC paper's
    Table 1), all training images: mean min-max-scaled saliency inside / outside the core
    (``saliency_fg`` / ``saliency_bg``) and the share of core / background pixels inside
    MaC's mask (``mask_fg`` / ``mask_bg``). Empty for runs without exact masks."""
    import pandas as pd

    path = run_dir / "mac" / "mask_quality.csv"
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    everything = frame[frame["name"] == "all"]
    if everything.empty:
        return {}
    row = everything.iloc[0]
    return {
        c: float(row[c]) for c in ("saliency_fg", "saliency_bg", "mask_fg", "mask_bg") if c in row
    }


@register("dbb_pruning")
def dbb_pruning(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """DBB's generated and pruned images (the DBB paper's Table 2), summed over classes:
    candidates generated, passing the softmax (psi, Eq. 3) and the attribution (rho,
    Eq. 4-5) condition, kept by the paper's rule (both), and used by the variant; and the
    retraining rate chosen on validation (``retrain lr``) when the run searched it."""
    statistics = _read_json(run_dir / "dbb" / "statistics.json")
    if not isinstance(statistics, dict) or not statistics.get("classes"):
        return {}
    names = {
        "generated": "generated",
        "pass_psi": "pass psi",
        "pass_rho": "pass rho",
        "kept_paper_rule": "kept (paper)",
        "used": "used",
    }
    columns: dict[str, Any] = {
        column: sum(int(c.get(key, 0)) for c in statistics["classes"])
        for key, column in names.items()
    }
    search = _read_json(run_dir / "dbb" / "retrain_search.json")
    if isinstance(search, dict) and search.get("chosen_lr") is not None:
        columns["retrain lr (val)"] = f"{float(search['chosen_lr']):g}"
    return columns


@register("bg_probe")
def bg_probe(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """FFR's (B, G) diagnostic: mean over groups of a linear probe's accuracy telling real
    from synthetic images in the final model's features (0.5 = chance, i.e. mixed), from
    the ``probe.json`` an FFR / USB / ASB run writes in its method folder; and each
    group's (``probe: <group>``; absent where a group lacks real or synthetic images)."""
    for path in sorted(run_dir.glob("*/probe.json")):
        record = _read_json(path)
        if isinstance(record, dict) and record.get("mean_accuracy") is not None:
            columns = {"real-vs-synthetic probe": float(record["mean_accuracy"])}
            for group in record.get("groups") or []:
                if isinstance(group, dict) and group.get("accuracy") is not None:
                    columns[f"probe: {group.get('name')}"] = float(group["accuracy"])
            return columns
    return {}


@register("mac_search")
def mac_search(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """MaC's (alpha, beta): chosen on validation worst-group accuracy with ``search:
    true`` (``search.json``), else the fixed values (``mac.json``)."""
    for name in ("search.json", "mac.json"):
        chosen = _read_json(run_dir / "mac" / name)
        if isinstance(chosen, dict) and "alpha" in chosen:
            return {"alpha": f"{chosen['alpha']:g}", "beta": f"{chosen['beta']:g}"}
    return {}


def _percent(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


@register("ffr_stage1")
def ffr_stage1(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """FFR's stage-1 model (trained on generated images only) on the *real* validation
    split, at the epoch FFR selected (``budget.json``'s ``stage1.val``), in percent:
    whether the generated images alone already teach the core before stage 2."""
    record = _read_json(run_dir / "ffr" / "budget.json")
    val = (record or {}).get("stage1", {}).get("val") if isinstance(record, dict) else None
    if not isinstance(val, dict):
        return {}
    return {
        "stage-1 val worst-group": _percent(val.get("worst_group_accuracy")),
        "stage-1 val balanced": _percent(val.get("balanced_accuracy")),
    }


#: Clustered DreamBooth's CLIP stand-ins without meaning (random weights): its record
#: says ``"tiny (random init)"``; a folder built by ``build_tiny_clip`` is ``clip_tiny``.
RANDOM_CLIPS = ("tiny", "clip_tiny")


def _clip_verdict(filter_rule: str, clip: str | None) -> str:
    if filter_rule != "clip":
        return f"off (filter {filter_rule})"
    text = str(clip)
    if clip is None or text.split(" ")[0] in RANDOM_CLIPS or Path(text).name in RANDOM_CLIPS:
        return "CLIP filter untested (randomly initialised CLIP stand-in)"
    return f"ran with {clip}"


@register("cdb_clusters")
def cdb_clusters(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """What Clustered DreamBooth's clusters hold (its ``summary.json``): k_D, and per
    cluster its training group, size and the true groups of its instance images
    (``g/cluster: n [groups]``); the groups that borrow another group's models; and
    whether the CLIP filter was tested (a randomly initialised CLIP stand-in leaves the
    clusters and the filter untested, and says so)."""
    found = sorted((run_dir / "clustered_dreambooth").glob("*/summary.json"))
    record = _read_json(found[0]) if found else None
    if not isinstance(record, dict):
        return {}
    names = {p["group"]: p.get("name", str(p["group"])) for p in record.get("plans") or []}
    clusters = []
    for g in record.get("generators") or []:
        if g.get("cluster") is None:
            continue
        held = g.get("instance_groups")
        held_text = " [" + ", ".join(f"{k} {v}" for k, v in held.items()) + "]" if held else ""
        clusters.append(
            f"{names.get(g['group'], g['group'])} c{g['cluster']}: "
            f"{g.get('instance_images')}{held_text}"
        )
    borrowed = [p.get("name", str(p["group"])) for p in record.get("plans") or []
                if p.get("borrowed")]  # fmt: skip
    return {
        "k_D": None if record.get("k_D") is None else str(record["k_D"]),  # a count, as text
        "clusters": "; ".join(clusters) or "none (mode without clusters)",
        "borrowing groups": ", ".join(borrowed) or "none",
        "CLIP filter": _clip_verdict(str(record.get("filter")), record.get("clip")),
    }


#: The synthetic benchmark's backgrounds the border rule tells apart (attribute index).
RULE_BACKGROUNDS = ("land", "water")


def border_background(image: Any) -> int:
    """1 (water) when the median blue minus green over the 3-pixel border is positive,
    else 0 (land): a fixed rule, no training (100% on the synthetic benchmark's real
    land/water images, bench/results/shipped_generators.md)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate(
        [pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
         pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)]
    )  # fmt: skip
    return int(np.median(border[:, 2] - border[:, 1]) > 0)


@register("generated_judged")
def generated_judged(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Generated images judged against what was asked, for runs on the synthetic
    benchmark with its two backgrounds (land, water): every synthetic store the run left
    (``**/manifest/part-*.jsonl``), each image's background by the border rule
    (:func:`border_background`) against the requested ``a``; the share in percent, over
    all images and per requested background. The shape (class) is not judged here: that
    needs a trained judge, and a measurement trains nothing."""
    from PIL import Image

    data = (results.get("config") or {}).get("data") or {}
    if data.get("name") != "synthetic":
        return {}
    options = data.get("options") or {}
    n_attrs = options.get("n_attrs") or options.get("n_classes", 2)
    if n_attrs != len(RULE_BACKGROUNDS):
        return {}
    hits = {a: [] for a in range(len(RULE_BACKGROUNDS))}
    from unspur.generate.store import run_store_rows

    for root, rows in run_store_rows(run_dir):
        for row in rows:
            path = root / str(row.get("filename", ""))
            a = int(row.get("a", -1))
            if a not in hits or not path.is_file():
                continue
            with Image.open(path) as image:
                hits[a].append(border_background(image) == a)
    everything = [h for values in hits.values() for h in values]
    if not everything:
        return {}
    columns: dict[str, Any] = {
        "generated": len(everything),
        "background as asked (rule)": 100.0 * float(np.mean(everything)),
    }
    for a, values in hits.items():
        if values:
            columns[f"background as asked: {RULE_BACKGROUNDS[a]}"] = 100.0 * float(np.mean(values))
    return columns


# ----------------------------------------------------------------- DiffInject (issue 18)
def _judge(folder: Path) -> tuple[Any, Any, dict[str, Any]] | None:
    """A ``build: judge`` asset's model, its eval transform and its record, or None."""
    record = _read_json(Path(folder) / "asset.json")
    if not isinstance(record, dict) or record.get("build") != "judge":
        return None
    from unspur.data.transforms import eval_transform
    from unspur.models.restore import load_checkpoint

    t = record["transform"]
    transform = eval_transform(int(t["image_size"]), float(t["crop_ratio"]), bool(t["normalize"]))
    return load_checkpoint(Path(folder) / "model"), transform, record


def colour_rule(image: Any) -> int:
    """Colored MNIST's colour (index into the reader's ``PALETTE``) by a fixed rule, no
    training: the mean colour of the stroke's core (pixels at least 80% as bright as the
    brightest), nearest palette colour in RGB."""
    from unspur.data.readers.colored_mnist import PALETTE

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255.0
    bright = pixels.max(axis=1)
    core = pixels[bright >= 0.8 * bright.max()] if bright.max() > 0 else pixels
    return int(np.argmin(((PALETTE - core.mean(axis=0)) ** 2).sum(axis=1)))


@register("diffinject_judged")
def diffinject_judged(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """DiffInject's synthetic images judged (``diffinject_synthetic/``, each with its
    content and style image's labels): the share in percent showing the *content*
    image's class and the *style* image's class (by the suite's ``target: y`` judge
    asset), and keeping the style image's bias attribute (by a ``target: a`` judge, or
    on Colored MNIST by :func:`colour_rule`). Judges are suite assets (``build: judge``
    in the setting's ``uses``); nothing is trained here. Empty for other runs."""
    import torch
    from PIL import Image

    from unspur.generate.store import SyntheticStore

    root = run_dir / "diffinject_synthetic"
    if not root.is_dir():
        return {}
    store = SyntheticStore(root)
    rows = [r for r in store.done().values() if "content_y" in (r.get("extra") or {})]
    if not rows:
        return {}
    judges = [j for j in map(_judge, (results.get("bench_assets") or {}).values()) if j]
    by_target = {record["target"]: (model, tf) for model, tf, record in judges}
    accuracy = {record["target"]: record.get("val_accuracy") for _, _, record in judges}
    dataset = ((results.get("config") or {}).get("data") or {}).get("name")

    def predict(target: str) -> np.ndarray | None:
        if target not in by_target:
            return None
        model, transform = by_target[target]
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), 256):
                batch = []
                for r in rows[i : i + 256]:
                    with Image.open(store.path(r["filename"])) as image:
                        batch.append(transform(image.convert("RGB")))
                out.append(model(torch.stack(batch)).argmax(1).numpy())
        return np.concatenate(out)

    extra = [r["extra"] for r in rows]
    content_y = np.array([e["content_y"] for e in extra])
    style_y = np.array([e["style_y"] for e in extra])
    style_a = np.array([e["style_a"] for e in extra])
    columns: dict[str, Any] = {"synthetic judged": len(rows)}
    for target, value in accuracy.items():  # how far the judges can be trusted
        columns[f"judge of {target}: val acc. (%)"] = _percent(value)
    digit = predict("y")
    if digit is not None:
        columns["content class shown"] = 100.0 * float(np.mean(digit == content_y))
        columns["style class shown"] = 100.0 * float(np.mean(digit == style_y))
    bias = predict("a")
    rule = bias is None and dataset == "colored_mnist"
    if rule:
        bias = []
        for r in rows:
            with Image.open(store.path(r["filename"])) as image:
                bias.append(colour_rule(image))
        bias = np.asarray(bias)
    if bias is not None:
        columns["style bias kept"] = 100.0 * float(np.mean(bias == style_a))
        columns["bias judged by"] = "colour rule" if rule else "judge"
    if digit is not None and bias is not None:
        both = (digit == content_y) & (bias == style_a)
        columns["content class + style bias"] = 100.0 * float(np.mean(both))
    return columns


@register("ddpm_h_share")
def ddpm_h_share(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The h_share of the DDPM a DiffInject run loaded (``method.options.ddpm``), as its
    ``build: ddpm`` asset measured it on held-out pairs (median, t = 700 / 500 / 300):
    0 = the decoder ignores h, 1 = h alone decides. Empty without such an asset."""
    ddpm = ((results.get("config") or {}).get("method") or {}).get("options", {}).get("ddpm")
    if not ddpm:
        return {}
    for folder in (Path(ddpm), Path(ddpm).parent):
        record = _read_json(folder / "asset.json")
        if isinstance(record, dict) and record.get("build") == "ddpm":
            shares = (record.get("h_share") or {}).get("by_t") or {}
            return {f"h_share t={t}": float(v["median"]) for t, v in shares.items()}
    return {}


@register("test_accuracy")
def test_accuracy(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Plain accuracy on the test split, in percent: the "unbiased accuracy" of LfF-style
    tables (Colored MNIST, Corrupted CIFAR-10), whose test split is unbiased."""
    test = (results.get("metrics") or {}).get("test") or {}
    return {} if test.get("accuracy") is None else {"test acc. (%)": _percent(test["accuracy"])}


@register("diffinject_content")
def diffinject_content(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """DiffInject's top-K content samples scored against the true bias-conflicting ones
    (``diffinject_content.json``; the method read no bias label, this is the record) and
    the number of synthetic images it planned."""
    record = _read_json(run_dir / "diffinject_content.json")
    if not isinstance(record, dict):
        return {}
    truth = record.get("content_against_true_groups") or {}
    return {
        "top-K truly conflicting (precision)": truth.get("precision"),
        "synthetic planned": record.get("n_synthetic"),
    }


#: Columns of the DiffInject sample grid (the first synthetic images, in key order).
SAMPLE_COLUMNS = 12


@register("diffinject_samples")
def diffinject_samples(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """A grid of DiffInject's first synthetic images (rows: content, style, injected),
    written once as ``diffinject_samples.png`` in the run folder; the content and style
    images come from the run's own data config (read again, nothing trained)."""
    from PIL import Image

    from unspur.config import config_from_dict
    from unspur.generate.store import SyntheticStore

    root = run_dir / "diffinject_synthetic"
    path = run_dir / "diffinject_samples.png"
    if not path.is_file():
        if not root.is_dir() or not results.get("config"):
            return {}
        store = SyntheticStore(root)
        rows = [store.done()[k] for k in sorted(store.done())][:SAMPLE_COLUMNS]
        rows = [r for r in rows if "content_index" in (r.get("extra") or {})]
        if not rows:
            return {}
        from unspur.data.dataset import GroupDataset
        from unspur.pipeline import prepare_table

        table = prepare_table(config_from_dict(results["config"]))
        train = GroupDataset(table.split("train"), None)
        tile = 32
        canvas = Image.new("RGB", (tile * len(rows), tile * 3))
        for i, r in enumerate(rows):
            with Image.open(store.path(r["filename"])) as made:
                images = [train.raw(int(r["extra"]["content_index"])),
                          train.raw(int(r["extra"]["style_index"])), made.convert("RGB")]  # fmt: skip
            for j, image in enumerate(images):
                canvas.paste(image.resize((tile, tile)), (i * tile, j * tile))
        canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST).save(path)
    from unspur.bench.artefacts import Artefact  # published next to the table

    return {"samples (content / style / injected)": Artefact(path)}
