"""What the frozen LiteMedSAM encoder costs per slice on this CPU, in float32 and bfloat16, by batch.

Times the pyramid the feature cache keeps (``TinyViTPyramid.forward``: stages 1-3 and the neck, at
strides 4, 8, 4, 4 of a 256 px input) on real ACDC validation slices, and measures how far the
bfloat16 features are from the float32 ones (relative L2 error and mean cosine per level). Whether
bfloat16 is good enough is decided by training on both caches (README, issue 26), not here.

    python benchmarks/encoder_precision.py          # about 3 min on two cores
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from logfile import emit  # same folder
from torch.nn import functional as F

from vqseg.config import data_root, load_config
from vqseg.data import load_split
from vqseg.models.pretrained import TinyViTPyramid
from vqseg.modules import foundation

LOG_DEFAULT = Path(__file__).parent / "logs" / "encoder_precision_cpu.log"


def slices(count: int) -> torch.Tensor:
    cfg = load_config(None, [f"data.root={data_root() / 'acdc'}"])
    resized = [F.interpolate(torch.from_numpy(v.image), size=(256, 256), mode="bilinear", align_corners=False)
               for v in load_split(cfg, "val")]
    return torch.cat(resized)[:count]


def seconds_per_slice(backbone: TinyViTPyramid, images: torch.Tensor, batch: int) -> float:
    """Best of two passes over ``images`` (other processes only ever add time)."""
    best = float("inf")
    with torch.no_grad():
        backbone(images[:batch])  # warm-up: kernels are chosen on the first call
        for _ in range(2):
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                backbone(images[i:i + batch])
            best = min(best, (time.perf_counter() - start) / len(images))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", type=Path, default=LOG_DEFAULT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = foundation.litemedsam_weights()
    images = slices(args.slices)
    models = {p: TinyViTPyramid(256, weights, precision=p).eval() for p in ("fp32", "bf16")}
    lines = [
        f"# benchmarks/encoder_precision.py, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}, {len(images)} ACDC validation slices at 256 px",
        "| precision | batch | s / slice | slices / min |",
        "|---|---|---|---|",
    ]
    timings = {}
    for precision, model in models.items():
        for batch in (1, 2, 4):
            t = seconds_per_slice(model, images, batch)
            timings[precision, batch] = t
            lines.append(f"| {precision} | {batch} | {t:.3f} | {60 / t:.0f} |")
            print(lines[-1], flush=True)
    best32 = min(t for (p, _), t in timings.items() if p == "fp32")
    best16 = min(t for (p, _), t in timings.items() if p == "bf16")
    lines.append(f"bfloat16 at its best batch is {best32 / best16:.2f}x float32 at its best; float32 batch 1 is "
                 f"{timings['fp32', 2] / timings['fp32', 1]:.2f}x float32 batch 2 (the former default)")
    with torch.no_grad():
        exact, low = models["fp32"](images), models["bf16"](images)
    lines += ["| level | shape (C x h x w) | relative L2 error | mean cosine |", "|---|---|---|---|"]
    for name, a, b in zip(("stage 1", "stage 2", "stage 3", "neck"), exact, low):
        rel = ((a - b).norm() / a.norm()).item()
        cos = F.cosine_similarity(a, b, dim=1).mean().item()
        lines.append(f"| {name} | {' x '.join(map(str, a.shape[1:]))} | {rel:.4f} | {cos:.5f} |")
    emit("\n".join(lines) + "\n", args.log)


if __name__ == "__main__":
    main()
