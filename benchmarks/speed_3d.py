"""What a 3D training step of every method and the sliding-window prediction of a volume cost, with
peak memory: ACDC as 3D volumes (the bundled h5 files, voxel units) on the 3D U-Net in patch mode.

Each method's step is timed in its own process (``train_speed.measure``: the engine's streams and
``optimization_step``, median of ``--steps`` after ``--warmup``), so peak memory is that method's
alone; sliding-window prediction of the first ``--volumes`` test volumes runs in a further process.
The planner's memory budget is ``--set train.memory_budget_mb=...``; a patch over it is refused.

    python benchmarks/speed_3d.py                     # CPU, about 10 min on two cores
    python benchmarks/speed_3d.py --device cuda --set "train.patch_size=[16, 256, 224]"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from train_speed import REPO, measure  # noqa: E402  (same folder: one step worker for both benchmarks)

# ACDC volumes are 6-18 slices of 10 mm at ~1.5 mm in-plane: pool in-plane first, 1 x 3 x 3 kernels
# until the in-plane spacing has caught up (nnU-Net's rule; the h5 files store no spacing, so it is given).
ACDC_3D = [
    "data.dataset=acdc",
    "data.labeled_cases=7",
    "model.name=unet3d",
    "model.channels=[16, 32, 64, 128, 256]",
    "model.dropout=[0, 0, 0, 0, 0]",
    "model.pool=[[1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]]",
    "model.kernels=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]",
    "aug.anisotropic=true",
    "train.patch_size=[8, 128, 128]",
    "train.batch_size=2",
    "train.unlabeled_batch_size=2",
]

_PREDICT = r"""
import json, sys, time, resource, torch
from vqseg.config import load_config
from vqseg.data import load_split, resolve_data_config
from vqseg.inference import Inference, predict_cases
from vqseg.run import build_run_method, select_device
cfg = load_config(None, json.loads(sys.argv[1]))
resolve_data_config(cfg)
device = select_device(cfg.train.device)
volumes = load_split(cfg, "test")[: int(sys.argv[2])]
model = build_run_method(cfg, cfg.data.in_channels, cfg.data.num_classes).predictor().to(device)
predict_cases(model, volumes[:1], Inference.of(cfg), device)  # warm-up
began = time.perf_counter()
predict_cases(model, volumes, Inference.of(cfg), device)
seconds = (time.perf_counter() - began) / len(volumes)
peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"s_per_volume": seconds, "peak_mb": peak, "voxels": sum(v.image[:, 0].size for v in volumes) / len(volumes)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=[
        "supervised", "mean_teacher", "unimatch", "bcp", "cps", "vqseg:method.foundation=none"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    args = parser.parse_args()
    data = os.environ.get("VQSEG_DATA", str(REPO.parent / "shared" / "data"))
    base = [*ACDC_3D, f"data.root={data}/acdc", f"train.device={args.device}", *args.set]
    lines = [
        f"# speed_3d, {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, device {args.device}, load average {os.getloadavg()[0]:.2f}",
        f"# ACDC volumes in 3D patch mode: {' '.join(base[1:]).replace(str(data), '$VQSEG_DATA')}",
        f"# a step: median of {args.steps} after {args.warmup} warm-up, its own process (peak memory its own)",
        "",
        "| method | s / step | peak memory (MB) | trainable params (M) | cost vs supervised |",
        "|---|---|---|---|---|",
    ]
    results = {m: measure(m, base, args.warmup, args.steps) for m in args.methods}
    reference = results.get("supervised", next(iter(results.values())))["median_s"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['peak_mb']:.0f} | {r['params_m']:.2f} | "
                     f"{r['median_s'] / reference:.2f}x |")
    predict_args = [*base, "method.name=supervised", f"eval.batch_size={2 if args.device == 'cpu' else 8}"]
    out = subprocess.run([sys.executable, "-c", _PREDICT, json.dumps(predict_args), str(args.volumes)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    p = json.loads(out.stdout.strip().splitlines()[-1])
    lines += ["", f"sliding-window prediction (overlap 0.5, Gaussian weights, labels streamed): "
                  f"{p['s_per_volume']:.1f} s per test volume ({p['voxels'] / 1e6:.2f} M voxels on average, "
                  f"first {args.volumes}), peak memory {p['peak_mb']:.0f} MB"]
    text = "\n".join(lines)
    print(text)
    (REPO / "benchmarks" / "logs" / f"speed_3d_{args.device}.log").write_text(text + "\n")


if __name__ == "__main__":
    main()
