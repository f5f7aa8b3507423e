"""How different is the strong view from the weak one on a frozen encoder? (issue 26, cause 2)

With a frozen encoder a training view's features are looked up in the bank of the unaugmented
slices, so the strong view's intensity augmentation reaches only the image stem. This measures,
on every k-th unlabelled ACDC slice and a trained checkpoint (default: the supervised neck4 run
of results/frozen_head_resolution_cpu), how far the strong view moves

- the frozen features (relative L2 change of each pyramid level, photometric copy vs slice), and
- the trained head's prediction: the share of pixels whose argmax changes, over all pixels and over
  the pixels the weak view predicts as foreground, when the strong view (a) keeps the slice's
  features (today: the stem alone sees the augmentation) and (b) reads its photometric copy's
  features (``model.photometric_encodings``).

Features come through the feature cache (``$VQSEG_CACHE``); the copies are those training uses.
Prints a table and writes benchmarks/logs/strong_view_gap_cpu.log.

    VQSEG_DATA=... VQSEG_CACHE=... python benchmarks/strong_view_gap.py [RUN_DIR] [--every 25] [--copies 2]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
from logfile import emit  # same folder

from vqseg.data import load_training_data
from vqseg.data.augment import Augmenter
from vqseg.data.provenance import add_provenance
from vqseg.models.pretrained import install_bank
from vqseg.run import load_run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "results" / "frozen_head_resolution_cpu" / "neck4" / "3cases_seed0"


def relative_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a, b)]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=DEFAULT_RUN)
    parser.add_argument("--every", type=int, default=25, help="every k-th unlabelled slice")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--log", type=Path, default=REPO / "benchmarks" / "logs" / "strong_view_gap_cpu.log")
    args = parser.parse_args()

    cfg, model, _ = load_run(args.run_dir)
    model.eval()
    encoder = model.encoder
    augment = Augmenter(cfg.aug, cfg.data.in_channels, anisotropic=cfg.aug.anisotropic)  # the methods' own
    slices = load_training_data(cfg).unlabeled.images[:: args.every]
    n = slices.shape[0]
    original = encoder.cached(slices, progress=True)
    install_bank(model, original, torch.device("cpu"))  # the strong view of today: its slice's features
    weak = model(slices).argmax(1)
    foreground = weak > 0

    rows = []
    for k in range(1, args.copies + 1):
        copy = augment.photometric_copy(slices, k)
        features = encoder.cached(copy, progress=True)
        today = model(add_provenance(copy, torch.arange(n))).argmax(1)
        reads_copy = model(copy).argmax(1)
        rows.append((k, relative_change(features, original), today, reads_copy))

    header = (f"# benchmarks/strong_view_gap.py {args.run_dir.relative_to(REPO) if args.run_dir.is_relative_to(REPO) else args.run_dir}"
              f" --every {args.every} --copies {args.copies}; {n} unlabelled slices, {platform.machine()}, "
              f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}; encoder {cfg.model.name} "
              f"{cfg.model.encoder_precision}, weak-view foreground {foreground.float().mean().item() * 100:.1f} % of pixels")
    lines = [header, "",
             "| copy | relative feature change, level 1 / 2 / 3 / 4 | strong view | argmax changed, all pixels % | "
             "on weak-view foreground % |", "|---|---|---|---|---|"]
    for k, change, today, reads_copy in rows:
        levels = " / ".join(f"{c * 100:.1f} %" for c in change)
        for name, pred in (("slice's features (today)", today), ("copy's features", reads_copy)):
            flipped = pred != weak
            lines.append(f"| {k} | {levels} | {name} | {flipped.float().mean().item() * 100:.2f} | "
                         f"{flipped[foreground].float().mean().item() * 100:.2f} |")
    emit("\n".join(lines) + "\n", args.log)


if __name__ == "__main__":
    main()
