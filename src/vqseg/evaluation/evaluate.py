"""``vqseg evaluate RUN_DIR``: score the validation-selected checkpoint on a split, write JSON + markdown."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vqseg.config import Config, ConfigError, load_config
from vqseg.data import load_split
from vqseg.engine.checkpoint import load_checkpoint
from vqseg.engine.trainer import build_run_method, select_device
from vqseg.evaluation.inference import predict_volumes
from vqseg.evaluation.metrics import aggregate, format_markdown, score_volume


def load_run(run_dir: Path, checkpoint: str = "best") -> tuple[Config, torch.nn.Module, dict]:
    """Rebuild the run's predictor from its saved config and load the chosen weights."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {config_path} is missing")
    cfg = load_config(config_path)
    state = load_checkpoint(run_dir / f"{checkpoint}.pt")
    method = build_run_method(cfg, cfg.data.in_channels, cfg.data.num_classes)
    predictor = method.predictor()
    predictor.load_state_dict(state["predictor"])
    return cfg, predictor, state


def evaluate_run(
    run_dir: Path, split: str = "test", checkpoint: str = "best", device: str = "auto", spacing: list[float] | None = None
) -> dict:
    run_dir = Path(run_dir)
    cfg, predictor, state = load_run(run_dir, checkpoint)
    dev = select_device(device)
    predictor.to(dev)
    volumes = load_split(cfg, split)
    began = time.time()
    predictions = predict_volumes(predictor, volumes, cfg.train.image_size, cfg.eval.batch_size, dev, cfg.train.amp)
    predict_s = time.time() - began
    spacing = spacing if spacing is not None else cfg.eval.spacing
    # One-slice cases (2D datasets) are scored as images: a 3D surface of a single slice would
    # count every foreground pixel as boundary.
    def as_scored(labels):
        return labels[0] if labels.shape[0] == 1 else labels

    scores = [
        score_volume(as_scored(pred), as_scored(vol.label), cfg.data.num_classes, tuple(spacing) if spacing else None)
        for pred, vol in zip(predictions, volumes)
    ]
    summary = aggregate(scores, cfg.data.class_names)
    summary.update(
        split=split,
        checkpoint=checkpoint,
        checkpoint_step=state.get("step"),
        checkpoint_val_dice=state.get("val_dice"),
        predict_seconds=predict_s,
        total_seconds=time.time() - began,
        units="mm" if spacing else "voxels",
    )
    (run_dir / f"eval_{split}.json").write_text(json.dumps(summary, indent=2))
    header = (
        f"# {run_dir.name}: {split} split, {len(volumes)} cases, checkpoint '{checkpoint}' "
        f"(step {state.get('step')}, chosen on validation Dice {state.get('val_dice')})\n\n"
    )
    (run_dir / f"eval_{split}.md").write_text(header + format_markdown(summary) + "\n")
    return summary
