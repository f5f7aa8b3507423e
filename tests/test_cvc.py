"""CVC-ClinicDB image-folder reader: RGB frames, thresholded JPEG masks, sequence-disjoint labelling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from vqseg.data import DataError, load_split, load_training_data


def write_cvc(root: Path, frames_per_sequence: int = 2) -> dict:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    sequence_of_frame, rng = {}, np.random.default_rng(0)
    for frame in range(1, 13):
        image = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
        mask = np.zeros((20, 24), np.uint8)
        mask[5:12, 6:15] = 255
        Image.fromarray(image).save(root / "images" / f"{frame}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{frame}.jpg", quality=95)
        sequence_of_frame[str(frame)] = (frame - 1) // frames_per_sequence + 1
    splits = {"train": list(range(1, 9)), "val": [9, 10], "test": [11, 12], "sequence_of_frame": sequence_of_frame}
    (root / "splits.json").write_text(json.dumps(splits))
    return splits


def cvc_config(root: Path, **overrides):
    values = {"data.dataset": "cvc", "data.root": str(root), "data.num_classes": 2, "data.in_channels": 3,
              "data.class_names": ["polyp"], "data.labeled_cases": 2, "train.image_size": 16}
    values.update(overrides)
    return tiny_config(**values)


def test_frames_are_rgb_and_masks_binary(tmp_path):
    write_cvc(tmp_path)
    data = load_training_data(cvc_config(tmp_path))
    assert data.labeled.images.shape[1:] == (3, 16, 16) and data.in_channels == 3
    assert set(data.labeled.labels.unique().tolist()) == {0, 1}
    case = load_split(cvc_config(tmp_path), "test")[0]
    assert case.image.shape == (1, 3, 20, 24) and case.label.shape == (1, 20, 24)
    assert case.label[0, 5:12, 6:15].all() and case.label.sum() == 7 * 9  # JPEG noise thresholded away


def test_labeled_cases_count_whole_sequences(tmp_path):
    write_cvc(tmp_path)  # 4 training sequences of 2 frames
    data = load_training_data(cvc_config(tmp_path, **{"data.labeled_cases": 1}))
    assert len(data.labeled) == 2 and len(data.unlabeled) == 6
    assert {n.split("_")[0] for n in data.labeled.names} == {"frame1", "frame2"}


def test_errors_name_the_problem(tmp_path):
    write_cvc(tmp_path)
    with pytest.raises(DataError, match="sequences"):
        load_training_data(cvc_config(tmp_path, **{"data.labeled_cases": 9}))
    (tmp_path / "images" / "3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="3.jpg"):
        load_training_data(cvc_config(tmp_path))


def test_real_cvc_split_sizes(data_root):
    root = data_root / "cvc-clinicdb"
    if not (root / "splits.json").is_file():
        pytest.skip(f"CVC-ClinicDB not found at {root}")
    splits = json.loads((root / "splits.json").read_text())
    test = load_split(cvc_config(root), "test")
    assert len(test) == len(splits["test"]) == 139
    train_sequences = {splits["sequence_of_frame"][str(f)] for f in splits["train"]}
    test_sequences = {splits["sequence_of_frame"][str(f)] for f in splits["test"]}
    assert not train_sequences & test_sequences
