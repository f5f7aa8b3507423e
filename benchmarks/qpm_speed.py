"""Speed of the vectorised QPM against the official per-code loop and the matmul floor.

The official VQ-Seg code perturbs indices with a Python loop over the unique selected codes,
syncing with the host several times per code; `perturb_indices` does the same draw in a few
chunked tensor ops. The floor is the one product any exact sampler needs: the selected codes'
rows times the codebook. Usage: python benchmarks/qpm_speed.py [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from vqseg.modules.qpm import perturb_indices

LOG_DIR = Path(__file__).resolve().parent / "logs"
CODEBOOK_SIZE, DIM, INDEX_SHAPE, EPS = 16384, 256, (8, 16, 16), 0.7
TARGETS = {"cpu": 10.0, "cuda": 100.0}  # loop / ours
FLOOR_TARGET = 4.0  # ours / floor


def per_code_loop(indices: Tensor, codebook: Tensor, eps: float, temperature: float = 1.0) -> Tensor:
    """The official algorithm: one distance row, softmax and multinomial per unique selected code."""
    flat = indices.reshape(-1)
    selected = torch.rand(flat.shape, device=flat.device) < eps
    if not selected.any():
        return indices
    out = flat.clone()
    for code in flat[selected].unique():
        code_id = int(code.item())
        sq_dist = (codebook - codebook[code_id]).pow(2).sum(dim=1)
        sq_dist[code_id] = float("inf")
        probs = torch.softmax(-sq_dist / temperature, dim=0)
        positions = (flat == code) & selected
        out[positions] = torch.multinomial(probs, int(positions.sum().item()), replacement=True)
    return out.view_as(indices)


def median_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each fn; the fns take turns so that load from other processes hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                tic = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - tic) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu_info = Path("/proc/cpuinfo")
    if cpu_info.exists():
        for line in cpu_info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def run(device: torch.device, repeats: int, loop_repeats: int) -> str:
    gen = torch.Generator(device=device).manual_seed(0)
    codebook = torch.randn(CODEBOOK_SIZE, DIM, device=device, generator=gen) * DIM**-0.5
    indices = torch.randint(CODEBOOK_SIZE, INDEX_SHAPE, device=device, generator=gen)
    selected_rows = indices.flatten()[torch.rand(indices.numel(), device=device, generator=gen) < EPS]

    per_code_loop(indices[:1, :1], codebook, EPS)  # warm up on 16 tokens: a full call takes seconds
    loop_ms = median_ms({"loop": lambda: per_code_loop(indices, codebook, EPS)}, device, loop_repeats, warmup=0)["loop"]
    fast = median_ms(
        {
            "ours": lambda: perturb_indices(indices, codebook, EPS, generator=gen),
            "floor": lambda: codebook[selected_rows] @ codebook.T,
        },
        device,
        repeats,
    )
    ours_ms, floor_ms = fast["ours"], fast["floor"]

    n_tokens, n_sel = indices.numel(), selected_rows.numel()
    header = [
        f"# QPM speed, {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"# torch {torch.__version__}, device {device.type}: {device_name(device)}, threads {torch.get_num_threads()}, "
        f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        f"# K={CODEBOOK_SIZE}, C={DIM}, indices {tuple(INDEX_SHAPE)} ({n_tokens} tokens), eps={EPS}, "
        f"{n_sel} selected, {len(selected_rows.unique())} unique selected codes; "
        f"median of {repeats} runs ({loop_repeats} for the loop)",
    ]
    rows = [
        ("per-code loop (official algorithm)", loop_ms),
        ("perturb_indices (ours)", ours_ms),
        (f"floor: ({n_sel} x {DIM}) @ ({DIM} x {CODEBOOK_SIZE})", floor_ms),
    ]
    width = max(len(name) for name, _ in rows)
    table = [f"| {'method':<{width}} | median ms |", f"|{'-' * (width + 2)}|-----------|"]
    table += [f"| {name:<{width}} | {ms:9.2f} |" for name, ms in rows]
    speedup, overhead = loop_ms / ours_ms, ours_ms / floor_ms
    target = TARGETS[device.type]
    verdict = {True: "met", False: "MISSED"}
    table += [
        "",
        f"loop / ours  = {speedup:7.1f}x  (target >= {target:g}x: {verdict[speedup >= target]})",
        f"ours / floor = {overhead:7.2f}x  (target <= {FLOOR_TARGET:g}x: {verdict[overhead <= FLOOR_TARGET]})",
    ]
    return "\n".join(header + [""] + table) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu, and cuda when available")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--loop-repeats", type=int, default=3, help="the loop takes tens of seconds on CPU")
    args = parser.parse_args()
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for name in devices:
        report = run(torch.device(name), args.repeats, args.loop_repeats)
        print(report)
        (LOG_DIR / f"qpm_speed_{name}.log").write_text(report)


if __name__ == "__main__":
    main()
