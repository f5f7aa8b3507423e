"""Why PFA is off on a LiteMedSAM backbone: the alignment target is the quantizer's own input.

VQ-Seg's PFA pulls the post-VQ map towards a frozen foundation model's features (patch InfoNCE,
``modules/pfa.py``). On the frozen LiteMedSAM backbone the quantizer reads LiteMedSAM's own neck
map, so "foundation = LiteMedSAM" asks the quantizer to return its input, which the commitment
loss already does. This script measures it on real ACDC training slices: the patch InfoNCE
between the VQ-Seg target (LiteMedSAM's neck at its native 256 px input, 64 x 64) and

- the backbone's deepest map itself (the quantizer's input, 16 x 16, resized to the target grid
  as PFA resizes): what a loss-free quantizer reaches with an identity adapter;
- the same map with its channels shuffled (a reference for an unrelated feature of the same statistics);
- chance, log(number of sampled locations).

Prints a table and writes benchmarks/logs/pfa_self_alignment_cpu.log.

    python benchmarks/pfa_self_alignment.py --slices 16
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--samples", type=int, default=256, help="PFA's sampled locations per image")
    parser.add_argument("--tau", type=float, default=0.1, help="PFA's temperature (method.pfa_tau)")
    args = parser.parse_args()

    from vqseg.config import load_config
    from vqseg.data import load_training_data
    from vqseg.models.pretrained import TinyViTPyramid
    from vqseg.modules.foundation import LiteMedSAMEncoder, litemedsam_weights
    from vqseg.modules.pfa import patch_infonce

    cfg = load_config(REPO / "configs/cpu/litemedsam_acdc_3cases.yaml", [])
    data = load_training_data(cfg)
    step = max(1, len(data.labeled) // args.slices)
    images = data.labeled.images[::step][: args.slices]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        backbone = TinyViTPyramid(cfg.model.encoder_input, litemedsam_weights()).eval()
        quantizer_input = torch.cat([backbone(images[i:i + 2])[-1] for i in range(0, len(images), 2)])
        target = torch.cat([LiteMedSAMEncoder()(images[i:i + 2]) for i in range(0, len(images), 2)])
        resized = F.interpolate(quantizer_input, size=target.shape[-2:], mode="bilinear", align_corners=False)
        shuffled = resized[:, torch.randperm(resized.shape[1], generator=generator)]
        rows = [
            ("backbone's deepest map (the quantizer's input), identity adapter", resized),
            ("same map, channels shuffled", shuffled),
        ]
        losses = [(name, patch_infonce(x, target, args.tau, args.samples, generator=generator).item())
                  for name, x in rows]
    lines = [
        f"# pfa_self_alignment, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, load avg "
        f"{os.getloadavg()[0]:.2f}",
        f"# {len(images)} ACDC labelled training slices at {cfg.train.image_size} px; target: LiteMedSAM neck "
        f"{tuple(target.shape[1:])}; quantizer input {tuple(quantizer_input.shape[1:])}; "
        f"tau {args.tau}, {args.samples} locations",
        "",
        "| student map | patch InfoNCE |",
        "|---|---|",
        *[f"| {name} | {loss:.3f} |" for name, loss in losses],
        f"| chance, log({args.samples}) | {math.log(args.samples):.3f} |",
    ]
    text = "\n".join(lines)
    print(text)
    (REPO / "benchmarks" / "logs" / "pfa_self_alignment_cpu.log").write_text(text + "\n")


if __name__ == "__main__":
    main()
