"""``vqseg predict RUN_DIR INPUT... -o OUT_DIR``: label new images and volumes with a trained run.

Everything comes from the run folder (config.yaml: image size, channels, classes, intensity rule,
mask encoding; the checkpoint), so a copied run folder predicts without the training data. Cases
are read like training data (``data/casefiles.py``) and predicted by the same slice-wise inference
as ``evaluate``; each result is written under the input's name in the input's geometry (NIfTI:
shape, affine and header; 2D: a PNG at the input's size, masks in the training masks' encoding).
A failing case prints one error line naming its file, writes nothing, and the others go on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqseg.config import Config
from vqseg.data.casefiles import (
    Case,
    label_scale,
    prediction_filename,
    read_case,
    stem_of,
    suffix_of,
    write_labels,
    write_overlay,
    write_probabilities,
)
from vqseg.data.nnunet import CHANNEL_FILE, group_channel_files
from vqseg.data.volumes import DataError
from vqseg.engine.trainer import select_device
from vqseg.evaluation.evaluate import load_run, run_rules
from vqseg.evaluation.inference import predict_probabilities
from vqseg.progress import progress_bar


def collect_cases(inputs: list[Path]) -> list[Case]:
    """Files and folders -> cases; nnU-Net channel files (``CASE_0000``, ``CASE_0001``...) form one case."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(sorted(f for f in path.iterdir() if f.is_file() and suffix_of(f) and not f.name.startswith(".")))
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path}: input does not exist")
    if not files:
        raise DataError(f"no images or volumes found in {', '.join(map(str, inputs))}")
    present = set(files)
    channel_files: dict[tuple[Path, str], list[Path]] = {}
    cases: list[Case] = []
    for path in files:
        match = CHANNEL_FILE.match(stem_of(path))
        suffix = suffix_of(path) or ""
        if match and path.with_name(f"{match.group(1)}_0000{suffix}") in present:
            channel_files.setdefault((path.parent, suffix), []).append(path)
        else:
            cases.append(Case(stem_of(path), [path]))
    for (folder, suffix), group in channel_files.items():
        cases.extend(Case(name, paths) for name, paths in group_channel_files(group, suffix, folder).items())
    return cases


@dataclass
class _Run:
    """A loaded run: its config, its predictor on the device, and how it reads images and writes masks."""

    cfg: Config
    predictor: torch.nn.Module
    device: torch.device
    intensity: str
    encoding: str


def _predict_case(case: Case, run: _Run, out_dir: Path, written: set[Path], overlay: bool, probabilities: bool) -> str:
    """Read, predict and write one case; returns its summary line. Every check comes before any write."""
    cfg = run.cfg
    volume = read_case(case, run.intensity, run.encoding, cfg.data.num_classes, with_label=False)
    channels = volume.image.shape[1]
    if channels != cfg.data.in_channels:
        raise DataError(f"{case.images[0]}: {channels} channel(s) but the run was trained on {cfg.data.in_channels}")
    target = out_dir / prediction_filename(volume)
    if target.resolve() in {p.resolve() for p in case.images} or target in written:
        raise DataError(f"{case.images[0]}: its output {target} would overwrite an input or another output")
    probs = predict_probabilities(
        run.predictor, volume.image, cfg.train.image_size, cfg.eval.batch_size, run.device, cfg.train.amp
    )
    labels = probs.argmax(axis=1).astype(np.uint8)
    write_labels(labels, volume, target, label_scale(run.encoding))
    written.add(target)
    extras = []
    if overlay and volume.image.shape[0] == 1:
        write_overlay(labels, volume, out_dir / f"{volume.name}_overlay.png")
        extras.append("overlay")
    elif overlay:
        extras.append("no overlay: --overlay is for 2D images")
    if probabilities:
        write_probabilities(probs, volume, out_dir / f"{volume.name}_probabilities.npz", cfg.data.class_names)
        extras.append("probabilities")
    counts = np.bincount(labels.ravel(), minlength=cfg.data.num_classes)[1:]
    found = ", ".join(f"{n} {c}" for n, c in zip(cfg.data.class_names, counts))
    size = "x".join(str(s) for s in volume.geometry.shape)
    more = f" (+ {', '.join(extras)})" if extras else ""
    unit = "voxels" if labels.shape[0] > 1 else "pixels"
    return f"{case.name}: {size} -> {target}{more}; foreground {unit}: {found}"


def predict_paths(
    run_dir: Path,
    inputs: list[Path],
    out_dir: Path,
    overlay: bool = False,
    probabilities: bool = False,
    checkpoint: str = "best",
    device: str = "auto",
) -> tuple[int, int]:
    """Predict every case; returns (written, failed). Per-case errors are printed, not raised."""
    cfg, predictor, _ = load_run(Path(run_dir), checkpoint)
    dev = select_device(device)
    run = _Run(cfg, predictor.to(dev).eval(), dev, *run_rules(cfg))
    cases = collect_cases(inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    failed = 0
    bar = progress_bar(len(cases), "predict")
    for case in cases:
        try:
            bar.write(_predict_case(case, run, out_dir, written, overlay, probabilities))
        except DataError as err:
            failed += 1
            bar.write(f"vqseg predict: error: {' '.join(str(err).split())}", file=sys.stderr)
        bar.update(1)
    bar.close()
    return len(cases) - failed, failed
