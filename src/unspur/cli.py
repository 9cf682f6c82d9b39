"""The ``unspur`` command line.

Errors the user can fix (:class:`unspur.errors.UnspurError`) are printed as one clear
message with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unspur.errors import UnspurError

DEMO_SETTINGS = [
    "data.name=synthetic",
    "data.options.bias=0.99",
    "data.options.n_train=2000",
    "data.image_size=32",
    "model.arch=small_cnn",
    "train.epochs=8",
    "train.lr=0.05",
    "train.batch_size=64",
    "train.augment=false",
]


def _print_results(results: dict) -> None:
    from unspur.evaluate.metrics import GroupMetrics, GroupRow, format_metrics

    for split, values in results["metrics"].items():
        rows = [GroupRow(**r) for r in values["groups"]]
        metrics = GroupMetrics(**{**values, "groups": rows})
        print(format_metrics(metrics, f"{split}:"))
    sup = results["supervision"]
    print(
        f"supervision: {sup['symbol']} (train group labels: {sup['train_group_labels']}, "
        f"val group labels: {sup['val_group_labels']}); selection: "
        f"{results['selection']['rule']} (epoch {results['selection']['best_epoch']})"
    )


def _reader_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise UnspurError(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip()] = value
    return options


def cmd_data_list(args: argparse.Namespace) -> None:
    from unspur.data.registry import available_datasets, get_reader, reader_options

    for name in available_datasets():
        doc = (get_reader(name).__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        for option in reader_options(name).values():
            default = "" if option.default is option.empty else f" = {option.default!r}"
            print(f"    --option {option.name}{default}")


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from unspur.config import load_config

    overrides = [f"data.name={args.dataset}", f"seed={args.seed}"]
    config = load_config(None, overrides)
    config.data.root = args.root
    config.data.options = _reader_options(args.option)
    config.data.on_bad_image = args.on_bad_image
    config.data.bias_ratio = args.bias_ratio
    config.data.balance_eval = args.balance_eval
    from unspur.pipeline import prepare_table

    table = prepare_table(config)
    counts = table.counts()
    print(f"dataset: {table.name}  ({len(table.frame)} images, {table.n_groups} groups)")
    print(counts.to_string())
    totals = counts.drop(columns=["y", "a"]).sum()
    print("total   " + "  ".join(f"{split}={int(n)}" for split, n in totals.items()))
    per_class = table.frame["y"].value_counts().reindex(range(table.n_classes), fill_value=0)
    print(
        "per class (all splits): "
        + ", ".join(f"{table.class_names[c]}={int(n)}" for c, n in per_class.items())
    )
    for key, value in table.info.items():
        print(f"{key}: {value}")


def cmd_train(args: argparse.Namespace) -> None:
    from unspur.config import load_config
    from unspur.pipeline import run

    config = load_config(args.config, args.set)
    results = run(config, args.out)
    _print_results(results)
    print(f"results: {Path(args.out) / 'results.json'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from unspur.config import load_config
    from unspur.evaluate.metrics import format_metrics
    from unspur.models.checkpoint import load_checkpoint
    from unspur.pipeline import evaluate_model, prepare_data

    run_dir = Path(args.run)
    config_path = Path(args.config) if args.config else run_dir / "config.yaml"
    model_dir = Path(args.model) if args.model else run_dir / "model"
    config = load_config(config_path, args.set)
    prepared = prepare_data(config)
    model = load_checkpoint(model_dir)
    metrics = evaluate_model(model, prepared, config.train.eval_batch_size)
    for split, values in metrics.items():
        print(format_metrics(values, f"{split}:"))
    if args.json:
        out = {split: m.to_dict() for split, m in metrics.items()}
        Path(args.json).write_text(json.dumps(out, indent=2))


def cmd_methods(args: argparse.Namespace) -> None:
    from unspur.methods.base import available_methods

    for name, method in available_methods().items():
        print(f"{name:<16} {method.supervision.symbol:<3} {method.summary}")
        for key, value in method.defaults.items():
            print(f"    {key} = {value!r}")


def cmd_demo(args: argparse.Namespace) -> None:
    from unspur.config import load_config
    from unspur.pipeline import run

    overrides = DEMO_SETTINGS + [f"seed={args.seed}"] + args.set
    config = load_config(None, overrides)
    print("unspur demo: ERM on the synthetic benchmark (shape = class, background = bias,")
    print("99% of training images show each shape on its usual background), on CPU.")
    results = run(config, args.out)
    _print_results(results)
    test = results["metrics"]["test"]
    gap = 100 * (test["average_accuracy"] - test["worst_group_accuracy"])
    print(
        f"ERM learned the shortcut: worst-group accuracy is {gap:.1f} points below average "
        "accuracy."
        if gap > 10
        else f"worst-group gap: {gap:.1f} points."
    )
    print(f"results: {Path(args.out) / 'results.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unspur",
        description="Find and fix spurious correlations in image classifiers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect datasets").add_subparsers(
        dest="data_command", required=True
    )
    listing = data.add_parser("list", help="list the dataset readers and their options")
    listing.set_defaults(func=cmd_data_list)
    inspect = data.add_parser("inspect", help="print the group counts of a dataset")
    inspect.add_argument("--dataset", required=True, help="reader name (see `unspur data list`)")
    inspect.add_argument("--root", default=None, help="dataset root directory")
    inspect.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reader option, repeatable (e.g. --option target=Blond_Hair)",
    )
    inspect.add_argument("--on-bad-image", choices=["fail", "skip"], default="fail")
    inspect.add_argument(
        "--bias-ratio",
        type=float,
        default=None,
        help="resplit train so majority groups make this share of each class",
    )
    inspect.add_argument(
        "--balance-eval", action="store_true", help="subsample val and test to equal group sizes"
    )
    inspect.add_argument("--seed", type=int, default=0)
    inspect.set_defaults(func=cmd_data_inspect)

    train = commands.add_parser("train", help="train a method from a config")
    train.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.001",
    )
    train.add_argument("--out", required=True, help="run directory")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained model per group")
    evaluate.add_argument("--run", required=True, help="run directory from `unspur train`")
    evaluate.add_argument("--model", default=None, help="model directory (default RUN/model)")
    evaluate.add_argument("--config", default=None, help="config (default RUN/config.yaml)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--json", default=None, help="also write the metrics to this file")
    evaluate.set_defaults(func=cmd_evaluate)

    methods = commands.add_parser("methods", help="list methods and their supervision")
    methods.set_defaults(func=cmd_methods)

    demo = commands.add_parser("demo", help="ERM on the synthetic benchmark, on CPU")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UnspurError as exc:
        print(f"unspur: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unspur: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
