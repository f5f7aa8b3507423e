"""``vqseg demo``: the whole pipeline on built-in synthetic phantoms, on the CPU, in minutes.

Trains each requested method on a few labelled and many unlabelled phantom slices with the same
schedule, evaluates the validation-selected checkpoint on held-out phantom cases, and writes an
overlay and a loss-curve figure. The last line printed is VQ-Seg's test Dice when VQ-Seg is among
the methods, else the last method's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vqseg.config import load_config  # noqa: E402
from vqseg.data import load_split  # noqa: E402
from vqseg.engine.trainer import train  # noqa: E402
from vqseg.evaluation.evaluate import evaluate_run, load_run  # noqa: E402
from vqseg.inference import predict_volume  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
# Method settings that keep the demo inside its CPU budget: the foundation encoder would cost
# more than the whole training run, and a 1024-code book suffices for phantoms.
METHOD_OVERRIDES = {"vqseg": ["method.codebook_size=1024", "method.pfa=false"]}


def run_demo(output: Path, methods: list[str]) -> dict[str, float]:
    output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, float] = {}
    for name in methods:
        began = time.time()
        overrides = [f"method.name={name}", *METHOD_OVERRIDES.get(name, []), f"output_dir={output / name}"]
        cfg = load_config(CONFIG, overrides)
        train(cfg, overwrite=True)  # the demo regenerates its folders on every run
        summary = evaluate_run(output / name, "test")
        results[name] = summary["paper"]["mean"]["dice"]
        print(f"{name}: test Dice {results[name]:.3f} ({time.time() - began:.0f} s)", flush=True)
    _plot_losses(output, methods)
    _plot_overlay(output, methods)
    (output / "demo_results.json").write_text(json.dumps(results, indent=2))
    headline = "vqseg" if "vqseg" in results else methods[-1]
    print(f"figures: {output / 'loss_curves.png'}, {output / 'overlay.png'}")
    print(f"demo test Dice: {results[headline]:.3f}")
    return results


def _plot_losses(output: Path, methods: list[str]) -> None:
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    for name in methods:
        records = [json.loads(line) for line in (output / name / "metrics.jsonl").read_text().splitlines()]
        train_recs = [r for r in records if "loss" in r]
        val_recs = [r for r in records if "val_dice" in r]
        ax_loss.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], label=name)
        ax_val.plot([r["step"] for r in val_recs], [r["val_dice"] for r in val_recs], marker="o", label=name)
    ax_loss.set(xlabel="iteration", ylabel="training loss", yscale="log", title="training loss")
    ax_val.set(xlabel="iteration", ylabel="mean Dice", title="validation Dice")
    for ax in (ax_loss, ax_val):
        ax.legend()
    fig.tight_layout()
    fig.savefig(output / "loss_curves.png", dpi=100)
    plt.close(fig)


def _plot_overlay(output: Path, methods: list[str]) -> None:
    """Ground truth and each method's prediction on the middle slice of three test cases."""
    cfg = load_config(output / methods[0] / "config.yaml")
    cases = load_split(cfg, "test")[:3]
    predictors = {name: load_run(output / name)[1].eval() for name in methods}
    fig, axes = plt.subplots(len(cases), 1 + len(methods), figsize=(3 * (1 + len(methods)), 3 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        k = case.image.shape[0] // 2
        panels = {"ground truth": case.label[k]}
        for name, model in predictors.items():
            panels[name] = predict_volume(model, case.image[k : k + 1], cfg.train.image_size, 1, torch.device("cpu"))[0]
        for col, (title, label) in enumerate(panels.items()):
            ax = axes[row, col]
            ax.imshow(case.image[k, 0], cmap="gray")
            ax.imshow(np.ma.masked_equal(label, 0), cmap="jet", alpha=0.45, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(title if row == 0 else "")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(output / "overlay.png", dpi=100)
    plt.close(fig)
