"""What the pseudo-labels of finished runs say about the structures, on slices whose labels training never saw.

On the frozen LiteMedSAM suites the semi-supervised runs lost validation Dice once their
pseudo-labels switched on (VQ-Seg: 0.65 at step 400, 0.46 at 1200; the supervised run kept
rising). This script measures the suspected cause, a pull towards background: on every k-th
unlabelled training slice of each run (the ACDC training patients it did not label; ACDC ships
their masks, which training never reads), the network that makes a method's pseudo-labels
(the EMA teacher where the method has one, else the trained network; eval mode, the plain
slice) predicts, and per structure we report

- ``area``: predicted pixels of the structure / its true pixels (below 1: the structure shrinks),
- ``kept right``: share of its true pixels confidently (>= threshold) given its own label,
- ``kept as bg``: share confidently labelled background, i.e. trained towards background,
- ``ignored``: share below the threshold (no pseudo-label there).

Reads the feature cache ($VQSEG_CACHE), so it runs in about a minute per checkpoint.
Prints a table and writes benchmarks/logs/pseudo_label_bias_cpu.log.

    python benchmarks/pseudo_label_bias.py runs/benchmark/pretrained_acdc_cpu_1200/{supervised,vqseg}/3cases_seed0
    python benchmarks/pseudo_label_bias.py results/pretrained_acdc_cpu_1200/vqseg/3cases_seed0 --checkpoints best
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def pseudo_labeller(run_dir: Path, checkpoint: str) -> tuple[object, torch.nn.Module, int]:
    """(config, network, step): best.pt holds only the validated network; last.pt the whole method."""
    from vqseg.io import load_weights
    from vqseg.run import build_run_method, load_run

    if checkpoint == "best":
        cfg, predictor, state = load_run(run_dir, "best")
        return cfg, predictor.eval(), int(state["step"])
    cfg, _, state = load_run(run_dir, "last")
    method = build_run_method(cfg, cfg.data.in_channels, cfg.data.num_classes)
    load_weights(method, state["method"], run_dir / "last.pt")
    network = method.teacher if isinstance(getattr(method, "teacher", None), torch.nn.Module) else method.predictor()
    return cfg, network.eval(), int(state["step"])


@torch.no_grad()
def class_rates(
    network: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    num_classes: int,
    batch: int = 32,
) -> list[dict[str, float]]:
    counts = torch.zeros(num_classes, 5)  # true, predicted, kept right, kept as background, ignored
    for x, y in zip(images.split(batch), labels.split(batch)):
        confidence, pred = network(x).float().softmax(dim=1).max(dim=1)
        y = y.long()
        sure = confidence >= threshold
        for c in range(num_classes):
            true = y == c
            counts[c] += torch.stack(
                [
                    true.sum(),
                    (pred == c).sum(),
                    (true & sure & (pred == c)).sum(),
                    (true & sure & (pred == 0)).sum(),
                    (true & ~sure).sum(),
                ]
            ).float()
    rates = counts[:, 1:] / counts[:, :1].clamp_min(1)  # per true pixel; an absent class reads 0
    return [dict(zip(("area", "right", "bg", "ignored"), r.tolist())) for r in rates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--slices", type=int, default=300, help="unlabelled slices, every k-th")
    parser.add_argument(
        "--checkpoints",
        default="best,last",
        help="best.pt (committed under results/) and/or last.pt (kept in the suite's run folders)",
    )
    parser.add_argument("--threshold", type=float, default=0.95, help="the methods' confidence threshold")
    parser.add_argument("--log", type=Path, default=REPO / "benchmarks" / "logs" / "pseudo_label_bias_cpu.log")
    args = parser.parse_args()
    checkpoints = args.checkpoints.split(",")
    if not set(checkpoints) <= {"best", "last"}:
        parser.error(f"--checkpoints: expected best and/or last, got {args.checkpoints!r}")

    from vqseg.config import resolve_path
    from vqseg.data.acdc import labeled_patients, load_splits, load_volumes
    from vqseg.data.volumes import stack_slices

    rows, sets = [], {}
    for run_dir in args.runs:
        for checkpoint in checkpoints:
            cfg, network, step = pseudo_labeller(run_dir, checkpoint)
            root = resolve_path(cfg.data.root)
            key = (str(root), str(cfg.data.labeled_cases), cfg.train.image_size)
            if key not in sets:
                splits = load_splits(root)
                labeled = labeled_patients(splits, cfg.data.labeled_cases)
                unlabeled = stack_slices(
                    load_volumes(root, [p for p in splits["train"] if p not in labeled]),
                    cfg.train.image_size,
                    keep_labels=True,
                )
                step_k = max(1, len(unlabeled.images) // args.slices)
                sets[key] = (unlabeled.images[::step_k][: args.slices], unlabeled.labels[::step_k][: args.slices])
            images, labels = sets[key]
            rates = class_rates(network, images, labels, args.threshold, cfg.data.num_classes)
            name = f"{run_dir.parent.name}/{run_dir.name}"
            for c, r in enumerate(rates[1:], start=1):
                rows.append(
                    f"| {name} | {checkpoint} (step {step}) | {cfg.data.class_names[c - 1]} "
                    f"| {r['area']:.2f} | {100 * r['right']:.1f} | {100 * r['bg']:.1f} | {100 * r['ignored']:.1f} |"
                )
            print(rows[-1], flush=True)
    lines = [
        f"# pseudo_label_bias, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
        f"load avg {os.getloadavg()[0]:.2f}",
        f"# {len(images)} unlabelled ACDC training slices (every k-th), threshold {args.threshold}; "
        "pseudo-labeller: the EMA teacher where the method has one (last.pt), else the network (best.pt: always)",
        "",
        "| run | checkpoint | structure | area pred/true | kept right % | kept as background % | ignored % |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    args.log.write_text(text + "\n")


if __name__ == "__main__":
    main()
