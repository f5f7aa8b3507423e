"""``vqseg predict RUN_DIR INPUT... -o OUT_DIR``: label new images and volumes with a trained run.

Everything comes from the run folder (config.yaml: image size, channels, classes, intensity rule,
mask encoding, slicing axis; the checkpoint), so a copied run folder predicts without the training
data. Cases are read like training data (``data/casefiles.py``) and predicted by the same
slice-wise inference as ``evaluate``; each result is written under the input's name in the input's
geometry (NIfTI: shape, affine and header, as a label map; 2D: a PNG at the input's size, masks in
the training masks' encoding). A failing case prints one error line naming its file, writes
nothing, and the others go on.
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
    is_nifti,
    prediction_filename,
    read_case,
    read_file,
    stem_of,
    stored_values,
    suffix_of,
    write_labels,
    write_overlay,
    write_probabilities,
)
from vqseg.data.nnunet import CHANNEL_FILE
from vqseg.data.volumes import DataError
from vqseg.inference import Inference, predict_case, predict_case_probabilities
from vqseg.models.pretrained import set_cache_writes
from vqseg.progress import progress_bar
from vqseg.run import load_run, run_rules, select_device


def _input_files(inputs: list[Path]) -> list[Path]:
    """Every image or volume file named or inside a named folder (not recursive, hidden files left out)."""
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
    return files


def _file_channels(path: Path) -> int:
    """Channels one file holds: a NIfTI volume one, a picture its own (grey 1, colour 3)."""
    if is_nifti(path):
        return 1
    try:
        return read_file(path).array.shape[1]
    except DataError:
        return 1  # its case reports the file when it is read


def _holds_channels(files: list[Path], channels: int) -> bool:
    """Whether ``files`` together hold ``channels``; every file holds at least one, so a longer list
    (a folder of video frames) is decided without reading a file."""
    return len(files) <= channels and sum(_file_channels(f) for f in files) == channels


def collect_cases(inputs: list[Path], channels: int) -> list[Case]:
    """Files and folders -> cases for a run trained on ``channels`` channels, in input order.

    ``NAME_0000``, ``NAME_0001``... of one folder (nnU-Net's ``imagesTs/``) are one case ``NAME``
    only when they number from ``_0000`` without a gap and together hold the run's channels.
    Otherwise each is a case of its own named by its full stem: frames of a video
    (``frame_0000.png``...) are predicted one by one, and channel files that do not fit the run fail
    one by one, each naming its file and its channel count.
    """
    files = _input_files(inputs)
    groups: dict[tuple[Path, str, str], dict[int, Path]] = {}
    for path in files:
        match = CHANNEL_FILE.match(stem_of(path))
        if match:
            groups.setdefault((path.parent, match.group(1), suffix_of(path) or ""), {})[int(match.group(2))] = path
    grouped: dict[Path, tuple[str, list[Path]]] = {}
    for (_, name, _), found in groups.items():
        ordered = [found[i] for i in sorted(found)]
        if sorted(found) == list(range(len(found))) and _holds_channels(ordered, channels):
            grouped.update((path, (name, ordered)) for path in ordered)
    cases: list[Case] = []
    for path in files:
        if path not in grouped:
            cases.append(Case(stem_of(path), [path]))
        elif path == grouped[path][1][0]:
            cases.append(Case(*grouped[path]))
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
    volume = read_case(
        case, run.intensity, run.encoding, cfg.data.num_classes, with_label=False, axis=cfg.data.slice_axis
    )
    channels = volume.image.shape[1]
    if channels != cfg.data.in_channels:
        raise DataError(f"{case.images[0]}: {channels} channel(s) but the run was trained on {cfg.data.in_channels}")
    target = out_dir / prediction_filename(volume)
    if target.resolve() in {p.resolve() for p in case.images} or target in written:
        raise DataError(f"{case.images[0]}: its output {target} would overwrite an input or another output")
    # Full-volume probabilities (K float32 per voxel) only when asked for; else the chunked argmax of evaluate.
    how = Inference.of(cfg)
    probs = predict_case_probabilities(run.predictor, volume, how, run.device) if probabilities else None
    labels = probs.argmax(axis=1).astype(np.uint8) if probs is not None else predict_case(run.predictor, volume, how,
                                                                                           run.device)
    write_labels(labels, volume, target, stored_values(run.encoding, cfg.data.num_classes, cfg.data.mask_values))
    written.add(target)
    extras = []
    if overlay and volume.image.shape[0] == 1:
        write_overlay(labels, volume, out_dir / f"{volume.name}_overlay.png")
        extras.append("overlay")
    elif overlay:
        extras.append("no overlay: --overlay is for 2D images")
    if probs is not None:
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
    set_cache_writes(predictor, False)  # new images are read once: they would only fill the feature cache
    dev = select_device(device)
    run = _Run(cfg, predictor.to(dev).eval(), dev, *run_rules(cfg))
    cases = collect_cases(inputs, cfg.data.in_channels)
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
