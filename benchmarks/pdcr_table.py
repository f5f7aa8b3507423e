"""The PDCR / UAFS table of the README from two finished suites' results.csv files.

    python benchmarks/pdcr_table.py results/pdcr_uafs_acdc_cpu/results.csv results/pdcr_uafs_cvc_cpu/results.csv
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROWS = ["baseline", "pdcr", "uafs", "pdcr_uafs"]


def dice_by_row(path: Path) -> tuple[dict[tuple[str, int], float], list[int]]:
    records = list(csv.DictReader(path.open()))
    counts = sorted({int(r["cases"]) for r in records})
    return {(r["row"], int(r["cases"])): float(r["dice"]) * 100 for r in records}, counts


def main() -> None:
    header = ["variant"]
    tables = []
    for name in sys.argv[1:]:
        dice, counts = dice_by_row(Path(name))
        dataset = Path(name).parent.name
        header += [f"{dataset} {'25 %' if c == counts[0] else '100 %'} ({c})" for c in counts]
        tables.append((dice, counts))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ROWS:
        cells = [row]
        for dice, counts in tables:
            cells += [f"{dice[(row, c)]:.2f}" if (row, c) in dice else "—" for c in counts]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
