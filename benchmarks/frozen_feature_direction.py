"""Why VQ-Seg standardises a frozen encoder's features before the code lookup (``method.vq_center``).

On real ACDC training slices (every k-th unlabelled slice of configs/cpu/litemedsam_acdc_3cases.yaml,
read through the feature cache, so this is fast once the cache is filled): LiteMedSAM's neck tokens,
the map VQ-Seg quantizes on the frozen backbone, as raw and as centred directions:

- the mean pairwise cosine of the L2-normalised tokens (0: no shared direction), and
- how many codes a freshly initialised quantizer (K = 16384, cosine lookup, the method's
  ``code_dim`` 32 and the direct 0) assigns the tokens to, without and with standardisation.

Prints a table and writes benchmarks/logs/frozen_feature_direction_cpu.log.

    VQSEG_CACHE=... python benchmarks/frozen_feature_direction.py --slices 60
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]


def mean_pairwise_cosine(tokens: torch.Tensor) -> float:
    unit = F.normalize(tokens, dim=1)
    return (unit @ unit.T).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=2000, help="tokens sampled for the pairwise cosine")
    args = parser.parse_args()

    from vqseg.config import load_config
    from vqseg.data import load_training_data
    from vqseg.models.vq_net import FactorizedQuantizer
    from vqseg.run import build_network

    cfg = load_config(REPO / "configs/cpu/litemedsam_acdc_3cases.yaml", [])
    data = load_training_data(cfg)
    step = max(1, len(data.unlabeled) // args.slices)
    images = data.unlabeled.images[::step][: args.slices]
    encoder = build_network(cfg, data.in_channels, data.num_classes).encoder
    neck = encoder.cached(images, progress=True)[-1].float()  # N x 256 x 16 x 16
    tokens = neck.permute(0, 2, 3, 1).reshape(-1, neck.shape[1])
    generator = torch.Generator().manual_seed(0)
    sample = tokens[torch.randperm(len(tokens), generator=generator)[: args.pairs]]
    raw, centred = mean_pairwise_cosine(sample), mean_pairwise_cosine(sample - tokens.mean(0))
    codes = []
    for code_dim in (32, 0):
        for center in (False, True):
            torch.manual_seed(0)
            quantizer = FactorizedQuantizer(neck.shape[1], code_dim, 16384, 0.25, cosine=True, center=center).train()
            with torch.no_grad():
                used = quantizer(neck).indices.unique().numel()
            codes.append(f"| {code_dim} | {'yes' if center else 'no'} | {used} |")
    lines = [
        f"# frozen_feature_direction, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
        f"load avg {os.getloadavg()[0]:.2f}",
        f"# {len(images)} ACDC unlabelled training slices at {cfg.train.image_size} px; LiteMedSAM neck "
        f"{tuple(neck.shape[1:])}: {len(tokens)} tokens, {len(sample)} sampled for the cosine",
        "",
        "| tokens | mean pairwise cosine |",
        "|---|---|",
        f"| raw | {raw:.3f} |",
        f"| centred | {centred:.3f} |",
        "",
        f"Codes used by {len(tokens)} tokens at initialisation (K = 16384, cosine lookup):",
        "",
        "| code_dim | standardised (vq_center) | distinct codes |",
        "|---|---|---|",
        *codes,
    ]
    text = "\n".join(lines)
    print(text)
    (REPO / "benchmarks" / "logs" / "frozen_feature_direction_cpu.log").write_text(text + "\n")


if __name__ == "__main__":
    main()
