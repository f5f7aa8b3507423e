"""Side-by-side test results of finished run folders, as the markdown table quoted in the README.

    python benchmarks/compare_runs.py results/acdc_cpu/supervised_3cases results/acdc_cpu/vqseg_3cases \
        --out results/acdc_cpu/comparison.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(run: Path) -> str:
    ev = json.loads((run / "eval_test.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    paper, honest = ev["paper"], ev["honest"]
    per_class = " / ".join(f"{v['dice'] * 100:.1f}" for v in paper["per_class"].values())
    found = honest["mean"]
    hd95 = "n/a" if found["hd95"] is None else f"{found['hd95']:.2f}"
    return (
        f"| {run.name} | {paper['mean']['dice'] * 100:.2f} | {paper['mean']['jaccard'] * 100:.2f} | "
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
        *(row(run) for run in args.runs),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
