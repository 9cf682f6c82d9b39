"""Benchmark: DiffInject vs vanilla (ERM) and LfF on Colored MNIST, like the paper's Table 1.

One small P2-weighted DDPM (``--ddpm-size`` px, ``--ddpm-channels``) is trained once, on
the training images of the first seed's Colored MNIST (28 px resized to the DDPM size),
cached under ``--ddpm-dir`` and loaded by every DiffInject run
(``method.options.ddpm``); its training time is recorded.
Then, per setting and seed: ERM, LfF and DiffInject with the same CPU-sized classifier
recipe as ``bench/baselines.py`` (MLP, Adam 1e-3, 20 epochs). The test split is
unbiased (every colour equally often per digit), so its accuracy is the paper's
"unbiased accuracy". Writes ``bench/results/diffinject.md`` / ``.csv`` and a figure of
content / style / injected images (``diffinject_samples.png``).

Injection quality. For every DiffInject run a small digit judge (a CNN trained on the
seed's training digits with the colour removed: max over channels, scaled to max 1) and
a colour judge (nearest mean stroke colour of the training colours) score the synthetic
images: the share that shows the *content* image's digit (what the label says), the
share that shows the *style* image's digit (label noise), and the share with the style's
colour. They read the true colour labels, so they are a diagnostic of the benchmark only.

    python bench/diffinject.py --threads 1 --data-dir ../shared/data --seeds 0,1,2 \
        --di-option inv_steps=100 --di-option gen_steps=100

DiffInject runs with the method's official defaults (``int(0.1 * n_train)`` synthetic
images, 1000-step inversion and generation with injection on the 50-point replace grid,
gamma 0.7, t_edit 400; see :mod:`unspur.methods.diffinject`) unless ``--di-option``
changes them; the results record every option given.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    COLORED_MNIST,
    bench_arguments,
    data_overrides,
    failure_notes,
    run_setting,
    write_results,
)

PAPER = {  # Table 1 of the paper, Colored MNIST unbiased test accuracy (%)
    "colored_mnist-1%": {"erm": 32.59, "lff": 74.23, "diffinject": 85.58},
}
SETTINGS = {
    "colored_mnist-1%": (COLORED_MNIST + ["data.options.conflict_ratio=0.01"], "mnist"),
    "colored_mnist-5%": (COLORED_MNIST + ["data.options.conflict_ratio=0.05"], "mnist"),
}
METHODS = ["erm", "lff", "diffinject"]


def train_domain_ddpm(base: list[str], seed: int, out: Path, args) -> tuple[Path, float]:
    """Train the DDPM on the seed's training images; returns (model dir, seconds).

    Cached in ``out``: reused when it was trained with these settings for at least
    ``--ddpm-steps`` steps, resumed from ``out/checkpoint`` otherwise (``seconds``
    adds up the time of every session).
    """
    from unspur.config import load_config
    from unspur.generate.ddpm import build_ddpm_unet, train_ddpm
    from unspur.generate.training import GenerativeTrainConfig
    from unspur.pipeline import prepare_data

    model_dir = out / "ddpm"
    record = out / "seconds.json"
    settings = ddpm_settings(args)
    before = json.loads(record.read_text()) if record.is_file() else {}
    if before and before.get("settings") != settings:
        raise SystemExit(f"{out} holds a DDPM with other settings; use another --ddpm-dir")
    if (model_dir / "model_index.json").is_file() and before.get("steps", 0) >= args.ddpm_steps:
        return model_dir, before["seconds"]
    config = load_config(None, base + [f"seed={seed}"])
    train = prepare_data(config).train
    torch.manual_seed(seed)
    unet = build_ddpm_unet(
        args.ddpm_size, 3, block_out_channels=args.ddpm_channels, layers_per_block=1
    )
    started = time.perf_counter()
    train_ddpm(
        unet,
        train,
        GenerativeTrainConfig(
            steps=args.ddpm_steps,
            batch_size=args.ddpm_batch,
            learning_rate=args.ddpm_lr,
            warmup_steps=args.ddpm_warmup,
            ema_decay=0.9999,
            seed=seed,
            save_every=250,
            log_every=50,
        ),
        out,
        p2_gamma=1.0,
        p2_k=1.0,
    )
    seconds = before.get("seconds", 0.0) + time.perf_counter() - started
    record.write_text(
        json.dumps(
            {
                "seconds": seconds,
                "steps": args.ddpm_steps,
                "n_train": len(train),
                "settings": settings,
            }
        )
    )
    return model_dir, seconds


def ddpm_settings(args) -> dict:
    return {
        "size": args.ddpm_size,
        "channels": list(args.ddpm_channels),
        "batch": args.ddpm_batch,
        "lr": args.ddpm_lr,
        "warmup": args.ddpm_warmup,
    }


def h_share_note(base: list[str], args, ddpm_dir: Path, n: int = 32) -> str:
    """Median :func:`~unspur.generate.hspace.h_share` over ``n`` training pairs, by t."""
    from unspur.config import load_config
    from unspur.generate.ddpm import DiffusionImages, load_ddpm
    from unspur.generate.hspace import h_share
    from unspur.pipeline import prepare_data

    unet, scheduler = load_ddpm(ddpm_dir)
    train = prepare_data(load_config(None, base + [f"seed={args.seed_list[0]}"])).train
    images = DiffusionImages(train, image_size=int(unet.config.sample_size))
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    x = torch.stack([images[int(i)]["x"] for i in picked])
    shares = {
        t: float(h_share(unet, scheduler, x, x.roll(1, 0), t).median()) for t in (700, 500, 300)
    }
    return (
        "swapping h alone moves the predicted x0 "
        + ", ".join(f"{share:.2f} (t={t})" for t, share in shares.items())
        + " of the way to the other image's (median of "
        + f"{n} pairs; 0 = the decoder ignores h, 1 = h decides)"
    )


def injection_quality(run_dir: Path, train) -> dict[str, float]:
    """Digit / colour judges on the synthetic images (see the module docstring)."""
    import pandas as pd
    import torch.nn.functional as F
    from PIL import Image
    from torch import nn

    def tensor(image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize((28, 28)), dtype=np.float32) / 255
        return torch.from_numpy(array).permute(2, 0, 1)

    def shape(x: torch.Tensor) -> torch.Tensor:
        grey = x.max(dim=1, keepdim=True).values
        return grey / grey.flatten(1).max(1).values.clamp_min(1e-3).view(-1, 1, 1, 1)

    def colour(x: torch.Tensor) -> torch.Tensor:
        w = x.max(dim=1).values ** 4
        mean = (x * w.unsqueeze(1)).flatten(2).sum(2) / w.flatten(1).sum(1, keepdim=True)
        return mean / mean.max(1, keepdim=True).values.clamp_min(1e-3)

    images = torch.stack([tensor(train.raw(i)) for i in range(len(train))])
    y, a = train.y.long(), train.a.long()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    judge = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(judge.parameters(), 1e-3)
    grey = shape(images)
    for _ in range(4):
        order = torch.randperm(len(grey), generator=generator)
        for i in range(0, len(grey), 128):
            batch = order[i : i + 128]
            loss = F.cross_entropy(judge(grey[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    judge.eval()
    centroids = torch.stack([colour(images[a == c]).mean(0) for c in range(int(a.max()) + 1)])

    store = run_dir / "diffinject_synthetic"
    manifest = pd.read_csv(store / "manifest.csv")
    fake = torch.stack([tensor(Image.open(store / f)) for f in manifest.filename])
    content = torch.as_tensor(manifest.extra_content_index.to_numpy(), dtype=torch.long)
    style = torch.as_tensor(manifest.extra_style_index.to_numpy(), dtype=torch.long)
    with torch.no_grad():
        digit = judge(shape(fake)).argmax(1)
    hue = torch.cdist(colour(fake), centroids).argmin(1)
    return {
        "content_digit": float((digit == y[content]).float().mean()),
        "style_digit": float((digit == y[style]).float().mean()),
        "style_colour": float((hue == a[style]).float().mean()),
        "content_digit_and_style_colour": float(
            ((digit == y[content]) & (hue == a[style])).float().mean()
        ),
    }


def sample_figure(run_dir: Path, path: Path, n: int = 12) -> None:
    """Rows: content, style, injected (the first ``n`` synthetic images)."""
    import pandas as pd
    from PIL import Image

    from unspur.config import load_config
    from unspur.pipeline import prepare_data

    manifest = pd.read_csv(run_dir / "diffinject_synthetic" / "manifest.csv").head(n)
    config = load_config(run_dir / "config.yaml")
    train = prepare_data(config).train
    tile = 28
    canvas = Image.new("RGB", (tile * len(manifest), tile * 3))
    for i, r in enumerate(manifest.itertuples()):
        images = [
            train.raw(int(r.extra_content_index)),
            train.raw(int(r.extra_style_index)),
            Image.open(run_dir / "diffinject_synthetic" / r.filename).convert("RGB"),
        ]
        for j, image in enumerate(images):
            canvas.paste(image.resize((tile, tile)), (i * tile, j * tile))
    canvas.resize((canvas.width * 3, canvas.height * 3), Image.NEAREST).save(path)


def main() -> int:
    import argparse

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--ddpm-steps", type=int, default=3250)
    own.add_argument("--ddpm-batch", type=int, default=16)
    own.add_argument("--ddpm-lr", type=float, default=5e-4)
    own.add_argument("--ddpm-warmup", type=int, default=200)
    own.add_argument("--ddpm-size", type=int, default=32)
    own.add_argument("--ddpm-channels", default="32,64,64,128", help="block_out_channels")
    own.add_argument("--di-option", action="append", default=[], help="KEY=VALUE")
    own.add_argument("--ddpm-dir", type=Path, default=Path("runs/bench_diffinject_ddpm4"))
    mine, rest = own.parse_known_args()
    full_argv = sys.argv
    sys.argv = [sys.argv[0], *rest]
    args = bench_arguments(__doc__.splitlines()[0], "diffinject", methods=METHODS)
    sys.argv = full_argv  # the results record the whole command
    args.ddpm_steps, args.ddpm_batch, args.ddpm_lr = mine.ddpm_steps, mine.ddpm_batch, mine.ddpm_lr
    args.ddpm_warmup, args.ddpm_size = mine.ddpm_warmup, mine.ddpm_size
    args.ddpm_channels = tuple(int(c) for c in mine.ddpm_channels.split(","))
    args.di_options = mine.di_option
    methods = args.methods.split(",")
    rows, failures, notes = [], [], []
    ddpm_root = mine.ddpm_dir  # model weights: kept out of bench/results (runs/ is ignored)
    for name in args.only_list or ["colored_mnist-1%"]:
        overrides, needs = SETTINGS[name]
        extra = data_overrides(needs, args.data_dir, name)
        if extra is None:
            continue
        base = overrides + extra
        ddpm_dir, ddpm_seconds = train_domain_ddpm(base, args.seed_list[0], ddpm_root, args)
        notes.append(
            f"DDPM for {name}: {args.ddpm_size} px, channels {args.ddpm_channels} (one res "
            f"block per level, h = the {args.ddpm_channels[-1]}-channel middle block at "
            f"{args.ddpm_size // 2 ** (len(args.ddpm_channels) - 1)} px), {args.ddpm_steps} "
            f"steps, batch {args.ddpm_batch}, lr {args.ddpm_lr} ({args.ddpm_warmup} warm-up), "
            f"EMA 0.9999, P2 gamma=1 k=1, trained once on seed {args.seed_list[0]}'s training "
            f"images in {ddpm_seconds / 60:.1f} min ({torch.get_num_threads()} thread)."
        )
        if args.di_options:
            notes.append(f"DiffInject options for {name}: {', '.join(args.di_options)}.")
        notes.append(f"h share of this DDPM ({name}): {h_share_note(base, args, ddpm_dir)}.")
        for seed in args.seed_list:
            for method in methods:
                options = []
                if method == "diffinject":
                    options = [f"method.options.ddpm={ddpm_dir}"] + [
                        f"method.options.{o}" for o in args.di_options
                    ]
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        results = run_setting(
                            base + [f"method.name={method}"] + options, seed, Path(tmp)
                        )
                    except Exception as exc:  # keep the other rows
                        failures.append(f"| {name} {method} | seed {seed} | {exc} |")
                        print(f"FAILED {name} {method} {seed}: {exc}", file=sys.stderr)
                        continue
                    if method == "diffinject" and seed == args.seed_list[0]:
                        sample_figure(Path(tmp), args.out / f"{args.stem}_samples.png")
                        content = json.loads((Path(tmp) / "diffinject_content.json").read_text())
                        prec = content["content_against_true_groups"]
                        notes.append(
                            f"{name} seed {seed}: top-K content samples are truly bias-"
                            f"conflicting with precision {prec['precision']:.2f} "
                            f"({prec['n_correct']}/{prec['n_predicted']}); "
                            f"{content['n_synthetic']} synthetic images."
                        )
                    if method == "diffinject":
                        from unspur.config import load_config
                        from unspur.pipeline import prepare_data

                        run_train = prepare_data(load_config(Path(tmp) / "config.yaml")).train
                        quality = injection_quality(Path(tmp), run_train)
                        notes.append(
                            f"{name} seed {seed}: synthetic images judged to show the "
                            f"content digit {quality['content_digit']:.0%}, the style digit "
                            f"{quality['style_digit']:.0%}, the style colour "
                            f"{quality['style_colour']:.0%}; content digit in the style "
                            f"colour {quality['content_digit_and_style_colour']:.0%}."
                        )
                test = results["metrics"]["test"]
                rows.append(
                    {
                        "setting": name,
                        "method": method,
                        "supervision": results["supervision"]["symbol"],
                        "seed": seed,
                        "unbiased_accuracy": round(100 * test["accuracy"], 2),
                        "worst_group_accuracy": round(100 * test["worst_group_accuracy"], 2),
                        "average_accuracy": round(100 * test["average_accuracy"], 2),
                        "balanced_accuracy": round(100 * test["balanced_accuracy"], 2),
                        "paper": PAPER.get(name, {}).get(method, ""),
                        "selection": results["selection"]["rule"],
                        "wall_seconds": round(results["bench_wall_seconds"], 1),
                    }
                )
                print(rows[-1], flush=True)
                write_results(
                    rows, args.out, args.stem, summary(rows, notes) + failure_notes(failures)
                )
    return 0


def summary(rows: list[dict], notes: list[str]) -> list[str]:
    lines = ["## Unbiased test accuracy, mean ± std over seeds (paper: Table 1)", ""]
    lines += ["| setting | method | unbiased accuracy | seeds | paper |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["setting"], r["method"]) for r in rows))
    for setting, method in keys:
        values = np.array(
            [
                r["unbiased_accuracy"]
                for r in rows
                if (r["setting"], r["method"]) == (setting, method)
            ]
        )
        paper = PAPER.get(setting, {}).get(method, "n/a")
        lines.append(
            f"| {setting} | {method} | {values.mean():.2f} ± {values.std():.2f} | "
            f"{len(values)} | {paper} |"
        )
    return lines + ["", "## Notes", "", *[f"- {n}" for n in notes], ""]


if __name__ == "__main__":
    sys.exit(main())
