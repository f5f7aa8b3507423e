"""The README table of native resolution vs resize (issue 25) from finished suites' folders.

    python benchmarks/native_vs_resize_table.py runs/benchmark/native_vs_resize_vessels_cpu \\
        runs/benchmark/native_vs_resize_cvc_cpu

One line per suite and row: what the network was trained on (read from a run's config.yaml, since
results.csv records no patch), test Dice, HD95 and ASD (mean ± std over seeds, SSL4MIS convention,
in the evaluation's units), then patch against resize from the suite's paired_tests.csv.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import yaml

from vqseg.benchmark import mean_std


def _cell(values: list[float], scale: float = 1.0) -> str:
    mean, std, _ = mean_std(values)
    return f"{mean * scale:.2f} ± " + ("—" if std is None else f"{std * scale:.2f}")


def _setting(suite: Path, record: dict[str, str]) -> tuple[str, str]:
    """The dataset and what the network was trained on, from the run's saved config."""
    run = suite / record["row"] / f"{record['cases']}cases_seed{record['seed']}"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    train = cfg["train"]
    if train["patch_size"]:
        return cfg["data"]["dataset"], " × ".join(map(str, train["patch_size"])) + " patches, sliding windows"
    return cfg["data"]["dataset"], f"resized to {train['image_size']} × {train['image_size']}"


def main() -> None:
    lines = ["| data | mode | trained on | Dice (%) | HD95 | ASD | units |", "|" + "---|" * 7]
    notes = []
    for suite in map(Path, sys.argv[1:]):
        records = list(csv.DictReader((suite / "results.csv").open()))
        for row in dict.fromkeys(r["row"] for r in records):
            group = [r for r in records if r["row"] == row]
            scores = [_cell([float(r[key]) for r in group], scale) for key, scale in
                      (("dice", 100), ("hd95", 1), ("asd", 1))]
            dataset, trained_on = _setting(suite, group[0])
            lines.append(f"| {dataset} | {row} | {trained_on} | {' | '.join(scores)} | {group[0]['units']} |")
        for t in csv.DictReader((suite / "paired_tests.csv").open()):
            if t["p_value"]:
                notes.append(f"{suite.name}: Dice {t['row_a']} − {t['row_b']} {100 * float(t['mean_diff']):+.2f} % "
                             f"over {t['pairs']} test images (seeds averaged), Wilcoxon p = {float(t['p_value']):.3g}")
    print("\n".join(lines + [""] + notes))


if __name__ == "__main__":
    main()
