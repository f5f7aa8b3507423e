"""Fill the frozen encoder's feature cache for every slice a config trains, validates and tests on,
and time it: the one-time cost of the CPU mode, reported apart from training.

Training fills the cache for the slices it uses (labelled, unlabelled when the method uses them,
validation) and ``evaluate`` for the test slices; this does all of it up front, split by split,
and prints seconds per slice and the size on disk. A second run finds everything cached.

    python benchmarks/fill_feature_cache.py configs/cpu/litemedsam_acdc_3cases.yaml \
        --set model.encoder_precision=bf16 --log benchmarks/logs/feature_cache_fill_bf16_cpu.log
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from vqseg.config import load_config
from vqseg.data import load_split, load_training_data, resolve_data_config
from vqseg.inference import model_inputs
from vqseg.models import build_model
from vqseg.modules import foundation


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.pt")) if folder.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.set, "data.labeled_cases=1"])  # every training slice, one set
    resolve_data_config(cfg)
    backbone = build_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes).encoder.backbone
    data = load_training_data(cfg)
    device = torch.device("cpu")
    sets = {
        "training": torch.cat([data.labeled.images, data.unlabeled.images]),
        "validation": torch.cat([x for v in data.val for x in model_inputs(v.image, cfg.train.image_size, 32, device)]),
        "test": torch.cat([x for v in load_split(cfg, "test")
                           for x in model_inputs(v.image, cfg.train.image_size, 32, device)]),
    }
    root = foundation.cache_root()
    lines = [
        f"# benchmarks/fill_feature_cache.py {args.config} {' '.join('--set ' + s for s in args.set)}".rstrip(),
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"load average at start {os.getloadavg()[0]:.2f}; encoder {backbone.identity()[:80]}...",
        "| slices | count | seconds | s / slice | cache on disk after (GB) |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, images in sets.items():
        start = time.perf_counter()
        backbone.cached(images, progress=True)
        seconds = time.perf_counter() - start
        lines.append(f"| {name} | {len(images)} | {seconds:.0f} | {seconds / len(images):.3f} | "
                     f"{folder_bytes(root) / 1e9:.2f} |")
        print(lines[-1], flush=True)
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
