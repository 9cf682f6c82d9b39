"""Does a CPU DDPM's decoder read its bottleneck? Train one briefly and measure h_share.

DiffInject injects content through the U-Net bottleneck (h-space); that only works when
the decoder reads h (:func:`~unspur.generate.hspace.h_share`: swap h alone between two
images and see how far the predicted x0 moves, 0 = ignored, 1 = h decides). This script
trains the bench's CPU-sized P2 DDPM (``bench/diffinject.py``'s architecture) for a fixed
number of steps, optionally with training-time skip dropout
(:func:`~unspur.generate.ddpm.skip_dropout`), and measures h_share on held-out pairs.

Training data (disjoint from the benchmark's biased training split): the Colored MNIST
training digits coloured *unbiased* (``conflict_ratio=0.9``: every colour equally often
per digit, like MNIST pretraining with the colour made independent of the digit), with
colouring seed 100. No image of the biased split is used (every image is recoloured
independently of its label), but the digit shapes are the same 7200 digits, as the
paper's MNIST-pretrained ADM has seen CMNIST's source digits. h_share is measured on
``--pairs`` images of the *validation* split (never seen by the DDPM), each paired with
the next one (``roll(1)``), at t = 700, 500, 300; median and mean over the pairs.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/ddpm_hshare.py --data-dir ../shared/data \
        --steps 300 --out runs/ddpm_hshare/base
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with mnist/")
    parser.add_argument("--out", type=Path, required=True, help="model directory (runs/...)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", default="32,64,64,128")
    parser.add_argument("--skip-dropout", type=float, default=0.0, help="probability")
    parser.add_argument("--skip-levels", default="", help="up-block indices, e.g. 0,1")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from unspur.config import load_config
    from unspur.generate.ddpm import DiffusionImages, build_ddpm_unet, train_ddpm
    from unspur.generate.hspace import h_share
    from unspur.generate.training import GenerativeTrainConfig
    from unspur.pipeline import prepare_data

    data = [
        "data.name=colored_mnist",
        f"data.root={args.data_dir / 'mnist'}",
        "data.options.conflict_ratio=0.9",
        "data.image_size=28",
        "seed=100",
    ]
    splits = prepare_data(load_config(None, data))
    channels = tuple(int(c) for c in args.channels.split(","))
    levels = [int(i) for i in args.skip_levels.split(",")] if args.skip_levels else None
    torch.manual_seed(args.seed)
    unet = build_ddpm_unet(args.size, 3, block_out_channels=channels, layers_per_block=1)
    started = time.perf_counter()
    trained = train_ddpm(
        unet,
        splits.train,
        GenerativeTrainConfig(
            steps=args.steps,
            batch_size=args.batch,
            learning_rate=args.lr,
            warmup_steps=args.warmup,
            ema_decay=0.9999,
            seed=args.seed,
            save_every=max(args.steps, 1),
            log_every=50,
        ),
        args.out,
        p2_gamma=1.0,
        p2_k=1.0,
        skip_dropout_p=args.skip_dropout,
        skip_dropout_levels=levels,
    )
    seconds = time.perf_counter() - started
    model = trained.unet.eval()
    images = DiffusionImages(splits.val, image_size=args.size)
    picked = torch.randperm(len(splits.val), generator=torch.Generator().manual_seed(0))
    x = torch.stack([images[int(i)]["x"] for i in picked[: args.pairs]])
    y = splits.val.y[picked[: args.pairs]]
    shares = {}
    for t in (700, 500, 300):
        share = h_share(model, trained.scheduler, x, x.roll(1, 0), t)
        shares[t] = {"median": float(share.median()), "mean": float(share.mean())}
    logged = trained.result.losses  # running means every 50 steps
    record = {
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "n_train_images": len(splits.train),
        "n_params": sum(p.numel() for p in model.parameters()),
        "h_shape": f"{channels[-1]}x{args.size // 2 ** (len(channels) - 1)}px",
        "skip_dropout": args.skip_dropout,
        "skip_levels": levels,
        "loss_log": logged,
        "pairs_different_digit": int((y != y.roll(1)).sum()),
        "h_share": shares,
    }
    (args.out / "hshare.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
