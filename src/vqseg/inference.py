"""Prediction of whole cases: slice by slice resized (resize mode), or by sliding windows (patch mode).

Resize mode, as in the ACDC protocol: slices are resized to the training size (bilinear), predicted
in batches, and the class probabilities (not the labels) are resized back to the native grid before
the argmax, so no nearest-neighbour staircase is introduced at the original resolution.

Patch mode (issue 25): the model was trained on patches at the data's own resolution and sees the
case through windows of that size (``vqseg.sliding_window``), nothing resized.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vqseg.config import Config
from vqseg.data.resample import labels_at_shape, resample_image, volume_at_spacing
from vqseg.data.volumes import Volume, resize_images
from vqseg.metrics import dice
from vqseg.sliding_window import sliding_window_labels, sliding_window_probabilities


def model_inputs(image: np.ndarray, size: int, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """A D x C x H x W case as the model sees it: chunks of slices resized to the training size.

    Shared with the frozen-encoder set-up, which encodes validation slices ahead of training: the
    same bytes give the same feature-cache keys.
    """
    slices = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    for chunk in slices.split(batch_size):
        yield resize_images(chunk.to(device), size)


def _probabilities(
    model: nn.Module, image: np.ndarray, size: int, batch_size: int, device: torch.device, amp: bool
) -> Iterator[torch.Tensor]:
    """Class probabilities at the native size, chunk by chunk of slices (the one code path of inference)."""
    height, width = image.shape[-2:]
    for x in model_inputs(image, size, batch_size, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        yield resize_images(logits.float().softmax(dim=1), (height, width))


@torch.no_grad()
def predict_volume(
    model: nn.Module, image: np.ndarray, size: int, batch_size: int, device: torch.device, amp: bool = False
) -> np.ndarray:
    """``image`` D x C x H x W -> labels D x H x W (uint8)."""
    chunks = _probabilities(model, image, size, batch_size, device, amp)
    return torch.cat([probs.argmax(dim=1).to(torch.uint8).cpu() for probs in chunks]).numpy()


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, image: np.ndarray, size: int, batch_size: int, device: torch.device, amp: bool = False
) -> np.ndarray:
    """``image`` D x C x H x W -> class probabilities D x K x H x W (float32); argmax = ``predict_volume``.

    The whole case's probabilities at once (K floats per voxel): only where they are the output
    (``predict --probabilities``); labels alone come from ``predict_volume``, chunk by chunk.
    """
    return torch.cat([probs.cpu() for probs in _probabilities(model, image, size, batch_size, device, amp)]).numpy()


def predict_volume_windows(
    model: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    batch_size: int,
    device: torch.device,
    overlap: float = 0.5,
    mirror: bool = False,
    amp: bool = False,
) -> np.ndarray:
    """``image`` D x C x H x W -> labels D x H x W (uint8) by sliding windows of ``patch_size`` (patch mode).

    Three sizes (D, H, W): a 3D model, the case one C x D x H x W volume streamed along D, so its
    class probabilities are never held whole. Two sizes (H, W): a 2D model, each slice its own
    C x H x W image. ``batch_size`` windows per forward pass; ``overlap``, ``mirror`` as in
    ``sliding_window_labels``. The caller puts the model in eval mode, as for ``predict_volume``.
    """

    def labels(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_labels(
            model, x, patch_size, batch_size=batch_size, overlap=overlap, mirror=mirror, device=device, amp=amp
        )

    if len(patch_size) == 3:
        return labels(torch.from_numpy(np.ascontiguousarray(image.transpose(1, 0, 2, 3), dtype=np.float32))).numpy()
    slices = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return torch.stack([labels(s) for s in slices]).numpy()


def predict_volumes(
    model: nn.Module, volumes: list[Volume], size: int, batch_size: int, device: torch.device, amp: bool = False
) -> list[np.ndarray]:
    return predict_cases(model, volumes, Inference(size, batch_size, amp), device)


@dataclass(frozen=True)
class Inference:
    """How a run predicts whole cases: slices resized to ``image_size`` (resize mode), or sliding
    windows of ``patch_size`` at ``target_spacing`` (patch mode; empty: the case's own voxels), the
    probabilities resampled back to the case's grid before the argmax."""

    image_size: int
    batch_size: int
    amp: bool = False
    patch_size: tuple[int, ...] = ()
    overlap: float = 0.5
    mirror: bool = False
    target_spacing: tuple[float, ...] = ()

    @classmethod
    def of(cls, cfg: Config) -> Inference:
        return cls(cfg.train.image_size, cfg.eval.batch_size, cfg.train.amp, tuple(cfg.train.patch_size),
                   cfg.eval.overlap, cfg.eval.mirror, tuple(cfg.data.target_spacing))


def _window_probabilities(model: nn.Module, volume: Volume, how: Inference, device: torch.device) -> torch.Tensor:
    """K x D x H x W class probabilities of a case at the run's target spacing (patch mode)."""
    image, _ = volume_at_spacing(volume, how.target_spacing or None, num_classes=1)
    windows = dict(batch_size=how.batch_size, overlap=how.overlap, mirror=how.mirror, device=device, amp=how.amp)
    if len(how.patch_size) == 3:
        return sliding_window_probabilities(model, image, how.patch_size, **windows)
    slices = [sliding_window_probabilities(model, image[:, d], how.patch_size, **windows) for d in range(image.shape[1])]
    return torch.stack(slices, dim=1)  # each slice its own image


@torch.no_grad()
def predict_case(model: nn.Module, volume: Volume, how: Inference, device: torch.device) -> np.ndarray:
    """``volume`` -> labels D x H x W (uint8) on its own grid, the model in eval mode; in bounded
    memory except where a target spacing needs the probabilities resampled back."""
    if not how.patch_size:
        return predict_volume(model, volume.image, how.image_size, how.batch_size, device, how.amp)
    if not how.target_spacing:
        return predict_volume_windows(model, volume.image, how.patch_size, how.batch_size, device, how.overlap,
                                      how.mirror, how.amp)
    grid = volume.image.shape[:1] + volume.image.shape[2:]
    return labels_at_shape(_window_probabilities(model, volume, how, device), grid).to(torch.uint8).numpy()


@torch.no_grad()
def predict_case_probabilities(model: nn.Module, volume: Volume, how: Inference, device: torch.device) -> np.ndarray:
    """``volume`` -> class probabilities D x K x H x W (float32) on its own grid; their argmax is
    ``predict_case``'s labels. The whole case at once: only where they are the output."""
    if not how.patch_size:
        return predict_probabilities(model, volume.image, how.image_size, how.batch_size, device, how.amp)
    probabilities = _window_probabilities(model, volume, how, device)
    grid = volume.image.shape[:1] + volume.image.shape[2:]
    if tuple(probabilities.shape[1:]) != tuple(grid):
        probabilities = resample_image(probabilities, grid)
    return probabilities.movedim(0, 1).numpy()


def predict_cases(model: nn.Module, volumes: list[Volume], how: Inference, device: torch.device) -> list[np.ndarray]:
    """Every case's labels (``predict_case``); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return [predict_case(model, v, how, device) for v in volumes]
    finally:
        model.train(was_training)


def mean_dice(predictions: list[np.ndarray], volumes: list[Volume], num_classes: int) -> float:
    """Validation score for checkpoint selection: 3D Dice per class, mean over cases and classes."""
    per_case = [
        np.mean([dice(pred == c, vol.label == c) for c in range(1, num_classes)])
        for pred, vol in zip(predictions, volumes)
    ]
    return float(np.mean(per_case))
