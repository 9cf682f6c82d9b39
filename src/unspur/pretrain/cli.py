"""``unspur pretrain NAME --data-dir DIR --out OUT``: regenerate a shipped backbone."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Run the recipe and print where the weights and card went."""
    from unspur.pretrain.cifar10 import train_cifar10_backbone

    command = ["unspur", "pretrain", *getattr(args, "argv", sys.argv[1:])[1:]]
    train_cifar10_backbone(
        args.data_dir,
        args.out,
        name=args.name,
        epochs=args.epochs,
        limit=args.limit,
        threads=args.threads,
        seed=args.seed,
        command=command,
        log=lambda line: print(line, flush=True),
    )


def add_pretrain_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``pretrain`` sub-command to the CLI's sub-parsers."""
    from unspur.pretrain.cifar10 import RECIPES

    text = (
        "train a shipped backbone from its recipe (CIFAR-10, about 30 CPU-minutes); "
        "load the result with model.pretrained: OUT/NAME.safetensors"
    )
    sub = commands.add_parser("pretrain", help=text, description=text)
    sub.add_argument("name", choices=sorted(RECIPES), help="recipe / shipped name")
    sub.add_argument(
        "--data-dir", required=True, help="folder holding cifar10/ (e.g. ../shared/data)"
    )
    sub.add_argument("--out", required=True, help="folder for NAME.safetensors and NAME.json")
    sub.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    sub.add_argument(
        "--limit", type=int, default=None, help="read only N images per class and split (smoke)"
    )
    sub.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (recipe default 1)"
    )
    sub.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    sub.set_defaults(func=cmd_pretrain)
    return sub
