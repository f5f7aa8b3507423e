"""In-memory volumes and slice sets shared by every dataset reader.

Everything a 2D method trains on fits in memory, so readers load once, validate once (naming the
file on any problem) and hand over tensors; the training loop never touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from vqseg.errors import UserError


@dataclass(frozen=True)
class DatasetReader:
    """What a dataset registers (``vqseg.registry.DATASETS``): its training data, one split's cases,
    the case names of every split (without reading images) and, optionally, the ``data.*`` values
    it dictates to the config."""

    load: Callable[[Any], SegmentationData]
    load_split: Callable[[Any, str], list[Volume]]
    split_lists: Callable[[Any], dict[str, list[str]]]
    resolve: Callable[[Any], None] | None = None
    synthetic: bool = False  # generated, no files: named by the dataset, not by data.root


class DataError(UserError):
    """Bad input data: the message names the file or setting and what is wrong with it."""


@dataclass
class Geometry:
    """Where a case came from, so its prediction can be written back in the input's own voxel order.

    ``slice_axis`` is the input array axis the slices were taken along (None for a 2D input);
    ``affine`` and ``header`` are the NIfTI ones, copied unchanged into the written prediction.
    """

    source: Path
    shape: tuple[int, ...]
    slice_axis: int | None = None
    affine: np.ndarray | None = None
    header: Any = None


@dataclass
class Volume:
    """One case: ``image`` D x C x H x W float32 in [0, 1]-ish, ``label`` D x H x W uint8 (None if unlabelled).

    ``spacing`` (mm per D, H, W axis) comes from the file header; None means the file stores none,
    so distances are in voxels or pixels.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...] | None = None
    geometry: Geometry | None = None


@dataclass
class SliceSet:
    """2D training samples resized to the training size: images N x C x S x S, labels N x S x S."""

    images: Tensor
    labels: Tensor | None
    names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class CaseSet:
    """Training cases at their planned resolution (patch mode): images C x D x H x W float32, labels
    D x H x W (None when unlabelled); patches are drawn from them on the fly (``data/patches.py``)."""

    images: list[Tensor]
    labels: list[Tensor] | None
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class SegmentationData:
    """What training needs from any dataset: slices to train on and the validation cases.

    Test cases are deliberately absent: they are loaded only by evaluation, so nothing in training
    can select a checkpoint on them.
    """

    labeled: SliceSet | CaseSet
    unlabeled: SliceSet | CaseSet
    val: list[Volume]
    num_classes: int
    class_names: list[str]
    in_channels: int
    settings: dict[str, Any] = field(default_factory=dict)  # further data.* values the dataset dictates


def check_volume(image: np.ndarray, label: np.ndarray | None, num_classes: int, source: str | Path) -> None:
    """Reject what would otherwise train silently wrong: NaNs, shape mismatches, unknown labels."""
    if not np.isfinite(image).all():
        raise DataError(f"{source}: image contains NaN or Inf intensities")
    if label is None:
        return
    if image.shape[0] != label.shape[0] or image.shape[-2:] != label.shape[-2:]:
        raise DataError(f"{source}: image shape {image.shape} does not match label shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        raise DataError(
            f"{source}: label values must lie in [0, {num_classes - 1}], found {label.min()}..{label.max()}"
        )


def resize_images(images: Tensor, size: int | tuple[int, int], antialias: bool = False) -> Tensor:
    """The one image resize (bilinear, pixel centres aligned) of training slices, of slices at
    inference and of a frozen encoder's input: the feature cache is keyed by the bytes it gives, so
    a slice met in training, validation or ``predict`` must come out of the same function."""
    side = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(images, size=side, mode="bilinear", align_corners=False, antialias=antialias)


def resize_slices(volume: Volume, size: int) -> tuple[Tensor, Tensor | None]:
    """Bilinear for intensities, nearest for labels, as SSL4MIS does per slice."""
    image = resize_images(torch.from_numpy(np.ascontiguousarray(volume.image, dtype=np.float32)), size)
    if volume.label is None:
        return image, None
    label = torch.from_numpy(np.ascontiguousarray(volume.label)).float().unsqueeze(1)
    label = F.interpolate(label, size=(size, size), mode="nearest").squeeze(1).to(torch.uint8)
    return image, label


def stack_slices(volumes: list[Volume], size: int, keep_labels: bool, channels: int = 1) -> SliceSet:
    images, labels, names = [], [], []
    for volume in volumes:
        image, label = resize_slices(volume, size)
        images.append(image)
        labels.append(label)
        names.extend(f"{volume.name}_slice{i}" for i in range(image.shape[0]))
    if not images:
        labels = torch.empty(0, size, size, dtype=torch.uint8) if keep_labels else None
        return SliceSet(torch.empty(0, channels, size, size), labels, [])
    return SliceSet(torch.cat(images), torch.cat(labels) if keep_labels else None, names)
