"""Tiny synthetic datasets in the two user formats (image folder, nnU-Net v2 raw), for the own-data tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from vqseg.config import load_config

ZOOMS = (1.4, 1.5, 6.0)  # anisotropic: slices along the last axis


def rotated_affine(zooms: tuple[float, ...] = ZOOMS) -> np.ndarray:
    """A rotation about two axes, anisotropic spacing and a non-zero origin."""
    a, b = np.deg2rad(30), np.deg2rad(-20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(zooms)
    affine[:3, 3] = (-40.5, 12.25, 7.0)
    return affine


def blob_mask(rng: np.random.Generator, shape: tuple[int, int], classes: int = 2) -> np.ndarray:
    """Nested rectangles: class k inside class k-1, never empty."""
    mask = np.zeros(shape, np.uint8)
    h, w = shape
    for k in range(1, classes):
        top = int(rng.integers(0, h // 4 + 1)) + 2 * (k - 1)
        left = int(rng.integers(0, w // 4 + 1)) + 2 * (k - 1)
        mask[top : h - 2 * k, left : w - 2 * k] = k
    return mask


def write_image_folder(
    root: Path,
    count: int = 8,
    shape: tuple[int, int] = (14, 12),
    foreground: int = 1,
    ext: str = "png",
    mask_ext: str = "png",
    rgb: bool = True,
    unlabeled: int = 0,
    seed: int = 0,
) -> Path:
    """Images with arbitrary names, masks whose foreground is stored as ``foreground`` (1, 255...)."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count + unlabeled):
        mask = blob_mask(rng, shape)
        image = (rng.random(shape) * 80 + 150 * mask).astype(np.uint8)
        image = np.stack([image, image // 2, 255 - image], -1) if rgb else image
        name = f"case-{chr(97 + i % 26)}{i:02d}_x"
        folder = "images" if i < count else "unlabeled"
        (root / folder).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / folder / f"{name}.{ext}")
        if i < count:
            Image.fromarray((mask * foreground).astype(np.uint8)).save(root / "masks" / f"{name}.{mask_ext}")
    return root


def write_nnunet(
    root: Path,
    count: int = 6,
    shape: tuple[int, int, int] = (14, 12, 4),
    zooms: tuple[float, ...] = ZOOMS,
    channels: int = 1,
    unlabeled: int = 1,
    labels: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """An nnU-Net v2 raw 3D dataset with a rotated, anisotropic, shifted affine."""
    labels = labels or {"background": 0, "outer": 1, "inner": 2}
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    affine = rotated_affine(zooms)
    for i in range(count + unlabeled):
        label = np.stack([blob_mask(rng, shape[:2], len(labels)) for _ in range(shape[2])], axis=-1)
        name = f"pat{i:03d}"
        for c in range(channels):
            image = (rng.normal(100, 20, shape) + 300.0 * label * (c + 1)).astype(np.float32)
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}_{c:04d}.nii.gz")
        if i < count:
            nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")
    spec = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": labels,
        "numTraining": count + unlabeled,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


TINY_TRAIN = {
    "data.dataset": "prepared",
    "model.channels": [4, 8, 16, 32, 64],
    "train.image_size": 32,
    "train.iterations": 2,
    "train.val_every": 2,
    "train.log_every": 1,
    "train.batch_size": 2,
    "train.unlabeled_batch_size": 2,
    "train.device": "cpu",
    "eval.batch_size": 8,
}


def own_config(root: Path, output_dir: Path, **overrides: object):
    """configs/own.yaml with a tiny CPU schedule on the prepared dataset at ``root``."""
    values = {**TINY_TRAIN, "data.root": str(root), "output_dir": str(output_dir), **overrides}
    repo = Path(__file__).resolve().parents[1]
    return load_config(repo / "configs" / "own.yaml", [f"{k}={json.dumps(v)}" for k, v in values.items()])
