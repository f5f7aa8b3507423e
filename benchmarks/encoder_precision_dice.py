"""Does a bfloat16 frozen encoder change the final score? One trained run's checkpoint scored on a
split twice, its frozen LiteMedSAM features computed in float32 and in bfloat16 (each through its
own feature cache), with the same metrics as ``vqseg evaluate``: the tolerance check for
``model.encoder_precision=bf16`` (issue 26). The run itself may have trained on either.

    python benchmarks/encoder_precision_dice.py RUN_DIR [--split test]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vqseg.data import load_split
from vqseg.inference import Inference, predict_cases
from vqseg.io import load_checkpoint
from vqseg.metrics import score_volume
from vqseg.models.pretrained import BACKBONE_IDENTITY
from vqseg.run import build_run_method, load_run


def scores(run_dir: Path, split: str, precision: str) -> tuple[np.ndarray, float]:
    """Per case mean foreground Dice of the run's best.pt with the encoder in ``precision``."""
    cfg, _, _ = load_run(run_dir)
    cfg.model.encoder_precision = precision
    predictor = build_run_method(cfg, cfg.data.in_channels, cfg.data.num_classes).predictor()
    state = load_checkpoint(run_dir / "best.pt")["predictor"]
    for key in [k for k in state if k.endswith(BACKBONE_IDENTITY)]:
        del state[key]  # the run's own precision is recorded there; this check swaps it on purpose
    predictor.load_state_dict(state)
    volumes = load_split(cfg, split)
    began = time.time()
    predictions = predict_cases(predictor, volumes, Inference.of(cfg), torch.device("cpu"))
    per_case = [np.mean([s.dice for s in score_volume(p, v.label, cfg.data.num_classes)])
                for p, v in zip(predictions, volumes)]
    return np.asarray(per_case), time.time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--log", type=Path, default=Path(__file__).parent / "logs" / "encoder_precision_dice_cpu.log")
    args = parser.parse_args()
    exact, t32 = scores(args.run_dir, args.split, "fp32")
    low, t16 = scores(args.run_dir, args.split, "bf16")
    diff = (low - exact) * 100
    lines = [
        f"# benchmarks/encoder_precision_dice.py {args.run_dir} --split {args.split}; {platform.machine()}, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}",
        f"cases: {len(exact)}; mean Dice % float32 {exact.mean() * 100:.2f}, bfloat16 {low.mean() * 100:.2f}, "
        f"difference {diff.mean():+.3f} points (per case: max |difference| {np.abs(diff).max():.3f}, "
        f"std {diff.std():.3f})",
        f"prediction time, features cached or computed: float32 {t32:.0f} s, bfloat16 {t16:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.log.write_text(text)


if __name__ == "__main__":
    main()
