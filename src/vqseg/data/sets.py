"""The training sets a dataset reader hands over, in either mode (resized slices, or cases for patches)."""

from __future__ import annotations

from typing import Any

from vqseg.data.resample import volume_at_spacing
from vqseg.data.volumes import CaseSet, SliceSet, Volume, stack_slices


def training_set(volumes: list[Volume], cfg: Any, keep_labels: bool, channels: int = 1) -> SliceSet | CaseSet:
    """What training draws from: slices resized to ``train.image_size`` (resize mode, the published
    2D protocol), or, with ``train.patch_size``, the cases at ``data.target_spacing`` (their own
    voxels when it is empty) for patches to be drawn from."""
    if not cfg.train.patch_size:
        return stack_slices(volumes, cfg.train.image_size, keep_labels, channels)
    target = cfg.data.target_spacing or None
    cases = [volume_at_spacing(v, target, cfg.data.num_classes) for v in volumes]
    labels = [label for _, label in cases] if keep_labels else None
    return CaseSet([image for image, _ in cases], labels, [v.name for v in volumes])

