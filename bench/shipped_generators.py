"""The shipped generators judged: does ``unspur:synthetic-domain`` draw the prompted shape
and background, and does its inpainting model repaint the object?

The same judging as bench/domain_model.py (whose judges, grids and masks this script
imports): two small CNNs trained on real, group-balanced images of a separate draw
(data seed 100) label every generated image's shape and background, and a fixed colour
rule labels the background a second time. Text to image: every (class, background)
prompt at guidance 4 and 7.5. Inpainting: the object region of the benchmark's own test
images (data seed 0, never seen by the generator) repainted with the other class's (or,
as a control, the same class's) caption on the image's background.

``--compare DIR`` also judges a domain-model directory with the same seeds (the recipe's
fp32 model in its ``--work``/model), to show what shipping fp16 weights changes.

    python bench/shipped_generators.py --threads 1 [--compare DIR]

Writes ``shipped_generators.md`` and the grids ``shipped_generators_samples.png`` /
``shipped_generators_inpaint.png`` to ``--out``; judges are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from domain_model import border_rule, box, dilate, grid, judge, swap_target, train_judge
from PIL import Image

from unspur.data.registry import load_dataset
from unspur.generate.domain import load_domain_model
from unspur.generate.engine import domain_model_dir
from unspur.generate.shipped import CARD_FILE

MASKS = (("object mask +2 px", lambda m: dilate(m, 2)), ("object box +2 px", lambda m: box(m, 2)))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="unspur:synthetic-domain")
    parser.add_argument("--compare", type=Path, default=None, help="a domain-model directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/shipped_generators"))
    parser.add_argument("--per-prompt", type=int, default=25)
    parser.add_argument("--inpaint-per-group", type=int, default=25)
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--guidance", default="4,7.5", help="comma-separated; first is main")
    parser.add_argument("--judge-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stem", default="shipped_generators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.guidance_list = [float(g) for g in args.guidance.split(",")]
    return args


def judge_all(images, y, a, judges) -> tuple[float, float, float]:
    shape_judge, bg_judge = judges
    return (
        float((judge(shape_judge, images) == y).mean()),
        float((judge(bg_judge, images) == a).mean()),
        float((border_rule(images) == a).mean()),
    )


def text_to_image(model, args, judges):
    """Rows (guidance, prompt, y, a, shape, background CNN, background rule), the images
    at the main guidance, and the images per second."""
    pipe = model.load_pipeline("text2image")
    rows, images_main, seconds, count = [], {}, 0.0, 0
    for guidance in args.guidance_list:
        for y in range(len(model.class_names)):
            for a in range(len(model.attr_names)):
                prompt = model.caption(y, a)
                clock = time.perf_counter()
                images = pipe(
                    prompt,
                    num_images_per_prompt=args.per_prompt,
                    num_inference_steps=args.ddim_steps,
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(1000 * args.seed + 10 * y + a),
                ).images
                seconds += time.perf_counter() - clock
                count += len(images)
                rows.append((guidance, prompt, y, a, *judge_all(images, y, a, judges)))
                if guidance == args.guidance_list[0]:
                    images_main[(y, a)] = images
                print(f"g={guidance} {prompt!r}: {rows[-1][4:]}", flush=True)
    return rows, images_main, count / seconds


def inpainting(model, args, judges, test):
    """Rows (mask kind, target kind, judged as prompted, background kept), grid rows."""
    frame = test.frame
    rng = np.random.default_rng(args.seed)
    picks = []
    for y in range(test.n_classes):
        for a in range(test.n_attrs):
            rows_ya = np.flatnonzero((frame.y == y).to_numpy() & (frame.a == a).to_numpy())
            picks.extend(rng.permutation(rows_ya)[: args.inpaint_per_group].tolist())
    originals = [test.store.open(frame.filename.iloc[i]).convert("RGB") for i in picks]
    objects = [np.asarray(test.mask_store.open(frame["mask"].iloc[i])) >= 128 for i in picks]
    ys, as_ = frame.y.to_numpy()[picks], frame.a.to_numpy()[picks]
    pipe = model.load_pipeline("inpaint")
    results, rows = [], []
    show = list(range(0, len(picks), max(1, len(picks) // 10)))[:10]
    rows.append([originals[i] for i in show])
    for mask_kind, make in MASKS:
        masks = [make(m) for m in objects]
        for target_kind in ("other class", "same class"):
            targets = (1 - ys) if target_kind == "other class" else ys
            prompts = [model.caption(int(t), int(a)) for t, a in zip(targets, as_)]
            outputs = []
            for start in range(0, len(picks), 25):
                part = slice(start, start + 25)
                outputs += pipe(
                    prompts[part],
                    image=originals[part],
                    mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks[part]],
                    num_inference_steps=args.ddim_steps,
                    guidance_scale=args.guidance_list[0],
                    generator=torch.Generator().manual_seed(args.seed + start),
                ).images
            pasted = [
                Image.fromarray(np.where(m[..., None], np.asarray(o), np.asarray(im)))
                for o, m, im in zip(outputs, masks, originals)
            ]
            new_class = float((judge(judges[0], pasted) == targets).mean())
            kept_bg = float((judge(judges[1], pasted) == as_).mean())
            results.append((mask_kind, target_kind, new_class, kept_bg))
            print(f"inpaint {mask_kind} / {target_kind}: {new_class:.2f} {kept_bg:.2f}", flush=True)
            if target_kind == "other class":
                rows.append([Image.fromarray(masks[i].astype(np.uint8) * 255) for i in show])
                rows.append([pasted[i] for i in show])
    return results, rows


def evaluate(model, args, judges, test) -> dict:
    clock = time.perf_counter()
    t2i, images, rate = text_to_image(model, args, judges)
    inpaint, inpaint_rows = inpainting(model, args, judges, test)
    return {"t2i": t2i, "images": images, "rate": rate, "inpaint": inpaint,
            "inpaint_rows": inpaint_rows, "seconds": time.perf_counter() - clock}  # fmt: skip


def main() -> None:
    args = arguments()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shipped = load_domain_model(domain_model_dir(args.generator, args.work))
    card = json.loads((shipped.out_dir / CARD_FILE).read_text())  # a name or an export

    judge_table = load_dataset(
        "synthetic", n_train=3000, n_val=400, n_test=800, bias=0.5, seed=args.seed + 100
    )
    shape_judge, shape_real = train_judge(
        judge_table, args.work / "judge_shape_robust", args.judge_epochs, args.seed
    )
    bg_judge, bg_real = train_judge(
        swap_target(judge_table), args.work / "judge_background_robust", args.judge_epochs,
        args.seed,
    )  # fmt: skip
    judges = (shape_judge, bg_judge)
    # The benchmark's own test split (data seed 0, balanced): never seen by the generator.
    test = load_dataset("synthetic", n_train=2000, n_val=0, n_test=400, bias=0.99, seed=0)
    test = test.split("test")

    results = {"shipped": evaluate(shipped, args, judges, test)}
    grid([results["shipped"]["images"][k][:12] for k in sorted(results["shipped"]["images"])]).save(
        args.out / f"{args.stem}_samples.png"
    )
    grid(results["shipped"]["inpaint_rows"]).save(args.out / f"{args.stem}_inpaint.png")
    if args.compare is not None:
        results["fp32"] = evaluate(load_domain_model(args.compare), args, judges, test)
        diffs = [
            np.abs(
                np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)
            ).mean()
            for key in results["shipped"]["images"]
            for a, b in zip(results["shipped"]["images"][key], results["fp32"]["images"][key])
        ]  # fmt: skip
        results["pixel_diff"] = float(np.mean(diffs))
    write_report(args, command, card, results, shape_real, bg_real, time.perf_counter() - started)


def write_report(args, command, card, results, shape_real, bg_real, total) -> None:
    data, cost = card["data"], card["cost"]
    groups = data["groups"]
    lines = [
        "# The shipped generators, judged",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), no GPU; 2 cores shared with other jobs, so "
        "times are indicative.  ",
        f"Total wall time of this script: {total / 60:.1f} min.",
        "",
        f"## `{args.generator}`",
        "",
        f"Trained by `{card['command']}` on its own draw of the synthetic benchmark: data "
        f"seed {data['data_seed']}, bias {data['bias']}, {data['n_images']} images at "
        f"{data['image_size']} px ({', '.join(f'{k}: {v}' for k, v in groups.items())}); "
        f"disjoint from the benchmark: "
        f"{'yes' if data['disjoint_from_benchmark']['disjoint'] else 'NO'} (no image "
        "pixel-identical to one of the benchmark's draws). Labels seen: "
        f"{card['labels_seen']['statement']}. Steps {card['steps']}, model seed "
        f"{card['model_seed']}; {cost['threads']} thread(s), wall "
        f"{cost['wall_seconds_total'] / 60:.1f} min, CPU {cost['cpu_seconds_total'] / 60:.1f} "
        f"min (shared cores: the wall time includes waiting); torch "
        f"{card['versions']['torch']}, diffusers {card['versions']['diffusers']}, commit "
        f"{card['git_commit']}. Shipped as {card['weights_dtype']}, "
        f"{card['size_bytes'] / 1e6:.1f} MB for both pipelines.",
        "",
        "Judges (as bench/results/domain_model.md): small CNNs trained on 3,000 real "
        "group-balanced images (data seed 100) with blur/noise/contrast jitter; accuracy on "
        f"real balanced test images: shape {100 * shape_real:.1f}%, background "
        f"{100 * bg_real:.1f}%; chance 50%. The rule: water when the median blue minus "
        "green over the 3-pixel border is positive.",
        "",
    ]
    names = [k for k in ("shipped", "fp32") if k in results]
    header = " | ".join(
        f"{n}: shape | {n}: background (CNN) | {n}: background (rule)" for n in names
    )
    lines += [
        f"## Text to image (DDIM {args.ddim_steps} steps, {args.per_prompt} images per prompt)",
        "",
        "`shipped` = the fp16 files as installed (computed in fp32 on a CPU)"
        + ("; `fp32` = the recipe's fp32 model, same seeds." if "fp32" in results else "."),
        "",
        f"| guidance | prompt | group | training images | {header} |",
        "|---|---|---|---|" + "---|" * (3 * len(names)),
    ]
    majority = data.get("majority_attr", {})
    for i, row in enumerate(results["shipped"]["t2i"]):
        guidance, prompt, y, a = row[:4]
        cls, bg = data["class_names"][y], data["attr_names"][a]
        kind = "majority" if majority.get(cls) == bg else "minority"
        cells = " | ".join(
            " | ".join(f"{100 * v:.0f}%" for v in results[n]["t2i"][i][4:]) for n in names
        )
        lines.append(f"| {guidance:g} | {prompt} | {kind} | {groups[f'{cls} on {bg}']} | {cells} |")
    for guidance in args.guidance_list:
        cells = []
        for n in names:
            mine = [r for r in results[n]["t2i"] if r[0] == guidance]
            cells += [f"**{100 * np.mean([r[k] for r in mine]):.1f}%**" for k in (4, 5, 6)]
        lines.append(f"| {guidance:g} | **all prompts** | | | {' | '.join(cells)} |")
    lines += [
        "",
        f"Generation speed (shipped): {results['shipped']['rate']:.2f} images/s.",
    ]
    if "pixel_diff" in results:
        lines.append(
            f"fp16 vs fp32, same seeds, guidance {args.guidance_list[0]:g}: mean absolute "
            f"pixel difference {results['pixel_diff']:.2f} (of 255)."
        )
    lines += [
        "",
        f"Samples at guidance {args.guidance_list[0]:g}, rows = the four prompts in the "
        f"table's order, 12 each: `{args.stem}_samples.png`.",
        "",
        "## Inpainting",
        "",
        f"{args.inpaint_per_group} test images per group of the benchmark's own test split "
        f"(data seed 0, never seen by the generator), guidance {args.guidance_list[0]:g}; "
        "the object region is repainted with the caption of the other class on the "
        "image's own background (control: its own class); original pixels pasted back "
        "outside the mask.",
        "",
        "| mask | prompt | "
        + " | ".join(f"{n}: judged as prompted | {n}: background kept" for n in names)
        + " |",
        "|---|---|" + "---|" * (2 * len(names)),
    ]
    for i, (mask_kind, target_kind, *_rest) in enumerate(results["shipped"]["inpaint"]):
        cells = " | ".join(
            f"{100 * results[n]['inpaint'][i][2]:.0f}% | {100 * results[n]['inpaint'][i][3]:.0f}%"
            for n in names
        )
        lines.append(f"| {mask_kind} | {target_kind} | {cells} |")
    lines += [
        "",
        f"Examples (originals; per mask kind the mask and the other-class repaint): "
        f"`{args.stem}_inpaint.png`.",
        "",
    ]
    (args.out / f"{args.stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
