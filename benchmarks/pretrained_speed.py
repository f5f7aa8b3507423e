"""CPU cost of the frozen LiteMedSAM backbone: the one-time features, training steps, prediction.

1. One-time feature cost per slice (LiteMedSAM pyramid at 256 and 128 px input, batch 2, the
   cache's default) and the float16 cache size per slice.
2. The training-step time of every method with the frozen LiteMedSAM backbone + DPT head,
   against the U-Net's at the same image size and batch (``train_speed.measure``: the engine's
   ``Streams`` and ``optimization_step`` on real ACDC slices; the frozen model's feature bank holds
   zeros of the real shapes, as the step does not depend on its values).
3. Prediction time per slice of a new ACDC volume (cache empty: the encoder runs), frozen
   LiteMedSAM model against the U-Net.

Prints a markdown table and writes benchmarks/logs/pretrained_speed_cpu.log (everything runs on the CPU).

    python benchmarks/pretrained_speed.py                # ~6-9 min on 2 shared cores
    python benchmarks/pretrained_speed.py --size 128 --batch 8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import measure  # noqa: E402  (same folder: one worker for both benchmarks)

REPO = Path(__file__).resolve().parents[1]
METHODS = ("supervised", "mean_teacher", "unimatch", "bcp", "cps", "vqseg")


def feature_cost(size: int, slices: int) -> tuple[float, float]:
    """(seconds per slice, cache MB per slice) of the real LiteMedSAM pyramid, batch 2, after a warm-up."""
    from vqseg.models.pretrained import TinyViTPyramid
    from vqseg.modules.foundation import litemedsam_weights

    backbone = TinyViTPyramid(size, litemedsam_weights()).eval()
    images = torch.rand(slices, 1, size, size)
    with torch.no_grad():
        backbone(images[:2])
        began = time.perf_counter()
        for i in range(0, slices, 2):
            levels = backbone(images[i:i + 2])
    per_slice = (time.perf_counter() - began) / slices
    megabytes = sum(level[0].numel() * 2 for level in levels) / 2**20
    return per_slice, megabytes


def prediction_cost(overrides: list[str], volume_index: int) -> tuple[float, int]:
    """Seconds per slice to predict one ACDC test volume with an empty feature cache."""
    from vqseg.config import load_config
    from vqseg.data import load_split
    from vqseg.inference import predict_volume
    from vqseg.run import build_run_method

    cfg = load_config(None, overrides)
    volume = load_split(cfg, "test")[volume_index]
    model = build_run_method(cfg, cfg.data.in_channels, cfg.data.num_classes).predictor().eval()
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"VQSEG_CACHE": cache}):
        began = time.perf_counter()
        predict_volume(model, volume.image, cfg.train.image_size, cfg.eval.batch_size, torch.device("cpu"))
        elapsed = time.perf_counter() - began
    return elapsed / volume.image.shape[0], volume.image.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="training image side (steps and prediction)")
    parser.add_argument("--batch", type=int, default=8, help="labelled and unlabelled batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--feature-slices", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()

    base = [
        "data.dataset=acdc",
        f"data.root={os.environ.get('VQSEG_DATA', str(REPO.parent / 'shared' / 'data'))}/acdc",
        "data.labeled_cases=3",
        f"train.image_size={args.size}",
        f"train.batch_size={args.batch}",
        f"train.unlabeled_batch_size={args.batch}",
        "train.device=cpu",
        "train.iterations=1000",
    ]
    frozen = ["model.name=litemedsam", "model.encoder_mode=frozen"]
    lines = [
        f"# pretrained_speed, {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load avg {os.getloadavg()[0]:.2f} (other jobs share these cores: timings are upper bounds)",
        "",
        "## One-time LiteMedSAM pyramid features (frozen mode), batch 2",
        "",
        "| input side | s / slice | cache MB / slice (float16) | all ACDC training slices (1312) |",
        "|---|---|---|---|",
    ]
    for size in (256, 128):
        seconds, megabytes = feature_cost(size, args.feature_slices)
        lines.append(f"| {size} | {seconds:.2f} | {megabytes:.2f} | {seconds * 1312 / 60:.0f} min, "
                     f"{megabytes * 1312 / 1024:.1f} GB |")
    print("\n".join(lines), flush=True)

    lines += [
        "",
        f"## Training step, {args.size} x {args.size}, batch {args.batch} labelled + {args.batch} unlabelled "
        f"(median of {args.steps} after {args.warmup} warm-up)",
        "",
        "| method | frozen LiteMedSAM + DPT: s / step | U-Net: s / step | frozen / U-Net |",
        "|---|---|---|---|",
    ]
    for method in args.methods:
        own = ["method.pretrain_iterations=0"] if method == "bcp" else []  # time BCP's self-training step
        if method == "vqseg":
            own.append("method.foundation=none")  # PFA is off on the LiteMedSAM backbone itself anyway
        spec = f"{method}:{','.join(own)}" if own else method
        pre = measure(spec, base + frozen, args.warmup, args.steps)
        unet = measure(spec, base, args.warmup, args.steps)
        lines.append(f"| {method} | {pre['median_s']:.3f} | {unet['median_s']:.3f} | {pre['median_s'] / unet['median_s']:.2f}x |")
        print(lines[-1], flush=True)

    lines += ["", f"## Prediction of a new ACDC test volume at {args.size} px (feature cache empty)", "",
              "| model | s / slice | slices |", "|---|---|---|"]
    for name, extra in (("frozen LiteMedSAM + DPT", frozen), ("U-Net", [])):
        seconds, count = prediction_cost(base + extra, 0)
        lines.append(f"| {name} | {seconds:.2f} | {count} |")
    text = "\n".join(lines)
    print(text)
    (REPO / "benchmarks" / "logs" / "pretrained_speed_cpu.log").write_text(text + "\n")


if __name__ == "__main__":
    main()
