"""CPU speed of the frozen foundation encoder used by PFA, to size the feature-cache strategy.

Times the LiteMedSAM TinyViT encoder per image at several input sides (batch 1 and 8, 2 torch
threads by default) and extrapolates the one-off cost of precomputing features for a training set
(default 1300 slices) plus the size of that float16 cache. Optionally times the DINOv2 ViT-S/14 architecture
with random weights (speed only). Other processes share this machine: the load average is logged
with the results because it inflates the timings, and with the cores oversubscribed two OpenMP
threads can be slower than one.

    python benchmarks/foundation_speed.py                 # ~1.5-2.5 min on 2 shared cores
    python benchmarks/foundation_speed.py --threads 2 1   # also 1 thread (twice as long)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqseg.modules.foundation import FoundationEncoder, build_foundation

LOG_DEFAULT = Path(__file__).parent / "logs" / "foundation_speed_cpu.log"


def _time_per_image(encoder: FoundationEncoder, batch: int, repeats: int) -> float:
    """Best (min) seconds per image over ``repeats`` timed calls.

    The minimum, not the mean, because other processes share the cores and only ever add time.
    """
    images = torch.rand(batch, 1, 256, 256)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder(images)
        times.append((time.perf_counter() - start) / batch)
    return min(times)


def _row(label: str, encoder: FoundationEncoder, threads: int, args: argparse.Namespace) -> str:
    torch.set_num_threads(threads)
    encoder(torch.rand(1, 1, 256, 256))  # warm-up: first calls allocate and pick kernels
    t1 = _time_per_image(encoder, 1, args.repeats)
    t8 = _time_per_image(encoder, 8, args.repeats_batch)
    cache_gib = args.slices * encoder.dim * encoder.grid[0] * encoder.grid[1] * 2 / 2**30
    precompute_min = args.slices * min(t1, t8) / 60
    row = (f"{threads:>7} {label:<20} {encoder.input_size:>5} {f'{encoder.grid[0]}x{encoder.grid[1]}':>6} "
           f"{t1:>9.3f} {t8:>9.3f} {precompute_min:>13.1f} {cache_gib:>10.2f}")
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 192, 128])
    parser.add_argument("--repeats", type=int, default=2, help="timed batch-1 calls per size")
    parser.add_argument("--repeats-batch", type=int, default=1, help="timed batch-8 calls per size")
    parser.add_argument("--slices", type=int, default=1300, help="training slices to extrapolate to")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--no-dinov2", action="store_true", help="skip the DINOv2 architecture row")
    parser.add_argument("--log", type=Path, default=LOG_DEFAULT)
    args = parser.parse_args()

    start = time.perf_counter()
    load_before = os.getloadavg()
    header = [
        f"foundation encoder speed, CPU ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible), torch {torch.__version__}",
        f"command: python {' '.join(sys.argv)}",
        f"load average at start: {load_before[0]:.2f} (other processes share these cores)",
        "input images 1 x 256 x 256 grey, resized to the encoder's input side; "
        "s/img = best wall time / batch size",
        f"precompute = {args.slices} slices x best s/img; cache = float16 features for {args.slices} slices",
        "",
        f"{'threads':>7} {'encoder':<20} {'input':>5} {'grid':>6} {'s/img b1':>9} {'s/img b8':>9} "
        f"{'precompute min':>13} {'cache GiB':>10}",
    ]
    print("\n".join(header), flush=True)
    encoders = [("litemedsam", build_foundation("litemedsam", input_size=size)) for size in args.sizes]
    if not args.no_dinov2:
        import timm

        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "random_dinov2.pth"
            model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
            torch.save(model.state_dict(), weights)
            encoders.append(("dinov2 (random wts)", build_foundation("dinov2", weights=weights)))
    rows = [_row(label, encoder, threads, args) for threads in args.threads for label, encoder in encoders]
    footer = (f"\nload average at end: {os.getloadavg()[0]:.2f}; "
              f"benchmark wall time {time.perf_counter() - start:.0f} s")
    print(footer, flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("\n".join(header + rows) + footer + "\n")
    print(f"wrote {args.log}", file=sys.stderr)


if __name__ == "__main__":
    main()
