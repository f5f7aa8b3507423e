"""Command line: ``vqseg train | evaluate | prepare | predict | metrics | demo | benchmark``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from vqseg.config import UserError


def _train(args: argparse.Namespace) -> None:
    from vqseg.config import load_config
    from vqseg.engine.trainer import train

    cfg = load_config(args.config, args.set)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"run folder: {run_dir}")


def _evaluate(args: argparse.Namespace) -> None:
    from vqseg.evaluation.evaluate import eval_stem, evaluate_run, parse_class_map
    from vqseg.metrics import format_markdown
    from vqseg.run import select_device

    select_device(args.device, "--device")  # refused here, with the option named, before any loading
    summary = evaluate_run(
        Path(args.run_dir), args.split, args.checkpoint, args.device, args.spacing, args.data, args.save_predictions,
        parse_class_map(args.class_map),
    )
    print(format_markdown(summary))
    print(f"distances in {summary['units']}")
    stem = Path(args.run_dir) / eval_stem(args.split, args.data)
    print(f"written: {stem}.json, .md and .csv (per case)" + (f"; masks in {summary['predictions']}" if args.save_predictions else ""))


def _prepare(args: argparse.Namespace) -> None:
    from vqseg.data.prepare import prepare

    lines = prepare(
        Path(args.data_dir), args.labeled, args.val, args.test, args.seed, args.group, args.force, args.mask_values
    )
    print("\n".join(lines))


def _predict(args: argparse.Namespace) -> None:
    from vqseg.data.volumes import DataError
    from vqseg.evaluation.predict import predict_paths
    from vqseg.run import select_device

    select_device(args.device, "--device")
    written, failed = predict_paths(
        Path(args.run_dir), [Path(p) for p in args.inputs], Path(args.output), args.overlay, args.probabilities,
        args.checkpoint, args.device,
    )
    print(f"{written} case(s) written to {args.output}")
    if failed:
        raise DataError(f"{failed} case(s) failed (errors above); nothing was written for them")


def _metrics(args: argparse.Namespace) -> None:
    from vqseg.metrics import compare_volumes, format_compare

    result = compare_volumes(args.pred, args.gt, tuple(args.spacing) if args.spacing else None, args.num_classes)
    print(json.dumps(result, indent=2) if args.json else format_compare(result))


def _demo(args: argparse.Namespace) -> None:
    from vqseg.demo import run_demo

    run_demo(Path(args.output), args.methods)


def _benchmark(args: argparse.Namespace) -> None:
    from vqseg.benchmark import run_suite

    run_suite(Path(args.suite), args.output, dry_run=args.dry_run, report_only=args.report)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one line naming the option, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vqseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method from a YAML config")
    p.add_argument("config", nargs="?", help="YAML config (defaults are used for missing keys)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt (same settings)")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in OUTPUT_DIR and start afresh")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="score a run's validation-selected checkpoint on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--checkpoint", default="best", help="best (chosen on validation) or last")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--spacing", type=float, nargs="+", default=None,
        help="mm per axis of the stored files, in their order (NIfTI i j k, h5 D H W, image rows cols)",
    )
    p.add_argument("--data", default=None, help="score a split of this prepared dataset instead of the run's own data")
    p.add_argument(
        "--class-map", default=None, metavar="OTHER=RUN,...",
        help="with --data: pair the other dataset's classes with the run's by name (default: same names)",
    )
    p.add_argument("--save-predictions", action="store_true", help="also write the predicted masks")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("prepare", help="verify your own dataset (image folder or nnU-Net raw), summarise it, write its split")
    p.add_argument("data_dir")
    p.add_argument("--labeled", default="100%", help="training cases that keep their labels: N or P%% (default 100%%)")
    p.add_argument("--val", default="20%", help="validation cases: N or P%% of the labelled cases (default 20%%)")
    p.add_argument("--test", default="20%", help="test cases: N or P%% of the labelled cases (default 20%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group", default=None, metavar="REGEX", help="cases whose names give the same key stay together")
    p.add_argument("--force", action="store_true", help="overwrite an existing split file")
    p.add_argument(
        "--mask-values", type=_int_list, default=None, metavar="V0,V1,...",
        help="image folders whose masks store grey levels (e.g. 0,128,255): each class's value, background first",
    )
    p.set_defaults(func=_prepare)

    p = sub.add_parser("predict", help="label new images or NIfTI volumes with a trained run")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (2D images, NIfTI, nnU-Net imagesTs/)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    p.add_argument("--overlay", action="store_true", help="2D images: also write NAME_overlay.png")
    p.add_argument("--probabilities", action="store_true", help="also write NAME_probabilities.npz")
    p.add_argument("--checkpoint", default="best", help="best (chosen on validation) or last")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_predict)

    p = sub.add_parser("metrics", help="Dice, Jaccard, HD95, ASD between two label volumes (NIfTI or h5)")
    p.add_argument("--pred", required=True)
    p.add_argument("--gt", required=True)
    p.add_argument(
        "--spacing", type=float, nargs="+", default=None,
        help="voxel spacing, one per axis (default: the NIfTI header; h5 has none: voxels)",
    )
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background (default: labels present)")
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
    p.add_argument("--report", action="store_true", help="tabulate the runs done so far; train nothing")
    p.set_defaults(func=_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:  # what the user can fix; anything else is a bug and tracebacks
        message = " ".join(str(err).split())  # one line, whatever a message embeds
        print(f"vqseg {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
