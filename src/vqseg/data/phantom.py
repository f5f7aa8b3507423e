"""Synthetic short-axis cardiac phantoms: the built-in default that needs no data.

Each case is a stack of slices from base to apex with an LV blood pool, a myocardial ring and an
RV crescent, under a random pose, with tissue texture, a smooth bias field and Rician-like noise,
so the demo exercises the same code path (volumes, slice training, 3D scoring) as ACDC.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from vqseg.config import Config
from vqseg.data.sets import training_set
from vqseg.data.volumes import DatasetReader, SegmentationData, Volume
from vqseg.registry import DATASETS

CLASS_NAMES = ["RV", "Myo", "LV"]
SLICES_PER_CASE = 6


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise by bilinear upsampling of a coarse random grid (texture, bias field)."""
    coarse = rng.standard_normal((cells + 1, cells + 1))
    ys = np.linspace(0, cells, shape[0])
    xs = np.linspace(0, cells, shape[1])
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    c = coarse
    return (
        c[y0][:, x0] * (1 - fy) * (1 - fx)
        + c[y0 + 1][:, x0] * fy * (1 - fx)
        + c[y0][:, x0 + 1] * (1 - fy) * fx
        + c[y0 + 1][:, x0 + 1] * fy * fx
    )


def make_case(rng: np.random.Generator, name: str, slices: int = SLICES_PER_CASE, shape: tuple[int, int] = (80, 72)) -> Volume:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    cy, cx = h / 2 + rng.uniform(-0.12, 0.12) * h, w / 2 + rng.uniform(-0.12, 0.12) * w
    scale = rng.uniform(0.8, 1.2) * min(h, w) / 80
    # Coordinates in the heart's own frame: u along the LV->RV axis.
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / scale
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / scale
    images, labels = [], []
    for k in range(slices):
        taper = 1.0 - 0.5 * k / max(slices - 1, 1)  # structures shrink towards the apex
        r_lv = rng.uniform(8, 11) * taper
        wall = rng.uniform(3.5, 5.0) * (0.8 + 0.2 * taper)
        ellipticity = rng.uniform(0.85, 1.15)
        r = np.sqrt(u**2 + (v * ellipticity) ** 2)
        label = np.zeros((h, w), np.uint8)
        rv_r = (r_lv + wall) * rng.uniform(1.2, 1.5)
        rv_centre = r_lv + wall * 0.6
        rv = (np.sqrt((u - rv_centre) ** 2 + (v / 1.3) ** 2) < rv_r) & (r > r_lv + wall)
        label[rv] = 1
        label[r < r_lv + wall] = 2
        label[r < r_lv] = 3
        tissue = 0.25 + 0.05 * smooth_noise(rng, shape, 8)
        intensity = np.select(
            [label == 3, label == 2, label == 1],
            [rng.uniform(0.75, 0.9), rng.uniform(0.3, 0.4), rng.uniform(0.65, 0.8)],
            default=0.0,
        )
        image = np.where(label > 0, intensity, tissue) + 0.04 * smooth_noise(rng, shape, 16)
        image *= 1.0 + 0.25 * smooth_noise(rng, shape, 2)  # coil bias field
        noise = rng.normal(0, 0.04, (2, h, w))
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
        images.append(image / image.max())
        labels.append(label)
    return Volume(name, np.stack(images).astype(np.float32)[:, None], np.stack(labels))


def make_cases(seed: int, count: int, prefix: str) -> list[Volume]:
    rng = np.random.default_rng(seed)
    return [make_case(rng, f"{prefix}{i:03d}") for i in range(count)]


# split -> (generator seed, case-name prefix); disjoint seeds, so no phantom leaks between splits
_SPLITS = {"labeled": (1000, "lab"), "unlabeled": (2000, "unl"), "val": (3000, "val"), "test": (4000, "test")}


def _case_counts(cfg: Config) -> dict[str, int]:
    d = cfg.data
    return {
        "labeled": max(1, -(-d.phantom_labeled // SLICES_PER_CASE)),
        "unlabeled": max(1, -(-d.phantom_unlabeled // SLICES_PER_CASE)),
        "val": max(1, d.phantom_val // SLICES_PER_CASE),
        "test": max(1, d.phantom_test // SLICES_PER_CASE),
    }


def _cases(cfg: Config, split: str) -> list[Volume]:
    seed, prefix = _SPLITS[split]
    return make_cases(seed, _case_counts(cfg)[split], prefix)


def _first_slices(volumes: list[Volume], count: int) -> list[Volume]:
    """The cases cut to their first ``count`` slices in all (``data.phantom_labeled`` counts slices)."""
    kept = []
    for volume in volumes:
        take = min(count, len(volume.image))
        if take:
            kept.append(replace(volume, image=volume.image[:take], label=volume.label[:take]))
        count -= take
    return kept


def phantom_split_lists(cfg: Config) -> dict[str, list[str]]:
    return {split: [f"{_SPLITS[split][1]}{i:03d}" for i in range(n)] for split, n in _case_counts(cfg).items()}


def load_phantom_split(cfg: Config, split: str) -> list[Volume]:
    return _cases(cfg, split)


def load_phantom(cfg: Config) -> SegmentationData:
    return SegmentationData(
        labeled=training_set(_first_slices(_cases(cfg, "labeled"), cfg.data.phantom_labeled), cfg, keep_labels=True),
        unlabeled=training_set(_cases(cfg, "unlabeled"), cfg, keep_labels=False),
        val=load_phantom_split(cfg, "val"),
        num_classes=4,
        class_names=CLASS_NAMES,
        in_channels=1,
    )


DATASETS.register("phantom")(DatasetReader(load_phantom, load_phantom_split, phantom_split_lists, synthetic=True))
