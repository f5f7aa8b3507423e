"""What would it cost to let LiteMedSAM's neck (or its last stage) train on two cores? (issue 26, cause 4)

A frozen encoder leaves the unlabelled data only the head to move. The middle way is to cache what
enters the neck (the last stage's 320-channel map at 64 x 64 for a 256 px slice) and train the
neck: a 1x1 and a 3x3 convolution with their LayerNorms, or the last stage too (cache its input).
Measured in one process, so the ratios hold even on a busy machine:

1. the training step of the head on the stride-4 neck (``frozen_ssl_remedies_cpu``'s settings:
   supervised and VQ-Seg, batch 8 + 8, 256 px, bfloat16 encoder) with the engine's own step;
2. the neck's and the last stage's forward + backward per slice at 256 px (real weights, float32
   and under ``torch.autocast("cpu", dtype=torch.bfloat16)``), and forward only (a teacher's pass);
3. what a step would add: supervised runs the labelled batch through the student (8 slices forward
   and backward), VQ-Seg the labelled and unlabelled batches (16) plus the teacher's forward (8).

Prints a markdown table and writes benchmarks/logs/trainable_neck_cost_cpu.log.

    python benchmarks/trainable_neck_cost.py          # ~3 min on two cores
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import measure  # noqa: E402  (same folder: one worker for the step timings)

from vqseg.modules.foundation import build_tinyvit, litemedsam_weights, load_litemedsam  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEAD = [
    "data.dataset=acdc",
    f"data.root={os.environ.get('VQSEG_DATA', str(REPO.parent / 'shared' / 'data'))}/acdc",
    "data.labeled_cases=3",
    "model.name=litemedsam",
    "model.encoder_mode=frozen",
    "model.encoder_precision=bf16",
    "model.level_strides=[4, 8, 16, 4]",
    "model.dpt_strides=[4, 8, 16, 4]",
    "train.image_size=256",
    "train.batch_size=8",
    "train.unlabeled_batch_size=8",
    "train.device=cpu",
]
# as configs/cpu/litemedsam_acdc_3cases.yaml runs VQ-Seg on this head
METHODS = {"supervised": "supervised", "vqseg": "vqseg:method.dual_branch=false,method.vq_center=true,method.vq_pool=4"}


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def part_cost(part: nn.Module, x: torch.Tensor, precision: str, backward: bool, repeats: int) -> float:
    """Seconds per slice of ``part`` on the batch ``x`` (forward, and backward into its weights)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def run() -> None:
        part.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward), autocast:
            out = part(x)
        if backward:
            out.float().square().mean().backward()

    return median_seconds(run, repeats) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="slices per timed call of a part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method")
    parser.add_argument("--log", type=Path, default=Path(__file__).parent / "logs" / "trainable_neck_cost_cpu.log")
    args = parser.parse_args()
    torch.manual_seed(0)

    net = build_tinyvit(256)
    load_litemedsam(net, litemedsam_weights())
    last = net.layers[-1]
    neck_input = torch.randn(args.batch, net.neck[0].in_channels, 64, 64)
    stage_input = torch.randn(args.batch, 64 * 64, last.blocks[0].dim)  # TinyViT's last stage reads tokens

    parts = {"neck": (net.neck, neck_input), "last stage + neck": (nn.Sequential(last, _Tokens(64), net.neck), stage_input)}
    per_slice = {}
    for name, (part, x) in parts.items():
        part.train()
        for precision in ("fp32", "bf16"):
            per_slice[name, precision, "fwd+bwd"] = part_cost(part, x, precision, True, args.repeats)
            per_slice[name, precision, "fwd"] = part_cost(part, x, precision, False, args.repeats)
    steps = {m: measure(spec, HEAD, 2, args.steps)["median_s"] for m, spec in METHODS.items()}
    # slices through the trainable part per step: (forward + backward, forward only)
    passes = {"supervised": (8, 0), "vqseg": (16, 8)}

    lines = [
        f"# benchmarks/trainable_neck_cost.py, {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}",
        f"# parts timed on batches of {args.batch} slices at 256 px (neck input 320 x 64 x 64), median of "
        f"{args.repeats}; steps: median of {args.steps} after 2 warm-up, batch 8 + 8",
        "",
        "| part | precision | fwd + bwd, s/slice | fwd, s/slice | + supervised step (s) | + VQ-Seg step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in parts:
        for precision in ("fp32", "bf16"):
            both, fwd = per_slice[name, precision, "fwd+bwd"], per_slice[name, precision, "fwd"]
            added = {m: n * both + k * fwd for m, (n, k) in passes.items()}
            lines.append(f"| {name} | {precision} | {both:.3f} | {fwd:.3f} | {added['supervised']:.2f} "
                         f"({(steps['supervised'] + added['supervised']) / steps['supervised']:.1f}x) | "
                         f"{added['vqseg']:.2f} ({(steps['vqseg'] + added['vqseg']) / steps['vqseg']:.1f}x) |")
    lines += ["", f"head only (frozen encoder, cached features): supervised {steps['supervised']:.2f} s/step, "
              f"VQ-Seg {steps['vqseg']:.2f} s/step"]
    text = "\n".join(lines)
    print(text)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text(text + "\n")


class _Tokens(nn.Module):
    """TinyViT's last stage returns tokens; the neck reads a B x C x H x W map."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[-1], self.side, self.side)


if __name__ == "__main__":
    main()
