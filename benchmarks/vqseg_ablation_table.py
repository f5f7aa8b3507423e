"""The README's VQ-Seg ablation and strength-sweep tables (and a plot of the sweep's validation
curves) from a finished `benchmarks/vqseg_ablation*.yaml` suite folder.

    python benchmarks/vqseg_ablation_table.py results/vqseg_ablation_cpu

The paper's column is its own ablation (Lung Cancer, 10 % labels; METHODS.md §1): a different
dataset, quoted for the ordering only.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vqseg.benchmark import val_curve  # noqa: E402

ABLATION_ROWS = {"supervised": None, "base": 74.43, "qpm": 77.01, "qpm_db": 77.84, "qpm_pfa": 77.61, "all": 78.52}
PAPER_EPS = {0.3: 77.41, 0.5: 78.03, 0.7: 78.52, 0.9: 74.18}
STRENGTHS = [0.3, 0.5, 0.7, 0.9]


def sweep_row(mode: str, strength: float) -> str:
    """The suite row behind one sweep point; eps 0.7 is the full method's own row."""
    if mode == "qpm":
        return "all" if strength == 0.7 else f"eps{strength}"
    return f"dropout{strength}"


def load(suite: Path) -> dict[str, list[dict]]:
    """Row name -> its runs (one per seed), each with its results.csv record and validation curve."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for record in csv.DictReader((suite / "results.csv").open()):
        run_dir = suite / record["row"] / f"{record['cases']}cases_seed{record['seed']}"
        runs[record["row"]].append({**record, "curve": [(step, dice * 100) for step, dice in val_curve(run_dir)]})
    return runs


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def cells(runs: list[dict]) -> list[str]:
    """Test Dice (mean over seeds, then each seed), missed structures per seed, and the validation
    Dice of the last four checks pooled over seeds, mean ± sd: how far a score moves between
    checkpoints of one run, i.e. the noise a row difference has to beat."""
    if not runs:
        return ["—"] * 3
    dice = [float(run["dice"]) * 100 for run in runs]
    test = f"{statistics.mean(dice):.2f}" + (f" ({', '.join(f'{d:.1f}' for d in dice)})" if len(dice) > 1 else "")
    tail = [value for run in runs for _, value in run["curve"][-4:]]
    return [test, ", ".join(run["missed"] for run in runs), f"{statistics.mean(tail):.1f} ± {_sd(tail):.1f}"]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, mode, label in zip(axes, ["qpm", "dropout"], ["QPM, eps", "feature dropout, p"]):
        for color, strength in zip(["C0", "C1", "C2", "C3"], STRENGTHS):
            for i, run in enumerate(runs.get(sweep_row(mode, strength), [])):
                steps, dice = zip(*run["curve"])
                ax.plot(steps, dice, color=color, linestyle=["-", "--", ":"][i % 3], marker="o", markersize=3,
                        label=f"{label} = {strength}" if i == 0 else None)
        ax.set_title(label.split(",")[0] + " (one line style per seed)")
        ax.set_xlabel("iteration")
        ax.legend()
    axes[0].set_ylabel("validation Dice (%)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    suite = Path(sys.argv[1])
    runs = load(suite)
    seeds = sorted({run["seed"] for row in runs.values() for run in row})
    print(f"seeds: {', '.join(seeds)}; test Dice is the mean over seeds, each seed in parentheses\n")
    header = ["row", "test Dice %", "missed", "val Dice %, last 4 checks", "paper, LC 10 %"]
    print(table(header, [[row, *cells(runs.get(row, [])), f"{paper:.2f}" if paper else "—"]
                         for row, paper in ABLATION_ROWS.items()]))
    print()
    header = ["strength", "QPM: test Dice %", "missed", "val, last 4",
              "dropout: test Dice %", "missed", "val, last 4", "paper QPM, LC 10 %"]
    rows = [[f"{s}", *cells(runs.get(sweep_row("qpm", s), [])), *cells(runs.get(sweep_row("dropout", s), [])),
             f"{PAPER_EPS[s]:.2f}"] for s in STRENGTHS]
    print(table(header, rows))
    plot(runs, suite / "strength_sweep.png")


if __name__ == "__main__":
    main()
