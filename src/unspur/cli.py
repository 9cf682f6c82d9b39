"""The ``unspur`` command line.

Errors the user can fix (:class:`unspur.errors.UnspurError`) are printed as one clear
message with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unspur.errors import UnspurError, UnspurWarning


def _print_results(results: dict) -> None:
    from unspur.evaluate.metrics import GroupMetrics, GroupRow, format_metrics

    for split, values in results["metrics"].items():
        rows = [GroupRow(**r) for r in values["groups"]]
        metrics = GroupMetrics(**{**values, "groups": rows})
        print(format_metrics(metrics, f"{split}:"))
    sup = results["supervision"]
    selection = results["selection"]
    # Epochs count from 1; epoch 0 means no epoch was chosen (e.g. a last-layer fit such as
    # DFR's logistic regression, whose own choice of C is in the run's report).
    chosen = (
        f"epoch {selection['best_epoch']}"
        if selection.get("best_epoch")
        else "no epochs to choose from: a closed-form or last-layer fit"
    )
    print(
        f"supervision: {sup['symbol']} (train group labels: {sup['train_group_labels']}, "
        f"val group labels: {sup['val_group_labels']}); selection: "
        f"{selection['rule']} ({chosen})"
    )


def _reader_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise UnspurError(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip()] = value
    return options


def add_data_arguments(
    parser: argparse.ArgumentParser,
    *,
    dataset_required: bool = False,
    on_bad_image_default: str | None = None,
) -> None:
    """The data flags every command that reads a dataset shares (run, train, compare,
    evaluate, data inspect), so a message that names one is right whichever printed it."""
    group = parser.add_argument_group("data (shortcuts for the config's data section)")
    group.add_argument(
        "--dataset",
        required=dataset_required,
        default=None,
        metavar="NAME",
        help="dataset reader, data.name (see `unspur data list`)",
    )
    group.add_argument("--root", default=None, metavar="DIR", help="dataset folder, data.root")
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reader option data.options.KEY, repeatable (e.g. --option target=Blond_Hair)",
    )
    default = f" (default {on_bad_image_default})" if on_bad_image_default else ""
    group.add_argument(
        "--on-bad-image",
        choices=["fail", "skip"],
        default=on_bad_image_default,
        help="an image that cannot be decoded: stop with its path (fail) or leave it out "
        f"(skip); data.on_bad_image{default}",
    )


def data_settings(args: argparse.Namespace) -> dict:
    """The data section the data flags set (only the flags given)."""
    settings: dict = {}
    if args.dataset is not None:
        settings["name"] = args.dataset
    if args.root is not None:
        settings["root"] = args.root
    if args.on_bad_image is not None:
        settings["on_bad_image"] = args.on_bad_image
    options = _reader_options(args.option)
    if options:
        settings["options"] = options
    return settings


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
    config.data.on_bad_image = args.on_bad_image or "fail"
    config.data.bias_ratio = args.bias_ratio
    config.data.balance_eval = args.balance_eval
    from unspur.data.checks import check_table, find_bad_images
    from unspur.pipeline import prepare_table

    table = prepare_table(config)
    bad = None
    if config.data.on_bad_image == "fail":  # with skip, prepare_table left them out
        print(f"decoding the {len(table.frame)} images to find unreadable ones ...", flush=True)
        bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            def bar(names):
                return tqdm(names, desc="decoding", leave=False)

        bad = find_bad_images(table, bar)
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
    # Exit 0 only when `unspur run` can use the data; warnings are printed with counts.
    inspection = check_table(table, bad)
    for finding in inspection.warnings:
        print(f"warning: {finding.message}")
    if not inspection.usable:
        problems = " ".join(f"({i}) {f.message}." for i, f in enumerate(inspection.errors, 1))
        raise UnspurError(
            f"{table.name}: the data cannot be used for a run as it stands; "
            f"{len(inspection.errors)} problem(s): {problems}"
        )
    print(f"checks: usable for a run ({len(inspection.warnings)} warning(s))")


def _config_path(args: argparse.Namespace) -> str | None:
    positional = getattr(args, "config_file", None)
    if positional and args.config and positional != args.config:
        raise UnspurError("give the config once: either CONFIG or --config")
    return positional or args.config


def cmd_run(args: argparse.Namespace) -> None:
    from unspur.config import load_config
    from unspur.pipeline import run
    from unspur.stages import changed_defaults, is_finished

    config = load_config(_config_path(args), args.set, data=data_settings(args))
    out = Path(args.out)
    if is_finished(config, out) and not args.force and not changed_defaults(config, out):
        print(f"{out}: finished earlier with this config; nothing to train (--force re-evaluates)")
    results = run(config, out, force=args.force)
    _print_results(results)
    print(f"results: {out / 'results.json'}")
    if args.report:
        from unspur.report import write_run_report

        print(f"report: {write_run_report(out, results)}")


def _compare_base(args: argparse.Namespace) -> dict:
    """The base config: ``--config``'s content with the data flags set, as for ``run``."""
    from unspur.config import read_yaml_mapping, with_data_settings

    if not args.config and not args.dataset:
        raise UnspurError(
            "compare needs a base: --config BASE.yaml or --dataset NAME (or both: the "
            "data flags then replace the config's data settings, as for `unspur run`)"
        )
    return with_data_settings(read_yaml_mapping(args.config), data_settings(args))


def _print_comparison(summary: dict) -> None:
    print()
    print(summary["markdown"])
    print()
    print(
        "test split, percentages; supervision: x no group labels, ✓ validation group "
        "labels, ✓✓ training group labels"
    )
    out = Path(summary["report"]).parent
    print(f"table: {out / 'comparison.md'}  {out / 'comparison.csv'}")
    print(f"report: {summary['report']}")


def cmd_compare(args: argparse.Namespace) -> None:
    from unspur.compare import compare, parse_list, parse_seeds

    summary = compare(
        _compare_base(args),
        parse_list(args.methods, "--methods"),
        parse_seeds(args.seeds),
        args.out,
        args.set,
        command=shlex.join(["unspur", *args.argv]),
    )
    _print_comparison(summary)


def cmd_bench(args: argparse.Namespace) -> None:
    from unspur.bench import run_suite
    from unspur.compare import parse_list, parse_seeds

    written = run_suite(
        args.suite,
        args.data_dir,
        out=args.out,
        work=args.work,
        seeds=parse_seeds(args.seeds) if args.seeds else None,
        only=parse_list(args.only, "--only") if args.only else None,
        threads=args.threads,
        check=args.check,
        reuse_other_code=args.reuse_other_code,
    )
    for path in written:
        print(f"table: {path}")


def cmd_report(args: argparse.Namespace) -> None:
    from unspur.report import write_compare_report, write_run_report

    path = Path(args.dir)
    if (path / "results.json").is_file():
        print(f"report: {write_run_report(path)}")
    elif (path / "comparison.json").is_file():
        summary = json.loads((path / "comparison.json").read_text())
        print(f"report: {write_compare_report(path, summary)}")
    else:
        raise UnspurError(f"{path} holds neither results.json (a run) nor comparison.json")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from unspur.config import load_config
    from unspur.evaluate.metrics import format_metrics
    from unspur.models.restore import load_checkpoint
    from unspur.pipeline import evaluate_model, prepare_data

    run_dir = Path(args.run)
    config_path = Path(args.config) if args.config else run_dir / "config.yaml"
    model_dir = Path(args.model) if args.model else run_dir / "model"
    config = load_config(config_path, args.set, data=data_settings(args))
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
        print(f"{name:<16} {method.default_supervision().symbol:<3} {method.summary}")
        for key, value in method.defaults.items():
            print(f"    {key} = {value!r}")


def cmd_demo(args: argparse.Namespace) -> None:
    from unspur.demo import run_demo, verdict

    summary = run_demo(
        args.out, full=args.full, methods=args.methods, seeds=args.seeds, overrides=args.set
    )
    _print_comparison(summary)
    sentence = verdict(summary)
    if sentence:
        print(sentence)


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
    add_data_arguments(inspect, dataset_required=True, on_bad_image_default="fail")
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

    def add_set(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value (a YAML value: 1e-4, [8,8], true), repeatable, "
            "e.g. --set train.lr=1e-3; applied after the config file and the data flags",
        )

    for name, report, text in (
        ("run", True, "the whole pipeline of one method: stages, evaluation, HTML report"),
        ("train", False, "like `run`, without the HTML report"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML config")
        sub.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
        add_data_arguments(sub)
        add_set(sub)
        sub.add_argument("--out", required=True, help="run directory")
        sub.add_argument(
            "--force",
            action="store_true",
            help="evaluate again even when the run finished (finished stages are reused)",
        )
        sub.set_defaults(func=cmd_run, report=report)

    compare = commands.add_parser(
        "compare",
        help="several methods x seeds on one dataset: table (mean ± std) and HTML report",
    )
    compare.add_argument("--config", default=None, help="base YAML config")
    add_data_arguments(compare)
    compare.add_argument("--methods", required=True, help="comma-separated, e.g. erm,jtt,dfr_val")
    compare.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    compare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="override for every method, or for one with METHOD:key=value",
    )
    compare.add_argument("--out", required=True, help="comparison directory")
    compare.set_defaults(func=cmd_compare)

    bench = commands.add_parser(
        "bench",
        help="run a benchmark suite (bench/suites/*.yaml): one table per setting, resumable",
    )
    bench.add_argument("suite", help="suite file, e.g. bench/suites/smoke.yaml")
    bench.add_argument("--data-dir", default=None, help="data folder, e.g. ../shared/data")
    bench.add_argument("--out", default=None, help="tables folder (default bench/results/<suite>)")
    bench.add_argument(
        "--work", default=None, help="run folders, resumable (default runs/bench/<suite>)"
    )
    bench.add_argument("--seeds", default=None, help="comma-separated (default: the suite's)")
    bench.add_argument("--only", default=None, help="comma-separated setting names")
    bench.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per run (train.threads)"
    )
    bench.add_argument(
        "--check", action="store_true", help="check the suite and every config; train nothing"
    )
    bench.add_argument(
        "--reuse-other-code",
        action="store_true",
        help="take finished runs trained by other code (an older checkout) instead of "
        "training them again; the tables say how many",
    )
    bench.set_defaults(func=cmd_bench)

    report = commands.add_parser("report", help="(re)write the HTML report of a run or comparison")
    report.add_argument("dir", help="a run directory or a comparison directory")
    report.set_defaults(func=cmd_report)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained model per group")
    evaluate.add_argument("--run", required=True, help="run directory from `unspur run`")
    evaluate.add_argument("--model", default=None, help="model directory (default RUN/model)")
    evaluate.add_argument("--config", default=None, help="config (default RUN/config.yaml)")
    add_data_arguments(evaluate)
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--json", default=None, help="also write the metrics to this file")
    evaluate.set_defaults(func=cmd_evaluate)

    methods = commands.add_parser("methods", help="list methods and their supervision")
    methods.set_defaults(func=cmd_methods)

    from unspur.demo import FULL, QUICK

    demo = commands.add_parser(
        "demo",
        help="ERM's shortcut, DFR, MaC and DBB on the synthetic benchmark, on CPU (~3 min)",
    )
    demo.add_argument("--out", default="runs/demo", help="directory (default runs/demo)")
    demo.add_argument(
        "--full",
        action="store_true",
        help=f"the longer comparison: {FULL.methods}, seeds {FULL.seeds}",
    )
    demo.add_argument("--methods", default=None, help=f"default {QUICK.methods}")
    demo.add_argument("--seeds", "--seed", default=None, help=f"default {QUICK.seeds}")
    demo.add_argument("--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE")
    demo.set_defaults(func=cmd_demo)

    from unspur.pretrain.cli import add_pretrain_parser

    add_pretrain_parser(commands)
    return parser


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show each :class:`UnspurWarning` as one ``unspur: warning: ...`` line on stderr
    (no source location: it is about the user's data or config, not our code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UnspurWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UnspurWarning):
                print(f"unspur: warning: {message}", file=sys.stderr, flush=True)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        with _warnings_as_lines():
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
