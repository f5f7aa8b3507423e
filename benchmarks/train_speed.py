"""Training-step throughput and peak memory per method, and the time to evaluate ACDC's test split.

Each method runs in its own subprocess (so peak memory is its own) on the real ACDC training
slices at 256 x 256 with batch 12 labelled + 12 unlabelled, the SSL4MIS protocol's setting.
Prints a markdown table and writes it to benchmarks/logs/train_speed_<device>.log. A frozen
pretrained encoder (``model.name=litemedsam``) trains on a feature bank of zeros with the real
shapes: the step does not depend on the values, and the one-time cache is timed by
benchmarks/pretrained_speed.py.

    python benchmarks/train_speed.py --methods supervised "vqseg:method.pfa=false" --steps 5
    python benchmarks/train_speed.py --eval-run runs/acdc_cpu/supervised_3cases
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, sys, time, torch
from unittest import mock
from vqseg.config import load_config
from vqseg.data import load_training_data
from vqseg.engine.distributed import DistInfo
from vqseg.engine.trainer import Streams, make_optimizer, optimization_step, peak_memory_mb
from vqseg.run import build_run_method, select_device
from vqseg.models.pretrained import PyramidBackbone
cfg = load_config(None, json.loads(sys.argv[1]))
device = select_device(cfg.train.device)
data = load_training_data(cfg)
method = build_run_method(cfg, data.in_channels, data.num_classes).to(device)


def zeros(backbone, images, **kwargs):  # a step's cost does not depend on the bank's values: no cache
    return [torch.zeros(len(images), c, s, s, dtype=torch.float16) for c, s in zip(backbone.out_channels, backbone.sides)]


with mock.patch.object(PyramidBackbone, "cached", zeros):
    method.prepare(data)
method.train()
params = [p for p in method.parameters() if p.requires_grad]
optimizer = make_optimizer(cfg, method.parameter_groups())
info = DistInfo()
streams = Streams.for_rank(cfg, data, method.uses_unlabeled, info)
def step(i):
    optimization_step(method, optimizer, params, streams.next_batch(data, method, device), i, cfg.train.amp, info)
    if device.type == "cuda":
        torch.cuda.synchronize()
warmup, steps = int(sys.argv[2]), int(sys.argv[3])
for i in range(warmup):
    step(i)
times = []
for i in range(steps):
    t = time.perf_counter(); step(warmup + i); times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"median_s": times[len(times) // 2], "peak_mb": peak_memory_mb(device),
                  "params_m": sum(p.numel() for p in params) / 1e6}))
"""


def measure(spec: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """``spec`` is a method name, optionally with its own overrides: ``vqseg:method.pfa=false,method.eps=0.5``."""
    method, _, extra = spec.partition(":")
    args = [f"method.name={method}", *overrides, *(e for e in extra.split(",") if e)]
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, json.dumps(args), str(warmup), str(steps)],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["supervised", "vqseg"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every method")
    parser.add_argument("--eval-run", default=None, help="a trained run folder: time `evaluate` on its test split")
    args = parser.parse_args()

    base = [
        "data.dataset=acdc",
        f"data.root={os.environ.get('VQSEG_DATA', str(REPO.parent / 'shared' / 'data'))}/acdc",
        "data.labeled_cases=3",
        "train.image_size=256",
        "train.batch_size=12",
        "train.unlabeled_batch_size=12",
        f"train.device={args.device}",
        *args.set,
    ]
    lines = [
        f"# train_speed, {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, device {args.device}, torch threads default, load avg {os.getloadavg()[0]:.2f}",
        f"# ACDC slices 256 x 256, batch 12 labelled + 12 unlabelled; median of {args.steps} steps after {args.warmup} warm-up",
        f"# overrides: {' '.join(args.set) or '(none)'}",
        "",
        "| method | s / step | it / s | peak memory (MB) | trainable params (M) | cost vs supervised |",
        "|---|---|---|---|---|---|",
    ]
    results = {m: measure(m, base, args.warmup, args.steps) for m in args.methods}
    ref = next((r for name, r in results.items() if name.partition(":")[0] == "supervised"), next(iter(results.values())))
    ref = ref["median_s"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['median_s']:.3f} | {1 / r['median_s']:.3f} | {r['peak_mb']:.0f} | {r['params_m']:.2f} | {r['median_s'] / ref:.2f}x |"
        )
    if args.eval_run:
        began = time.time()
        subprocess.run([sys.executable, "-m", "vqseg.cli", "evaluate", args.eval_run, "--split", "test", "--device", args.device],
                       check=True, cwd=REPO, capture_output=True)
        summary = json.loads((Path(args.eval_run) / "eval_test.json").read_text())
        lines += [
            "",
            f"evaluate {args.eval_run} on the test split ({summary['num_volumes']} volumes): "
            f"{time.time() - began:.1f} s end to end (process start, loading, prediction "
            f"{summary['predict_seconds']:.1f} s, metrics {summary['total_seconds'] - summary['predict_seconds']:.1f} s)",
        ]
    text = "\n".join(lines)
    print(text)
    log = REPO / "benchmarks" / "logs" / f"train_speed_{args.device}.log"
    log.write_text(text + "\n")


if __name__ == "__main__":
    main()
