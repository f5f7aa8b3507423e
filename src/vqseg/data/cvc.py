"""CVC-ClinicDB colonoscopy frames (2D RGB) with polyp masks, as an image-folder dataset.

Layout: ``images/N.jpg``, ``masks/N.jpg`` (JPEG masks, thresholded at 127), ``splits.json`` with
frame ids per split and ``sequence_of_frame``. Each frame is a one-slice case, so training and
evaluation share the volume code path; scores are per image (2D). ``data.labeled_cases`` counts
training *sequences* (in ascending id order), so labelled and unlabelled frames never come from
the same video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vqseg.config import Config, resolve_path
from vqseg.data.sets import training_set
from vqseg.data.splits import SPLITS, read_splits
from vqseg.data.volumes import DataError, DatasetReader, SegmentationData, Volume, check_volume
from vqseg.registry import DATASETS

CLASS_NAMES = ["polyp"]


def _read_image(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err})") from None


def read_frame(root: Path, frame: int) -> Volume:
    image = _read_image(root / "images" / f"{frame}.jpg", "RGB").astype(np.float32) / 255.0
    label = (_read_image(root / "masks" / f"{frame}.jpg", "L") > 127).astype(np.uint8)
    image = image.transpose(2, 0, 1)[None]
    check_volume(image, label[None], 2, root / "images" / f"{frame}.jpg")
    return Volume(f"frame{frame}", image, label[None])


def _splits(cfg: Config) -> tuple[Path, dict]:
    """The split file, with ``sequence_of_frame`` turned into {frame id: sequence id} and checked to
    cover every frame (labelled and unlabelled frames are separated by sequence)."""
    root = resolve_path(cfg.data.root)
    path = root / "splits.json"
    splits = read_splits(path, "frame")
    raw = splits.get("sequence_of_frame")
    if not raw or not isinstance(raw, dict):
        raise DataError(f"{path}: 'sequence_of_frame' is missing or empty (a mapping frame id -> sequence id)")
    try:
        sequence = {int(frame): seq for frame, seq in raw.items()}
    except ValueError:
        raise DataError(f"{path}: 'sequence_of_frame' keys must be integer frame ids") from None
    if not all(isinstance(seq, int) and not isinstance(seq, bool) for seq in sequence.values()):
        raise DataError(f"{path}: 'sequence_of_frame' values must be integer sequence ids")
    missing = sorted({f for key in SPLITS for f in splits[key]} - set(sequence))
    if missing:
        raise DataError(f"{path}: frames {missing[:10]} are missing from 'sequence_of_frame'")
    splits["sequence_of_frame"] = sequence
    return root, splits


def load_cvc_split(cfg: Config, split: str) -> list[Volume]:
    root, splits = _splits(cfg)
    return [read_frame(root, frame) for frame in splits[split]]


def _labeled_frames(cfg: Config) -> tuple[Path, dict, list[bool]]:
    """The split file, and for each training frame whether its sequence is labelled."""
    root, splits = _splits(cfg)
    sequence = splits["sequence_of_frame"]
    train_sequences = sorted({sequence[f] for f in splits["train"]})
    count = cfg.data.labeled_cases
    if isinstance(count, list):
        labeled_sequences = set(count)
        unknown = labeled_sequences - set(train_sequences)
        if unknown:
            raise DataError(f"data.labeled_cases names sequences {sorted(unknown)} that are not in the training split")
    else:
        if not 1 <= count <= len(train_sequences):
            raise DataError(f"data.labeled_cases={count} but the training split has {len(train_sequences)} sequences")
        labeled_sequences = set(train_sequences[:count])
    return root, splits, [sequence[f] in labeled_sequences for f in splits["train"]]


def cvc_split_lists(cfg: Config) -> dict[str, list[str]]:
    _, splits, is_labeled = _labeled_frames(cfg)
    train = [f"frame{f}" for f in splits["train"]]
    return {
        "labeled": [n for n, lab in zip(train, is_labeled) if lab],
        "unlabeled": [n for n, lab in zip(train, is_labeled) if not lab],
        "val": [f"frame{f}" for f in splits["val"]],
        "test": [f"frame{f}" for f in splits["test"]],
    }


def load_cvc(cfg: Config) -> SegmentationData:
    root, splits, is_labeled = _labeled_frames(cfg)
    frames = [read_frame(root, f) for f in splits["train"]]
    return SegmentationData(
        labeled=training_set([v for v, lab in zip(frames, is_labeled) if lab], cfg, keep_labels=True, channels=3),
        unlabeled=training_set([v for v, lab in zip(frames, is_labeled) if not lab], cfg, keep_labels=False, channels=3),
        val=load_cvc_split(cfg, "val"),
        num_classes=2,
        class_names=CLASS_NAMES,
        in_channels=3,
    )


DATASETS.register("cvc")(DatasetReader(load_cvc, load_cvc_split, cvc_split_lists))
