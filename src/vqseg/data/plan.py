"""A dataset's fingerprint and plan, computed once by ``vqseg prepare`` (as nnU-Net's planner does).

The fingerprint records what the files hold (each case's shape and spacing in file axis order, the
channel names, intensity statistics over the labelled foreground). The plan decides from it, once
per dataset, how every file is read: the array axis 3D volumes are sliced along (the axis with the
largest median spacing) and the intensity rule. Training, evaluation and ``predict`` read every
image and label with the plan, so no file decides for itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vqseg.data.casefiles import SPACING_TOLERANCE, slice_axis

# Foreground voxels sampled per case for the intensity statistics (nnU-Net samples 10,000).
SAMPLES_PER_CASE = 10_000


@dataclass
class FingerprintBuilder:
    """Collects per-case facts while ``prepare`` reads every file once."""

    channels: int
    shapes: dict[str, list[int]] = field(default_factory=dict)
    zooms: dict[str, list[float] | None] = field(default_factory=dict)
    samples: list[np.ndarray] = field(default_factory=list)  # per labelled case: N x C foreground intensities
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def add(self, name: str, shape: tuple[int, ...], zooms: tuple[float, ...] | None, image: np.ndarray,
            label: np.ndarray | None) -> None:
        """``image`` D x C x H x W as read, ``label`` D x H x W (or None) along the same axes."""
        self.shapes[name] = [int(s) for s in shape]
        self.zooms[name] = None if zooms is None else [float(z) for z in zooms]
        per_channel = image.transpose(1, 0, 2, 3).reshape(image.shape[1], -1)
        low, high = per_channel.min(axis=1).astype(float), per_channel.max(axis=1).astype(float)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)
        if label is not None:
            foreground = per_channel[:, label.reshape(-1) > 0].T
            if len(foreground) > SAMPLES_PER_CASE:
                rng = np.random.default_rng(len(self.samples))
                foreground = foreground[rng.choice(len(foreground), SAMPLES_PER_CASE, replace=False)]
            self.samples.append(foreground.astype(np.float64))

    def build(self, channel_names: list[str]) -> dict:
        voxels = np.concatenate(self.samples) if self.samples else np.zeros((0, self.channels))
        intensity = [
            {
                "min": float(self.low[c]),
                "max": float(self.high[c]),
                **(
                    {
                        "foreground_mean": float(voxels[:, c].mean()),
                        "foreground_std": float(voxels[:, c].std()),
                        "foreground_p00_5": float(np.percentile(voxels[:, c], 0.5)),
                        "foreground_p99_5": float(np.percentile(voxels[:, c], 99.5)),
                    }
                    if len(voxels)
                    else {}
                ),
            }
            for c in range(self.channels)
        ]
        volumes = [z for z in self.zooms.values() if z is not None and len(z) == 3]
        return {
            "channel_names": channel_names,
            "shapes": self.shapes,
            "spacings": self.zooms,
            "median_spacing": [float(v) for v in np.median(volumes, axis=0)] if volumes else None,
            "intensity": intensity,
        }


def make_plan(fingerprint: dict, intensity: str) -> dict:
    """How every file of the dataset is read: one slicing axis for all 3D volumes, one intensity rule."""
    median = fingerprint["median_spacing"]
    return {"slice_axis": None if median is None else slice_axis(tuple(median)), "intensity": intensity}


def cases_against_plan(fingerprint: dict, plan: dict) -> list[str]:
    """3D cases whose own largest spacing lies on another axis than the plan's (beyond the tolerance):
    they are sliced along the plan's axis like every case, but their orientation deserves a look."""
    axis = plan["slice_axis"]
    if axis is None:
        return []
    odd = []
    for name, zooms in sorted(fingerprint["spacings"].items()):
        if zooms is None or len(zooms) != 3:
            continue
        if zooms[axis] < max(zooms) * (1 - SPACING_TOLERANCE):
            odd.append(name)
    return odd


def describe_plan(fingerprint: dict, plan: dict) -> str:
    """One summary line: the slicing axis and why."""
    median = fingerprint["median_spacing"]
    if plan["slice_axis"] is None:
        return "plan: 2D images, read as they are"
    spacing = " x ".join(f"{v:.3g}" for v in median)
    return (
        f"plan: every volume sliced along array axis {plan['slice_axis']} (median spacing {spacing} mm in file "
        "axis order; the largest, ties to the last axis)"
    )
