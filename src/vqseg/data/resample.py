"""Resampling cases to a plan's target spacing, and predictions back to the case's own grid.

Images are resampled linearly (bilinear or trilinear, pixel centres aligned as ``resize_images``):
nnU-Net uses a third-order spline (scipy), which overshoots at sharp edges and is far slower on a
CPU; at the factors a plan asks for (to the median spacing, mostly well below 2x) linear is close
to it, and it runs on the device. Labels are resampled as nnU-Net does (its order-1 segmentation
resampling): each class's one-hot map linearly, then the argmax, so boundaries move smoothly
instead of the staircase of nearest neighbour and thin structures are not dropped at random.
Predictions go back the same way, class probabilities resampled, then the argmax.

A shape that does not change returns the input itself, untouched (an identity spacing is a no-op
bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from vqseg.data.volumes import DataError, Volume

_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The grid that covers the same extent at ``target`` spacing (rounded, at least one voxel), as nnU-Net."""
    return tuple(max(1, round(s * sp / t)) for s, sp, t in zip(shape, spacing, target))


def resample_image(image: Tensor, shape: Sequence[int]) -> Tensor:
    """C x *spatial (1 to 3 axes) float, or class probabilities, linearly to ``shape``."""
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    return F.interpolate(image[None], size=tuple(shape), mode=_LINEAR[len(shape)], align_corners=False)[0]


def _argmax_resampled(maps: Callable[[int], Tensor], count: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """The argmax over ``count`` per-class maps resampled to ``shape``, one class at a time (the
    classes of a whole CT at once would take gigabytes); ties go to the lower class, as ``argmax``."""
    best = torch.full(tuple(shape), -math.inf, device=device)
    labels = torch.zeros(tuple(shape), dtype=torch.long, device=device)
    for c in range(count):
        score = resample_image(maps(c)[None].float(), shape)[0]
        higher = score > best
        labels[higher] = c
        best = torch.where(higher, score, best)
    return labels


def resample_labels(label: Tensor, shape: Sequence[int], num_classes: int) -> Tensor:
    """*spatial integer labels to ``shape``: each class's one-hot map linearly, then the argmax (same dtype)."""
    if tuple(label.shape) == tuple(shape):
        return label
    return _argmax_resampled(lambda c: label == c, num_classes, shape, label.device).to(label.dtype)


def labels_at_shape(probabilities: Tensor, shape: Sequence[int]) -> Tensor:
    """A prediction made at the planned spacing, back on the case's own grid: K x *spatial class
    probabilities resampled to ``shape``, then the argmax (long)."""
    if tuple(probabilities.shape[1:]) == tuple(shape):
        return probabilities.argmax(0)
    return _argmax_resampled(lambda c: probabilities[c], probabilities.shape[0], shape, probabilities.device)


def volume_at_spacing(
    volume: Volume, target: Sequence[float] | None, num_classes: int
) -> tuple[Tensor, Tensor | None]:
    """A case at a configuration's spacing: image C x D x H x W float32, label D x H x W (or None).

    ``target``: None keeps the voxels (voxel units); three values resample D, H and W; two (a "2d"
    configuration) resample each slice in-plane and keep the slices. A case without spacing cannot be
    resampled: a DataError names it.
    """
    image = torch.from_numpy(np.ascontiguousarray(volume.image.transpose(1, 0, 2, 3), dtype=np.float32))
    label = None if volume.label is None else torch.from_numpy(np.ascontiguousarray(volume.label))
    if target is None:
        return image, label
    if volume.spacing is None:
        source = volume.geometry.source if volume.geometry is not None else volume.name
        raise DataError(
            f"{source}: no spacing stored, but the plan resamples to {' x '.join(f'{t:g}' for t in target)} mm; "
            "give the file a spacing or plan the dataset in voxel units"
        )
    if len(target) == 2:  # a "2d" configuration: in-plane only, each slice stays where it is
        target = (volume.spacing[0], *target)
    shape = resampled_shape(image.shape[1:], volume.spacing, target)
    return resample_image(image, shape), None if label is None else resample_labels(label, shape, num_classes)
