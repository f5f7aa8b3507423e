"""Side-by-side test results of finished run folders, as the markdown table quoted in the README,
and each run against the first paired over the test cases (two-sided Wilcoxon signed-rank, as
``vqseg benchmark`` pairs the rows of one suite): runs of different suites compared the same way.

    python benchmarks/compare_runs.py results/acdc_cpu/supervised_3cases results/acdc_cpu/vqseg_3cases \
        --out results/acdc_cpu/comparison.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vqseg.benchmark import case_dice, wilcoxon_p


def label(run: Path, runs: list[Path]) -> str:
    """The folder's name, with its parent's where two runs share a name (one row of several suites)."""
    return run.name if [r.name for r in runs].count(run.name) == 1 else f"{run.parent.name}/{run.name}"


def paired(first: Path, other: Path) -> str:
    a, b = case_dice(first), case_dice(other)
    if a is None or b is None:
        return "n/a (no eval_test.csv)"
    names = sorted(set(a) & set(b))
    x, y = [b[n] for n in names], [a[n] for n in names]
    return f"{np.mean(np.subtract(x, y)) * 100:+.2f} points over {len(names)} cases, Wilcoxon p {wilcoxon_p(x, y):.3g}"


def row(run: Path, name: str) -> str:
    ev = json.loads((run / "eval_test.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    paper, honest = ev["paper"], ev["honest"]
    per_class = " / ".join(f"{v['dice'] * 100:.1f}" for v in paper["per_class"].values())
    found = honest["mean"]
    hd95 = "n/a" if found["hd95"] is None else f"{found['hd95']:.2f}"
    return (
        f"| {name} | {paper['mean']['dice'] * 100:.2f} | {paper['mean']['jaccard'] * 100:.2f} | "
        f"{paper['mean']['hd95']:.2f} | {paper['mean']['asd']:.2f} | {hd95} | {found['missed']} | {per_class} | "
        f"{ev['checkpoint_step']} ({ev['checkpoint_val_dice'] * 100:.1f}) | {summary['wall_time_s'] / 60:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    classes = " / ".join(json.loads((args.runs[0] / "eval_test.json").read_text())["paper"]["per_class"])
    lines = [
        f"| run | Dice % | Jaccard % | HD95 | ASD | HD95 (found) | missed | Dice % {classes} | "
        "checkpoint step (val Dice %) | wall min (last process) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(row(run, label(run, args.runs)) for run in args.runs),
    ]
    first = label(args.runs[0], args.runs)
    lines += ["", *(f"- {label(run, args.runs)} − {first}: {paired(args.runs[0], run)}" for run in args.runs[1:])]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
