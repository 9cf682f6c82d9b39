"""Benchmark: Clustered DreamBooth's four generation modes vs ERM and GroupDRO at 0.999 bias.

Synthetic benchmark (shape = class, background = bias), 99.9% bias, 2,000 training
images at 32 px (the aligned groups hold 999 images, the conflicting ones 1), small
CNN. Per seed: ERM, GroupDRO, then ``clustered_dreambooth`` with ``mode`` in
vanilla / lora / dreambooth / clustered_dreambooth.

The generator plays Stable Diffusion's part: a model pretrained on *external* data that
the method then fine-tunes per group / cluster. Here it is a domain model
(:mod:`unspur.generate.domain`) trained on an independent, group-balanced draw of the
synthetic benchmark (bias 0.5, data seed 1000, 2,000 images, 32 px, default config) -
the FFR bench's external generator. ``--domain DIR`` names one; by default
``--work/domain_model_external`` or the FFR bench's copy are used when finished, else
one is trained in ``--work/domain_model_external`` (about an hour on one thread).

CPU reductions (recorded with the table; the method's defaults are the paper's):
``n_per_group`` 160 (M = the largest group, 999, by default), DDIM ``--gen-steps`` 15,
LoRA ``--lora-steps`` 100 at batch 4 and lr 1e-3 (default: 500 at batch 1, lr 1e-4),
``max_clusters`` ``--max-clusters`` 4 (the k_D rule gives 20 here), the CLIP is ``tiny``
(random initialisation: no CLIP weights exist offline, so the clusters are
random-feature clusters and the CLIP filter is close to the random ablation). Guidance
7.5 (Stable Diffusion's usual value; the domain model records 4.0).

Every mode's kept synthetic images are labelled by a shape judge and a background judge
(small CNNs trained on real, group-balanced images of a separate draw), to show whether
the conflicting groups carry the wanted shape and background; a grid of samples per
mode is written next to the results.

    python bench/clustered_dreambooth.py --threads 1 --seeds 0,1,2

Runs live in ``--work`` and are reused when the bench is rerun (a finished run is read
back, not trained again). Writes ``clustered_dreambooth.md`` / ``.csv`` to ``--out``.
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
from common import SYNTHETIC, Judges, failure_notes, markdown, row, write_results  # noqa: E402

SETTING = "synthetic-99.9"
BASE = SYNTHETIC + ["data.options.bias=0.999"]
MODES = ("clustered_dreambooth", "vanilla", "dreambooth", "lora")
#: The independent, group-balanced draw the external generator is trained on.
EXTERNAL = [
    "data.name=synthetic",
    "data.options.n_train=2000",
    "data.options.bias=0.5",
    "data.options.seed=1000",
]
#: CPU stand-in: 100 LoRA steps do not bind the group's background to [V], so the
#: identifier prompt names it (the paper's template is "photo of a {identifier} {class}").
IDENTIFIER = "photo of a {identifier} {class} on {bias}"
#: The external generator bench/ffr.py trains (same config and data), reused when present.
FFR_EXTERNAL = Path("runs/bench/ffr/domain_model_external")
#: The seed paper's UTKFace 0.999 worst-group accuracies (Table 1), for reference.
PAPER = {"erm": 31.0, "groupdro": 30.5, "clustered_dreambooth": 60.5}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--mode-seeds", default=None, help="seeds for the modes other than clustered_dreambooth"
    )
    parser.add_argument("--baselines", default="erm,groupdro")
    parser.add_argument(
        "--baseline-seeds", default=None, help="seeds for groupdro (erm runs every seed)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/bench/clustered_dreambooth"))
    parser.add_argument("--domain", type=Path, default=None)
    parser.add_argument("--n-per-group", type=int, default=160)
    parser.add_argument("--gen-steps", type=int, default=15)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--lora-steps", type=int, default=100)
    parser.add_argument("--max-clusters", type=int, default=4)
    parser.add_argument("--head-lr", type=float, default=0.001)
    parser.add_argument("--judge", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--set", action="append", default=[], help="extra method override")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--stem", default="clustered_dreambooth")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.mode_seed_list = (
        [int(s) for s in args.mode_seeds.split(",")] if args.mode_seeds else args.seed_list
    )
    args.baseline_seed_list = (
        [int(s) for s in args.baseline_seeds.split(",")] if args.baseline_seeds else args.seed_list
    )
    return args


def domain_model(args) -> tuple[Path, str]:
    """The external generator and where it came from."""
    from unspur.config import load_config
    from unspur.generate.domain import DomainModelConfig, train_domain_model
    from unspur.pipeline import prepare_table

    what = "an independent group-balanced draw of the benchmark (bias 0.5, data seed 1000)"
    if args.domain is not None:
        return args.domain, f"given ({args.domain})"
    own = args.work / "domain_model_external"
    for candidate in (own, FFR_EXTERNAL):
        if (candidate / "domain.json").is_file():
            return candidate, f"{candidate}: default config, 32 px, trained on {what}"
    table = prepare_table(load_config(None, EXTERNAL + ["seed=0"]))
    started = time.perf_counter()
    model = train_domain_model(table, own, DomainModelConfig())
    took = (time.perf_counter() - started) / 60
    return model.out_dir, f"trained here ({took:.0f} min), default config, 32 px, on {what}"


def run_one(overrides: list[str], seed: int, directory: Path) -> dict:
    from unspur.config import load_config
    from unspur.pipeline import run

    config = load_config(None, overrides + [f"seed={seed}", "train.progress=false"])
    started = time.perf_counter()
    results = run(config, directory)
    # A finished run is read back, not retrained: report the time it took when it ran.
    results["bench_wall_seconds"] = results.get("wall_seconds", time.perf_counter() - started)
    return results


# ------------------------------------------------------------------ diagnostics
def kept_images(run_dir: Path, mode: str):
    """The kept synthetic images of a finished mode run: frame (key, g, ...) and images."""
    import pandas as pd

    from unspur.generate.store import SyntheticStore

    directory = run_dir / "clustered_dreambooth" / mode
    frame = pd.read_csv(directory / "filter.csv")
    frame = frame[frame["selected"].astype(bool)].reset_index(drop=True)
    store = SyntheticStore(directory / "synthetic")
    return frame, [store.image(key) for key in frame["key"]]


def judge_rows(judges: Judges, run_dir: Path, mode: str, seed: int, names) -> list[dict]:
    frame, images = kept_images(run_dir, mode)
    labels = judges(images)
    rows = []
    for g, part in frame.groupby("g"):
        y, a = divmod(int(g), 2)
        index = part.index.to_numpy()
        shape = labels["shape"][index] == y
        background = labels["background"][index] == a
        rows.append({
            "seed": seed, "mode": mode, "group": names[int(g)], "conflicting": y != a,
            "kept": len(part), "shape right %": round(100 * shape.mean(), 1),
            "background right %": round(100 * background.mean(), 1),
            "both right %": round(100 * (shape & background).mean(), 1),
        })  # fmt: skip
    return rows


def sample_grid(run_dir: Path, mode: str, path: Path, per_group: int = 12) -> None:
    """One row per group: the first ``per_group`` kept images, 3x nearest upscaling."""
    from PIL import Image

    frame, images = kept_images(run_dir, mode)
    groups = sorted(set(frame["g"]))
    size = images[0].size[0]
    grid = Image.new("RGB", (per_group * size, len(groups) * size), "white")
    for r, g in enumerate(groups):
        for c, i in enumerate(frame.index[frame["g"] == g][:per_group]):
            grid.paste(images[i].convert("RGB"), (c * size, r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)


def stage2_ablation(run_dir: Path, mode: str, seed: int) -> dict:
    """Test worst-group accuracy of the stage-1 model alone and of stage-2 heads.

    The selected stage-1 model's features of the real splits; a head trained on all real
    training data with class-balanced sampling (SGD, momentum 0.9, weight decay 1e-4,
    batch 64, 20 epochs), started from the stage-1 softmax layer (``finetune``) or from
    a re-initialised one (``fresh``), at lr 1e-2 (last_layer's default) and 1e-3; each
    selected by validation worst-group accuracy, as the method does.
    """
    import copy

    from unspur.config import load_config
    from unspur.models.checkpoint import load_weights
    from unspur.models.factory import build_model
    from unspur.pipeline import prepare_data

    prepared = prepare_data(load_config(None, BASE + [f"seed={seed}"]))
    model = build_model("small_cnn", 2)
    load_weights(model, run_dir / "clustered_dreambooth" / mode / "pretrain" / "best")
    model.eval()

    def features(dataset):
        view = copy.copy(dataset)
        view.transform = prepared.eval_transform
        parts = [[], [], []]
        with torch.no_grad():
            for x, y, g, *_ in torch.utils.data.DataLoader(view, 256):
                parts[0].append(model(x, return_features=True)[1])
                parts[1].append(y)
                parts[2].append(g)
        return [torch.cat(p) for p in parts]

    train, val, test = (features(d) for d in (prepared.train, prepared.val, prepared.test))

    def wga(head, split) -> float:
        with torch.no_grad():
            right = head(split[0]).argmax(1) == split[1]
        return round(100 * min(float(right[split[2] == g].float().mean()) for g in range(4)), 1)

    out = {"seed": seed, "mode": mode, "stage 1 only": wga(model.head, test)}
    weights = 1.0 / torch.bincount(train[1]).float()[train[1]]
    for init in ("finetune", "fresh"):
        for lr in (0.01, 0.001):
            torch.manual_seed(seed)
            head = copy.deepcopy(model.head)
            if init == "fresh":
                head.reset_parameters()
            optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
            best = (-1.0, 0.0)
            for _ in range(20):
                order = torch.multinomial(weights, len(weights), replacement=True)
                for i in range(0, len(order), 64):
                    b = order[i : i + 64]
                    loss = torch.nn.functional.cross_entropy(head(train[0][b]), train[1][b])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                score = wga(head, val)
                if score > best[0]:
                    best = (score, wga(head, test))
            out[f"{init} lr {lr}"] = best[1]
    return out


def paper_rows(rows: list[dict]) -> list[dict]:
    out = []
    for method in ("erm", "groupdro", "vanilla", "lora", "dreambooth", "clustered_dreambooth"):
        values = [r["worst_group_accuracy"] for r in rows if r["method"] == method]
        ours = (
            f"{np.mean(values):.1f} ± {np.std(values):.1f} ({len(values)} seeds)"
            if values
            else "not run"
        )
        out.append({
            "method": method,
            "paper UTKFace 0.999 WGA": PAPER.get(method, "not given"),
            "ours synthetic 0.999 WGA": ours,
            "ours UTKFace 0.999 WGA": "not run",
        })  # fmt: skip
    return out


def main() -> None:
    args = arguments()
    args.work.mkdir(parents=True, exist_ok=True)
    domain, domain_note = domain_model(args)
    print("domain model:", domain_note, flush=True)
    options = [
        f"method.options.generator={domain}",
        "method.options.clip=tiny",
        f"method.options.n_per_group={args.n_per_group}",
        f"method.options.steps={args.gen_steps}",
        f"method.options.guidance_scale={args.guidance}",
        f"method.options.max_clusters={args.max_clusters}",
        f"method.options.lora={{steps: {args.lora_steps}, batch_size: 4, learning_rate: 0.001, "
        "save_every: 1000}",
        f"method.options.identifier_template={IDENTIFIER}",
        f"method.options.head={{lr: {args.head_lr}, epochs: 20}}",
        *args.set,
    ]
    judges = Judges(BASE, args.work) if args.judge else None
    names = ["circle / land", "circle / water", "cross / land", "cross / water"]
    # Order: every run of the first seed; then ERM and clustered_dreambooth for the other
    # seeds; then the rest (so a run cut short still has the headline comparison).
    runs = []
    first = min(args.seed_list)
    for seed in sorted(set(args.seed_list) | set(args.mode_seed_list)):
        for m in args.baselines.split(","):
            wanted = args.seed_list if m == "erm" else args.baseline_seed_list
            if m and seed in wanted:
                tier = 0 if seed == first else (1 if m == "erm" else 2)
                runs.append((tier, seed, m, [f"method.name={m}"]))
        for mode in args.modes.split(","):
            wanted = args.seed_list if mode == "clustered_dreambooth" else args.mode_seed_list
            if mode and seed in wanted:
                tier = 0 if seed == first else (1 if mode == "clustered_dreambooth" else 2)
                runs.append((tier, seed, mode, ["method.name=clustered_dreambooth",
                                                f"method.options.mode={mode}", *options]))  # fmt: skip
    runs = [r[1:] for r in sorted(runs, key=lambda r: (r[0], r[1]))]
    rows, costs, judged, failures, ablation = [], [], [], [], []
    for seed, label, overrides in runs:
        directory = args.work / f"seed{seed}" / label
        print(f"== seed {seed} {label}", flush=True)
        try:
            results = run_one(BASE + overrides, seed, directory)
        except Exception as exc:  # noqa: BLE001 - a bench goes on and reports why
            failures.append(f"| {label} | seed {seed} | {str(exc).splitlines()[0]} |")
            print(f"FAILED {label} seed {seed}: {exc}", flush=True)
            continue
        entry = row(SETTING, seed, results)
        entry["method"] = label
        entry["paper_utkface_wga"] = PAPER.get(label, "")
        summary = directory / "clustered_dreambooth" / label / "summary.json"
        entry["stage1_val_wga"] = ""
        if summary.is_file():
            info = json.loads(summary.read_text())
            stage1 = (info["stage1"]["val"] or {}).get("worst_group_accuracy")
            entry["stage1_val_wga"] = "" if stage1 is None else round(100 * stage1, 1)
            cost = info["cost"]
            generation = cost.get("generation", {})
            costs.append({
                "seed": seed, "mode": label, "k_D": info["k_D"],
                "models": sum(1 for g in info["generators"] if g["lora_dir"]),
                "lora_train_s": cost.get("lora_training", 0.0),
                "generation_s": generation.get("seconds", 0.0),
                "s_per_image": generation.get("seconds_per_image", ""),
                "clip_filter_s": cost.get("clip_filter", {}).get("seconds", 0.0),
                "stage1_s": cost.get("stage1", {}).get("seconds", 0.0),
                "stage2_s": cost.get("stage2", {}).get("seconds", 0.0),
                "run_s": entry["wall_seconds"],
                "kept_per_group": info["synthetic_per_group"],
            })  # fmt: skip
            if judges is not None:
                judged += judge_rows(judges, directory, label, seed, names)
            if args.ablation and label == "clustered_dreambooth":
                ablation.append(stage2_ablation(directory, label, seed))
            if seed == args.mode_seed_list[0]:
                sample_grid(directory, label, args.out / f"{args.stem}_samples_{label}.png")
        rows.append(entry)
        print(entry, flush=True)
        notes = [
            f"Generator: {domain_note}. Method options: {options}.",
            "",
            "Paper column: the seed paper's UTKFace 0.999 worst-group accuracy "
            "(a different dataset; for orientation only). stage1_val_wga: validation "
            "worst-group accuracy of the selected stage-1 (synthetic-only) model.",
            "",
            "## Beside the paper",
            "",
            *markdown(paper_rows(rows)),
            "",
            "## Cost per mode (seconds, this machine, shared with other jobs)",
            "",
            *markdown(costs),
            "",
        ]
        if judges is not None:
            notes += [
                "## What the generator drew (kept images)",
                "",
                "Judges: small CNNs trained on real, group-balanced images (a separate draw, "
                f"seed 7); test accuracy on real images: shape {judges.accuracy['shape']}%, "
                f"background {judges.accuracy['background']}%.",
                "",
                *markdown(judged),
                "",
            ]
        if ablation:
            notes += [
                "## Stage 2 on this benchmark (clustered_dreambooth runs)",
                "",
                "Test worst-group accuracy of the selected stage-1 model alone, and of a "
                "class-balanced head on the real training features (20 epochs, selected by "
                "validation worst-group accuracy) started from the stage-1 softmax layer "
                "(`finetune`, the method's default) or re-initialised (`fresh`), at lr 1e-2 "
                "(last_layer's default) and 1e-3 (the bench's `head` lr). Recomputed here "
                "with plain torch, so it can differ slightly from the run's own number.",
                "",
                *markdown(ablation),
                "",
            ]
        write_results(rows, args.out, args.stem, notes + failure_notes(failures))


if __name__ == "__main__":
    main()
