"""Command line: ``vqseg train | evaluate | metrics | demo | benchmark``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vqseg.config import ConfigError


def _train(args: argparse.Namespace) -> None:
    from vqseg.config import load_config
    from vqseg.engine.trainer import train

    cfg = load_config(args.config, args.set)
    run_dir = train(cfg, resume=args.resume)
    print(f"run folder: {run_dir}")


def _evaluate(args: argparse.Namespace) -> None:
    from vqseg.evaluation.evaluate import evaluate_run
    from vqseg.evaluation.metrics import format_markdown

    summary = evaluate_run(Path(args.run_dir), args.split, args.checkpoint, args.device, args.spacing)
    print(format_markdown(summary))
    print(f"written: {Path(args.run_dir) / f'eval_{args.split}.json'} and .md")


def _metrics(args: argparse.Namespace) -> None:
    from vqseg.data.volumes import DataError
    from vqseg.evaluation.metrics import compare_volumes, format_compare

    try:
        result = compare_volumes(args.pred, args.gt, tuple(args.spacing) if args.spacing else None, args.num_classes)
    except ValueError as err:  # unreadable file, shape mismatch, bad labels: the message names the file
        raise DataError(str(err)) from None
    print(json.dumps(result, indent=2) if args.json else format_compare(result))


def _demo(args: argparse.Namespace) -> None:
    from vqseg.demo import run_demo

    run_demo(Path(args.output), args.methods)


def _benchmark(args: argparse.Namespace) -> None:
    from vqseg.benchmark import run_suite

    run_suite(Path(args.suite), args.output, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (defaults are used for missing keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="score a run's validation-selected checkpoint on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--checkpoint", default="best", help="best (chosen on validation) or last")
    p.add_argument("--device", default="auto")
    p.add_argument("--spacing", type=float, nargs="+", default=None, help="voxel spacing (z y x) for mm distances")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("metrics", help="Dice, Jaccard, HD95, ASD between two label volumes (NIfTI or h5)")
    p.add_argument("--pred", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument("--spacing", type=float, nargs="+", default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_metrics)

    p = sub.add_parser("demo", help="train on built-in synthetic cardiac phantoms (no data needed, CPU)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--methods", nargs="+", default=["supervised", "vqseg"])
    p.set_defaults(func=_demo)

    p = sub.add_parser("benchmark", help="run a suite of methods x labelled counts x seeds")
    p.add_argument("suite")
    p.add_argument("--output", default=None)
    p.add_argument("--dry-run", action="store_true", help="list the runs without training")
    p.set_defaults(func=_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vqseg.data.volumes import DataError

    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"vqseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
