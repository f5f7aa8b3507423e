"""Sliding-window inference at native resolution, for images (C x H x W) and volumes (C x D x H x W) alike.

The scheme is nnU-Net's (Isensee et al., Nature Methods 2021; ``nnunetv2.inference``): windows of the
training patch size, evenly spread so that they overlap by at least ``overlap`` of the patch, each
window's logits weighted by a Gaussian centred on the patch (a network is least sure near a patch
border, where it saw little context), and the weighted sum divided by the summed weights. As in
nnU-Net, logits are averaged, not probabilities, and the softmax comes last.

Memory: the windows are processed band by band along the first spatial axis (a band: all windows
sharing a start there), accumulated into a buffer ``patch_size[0]`` rows deep on the compute device;
after each band, the rows before the next band's start are final, leave the buffer, and the buffer
moves down. ``sliding_window_labels`` thus never holds the class probabilities of the whole case (a
512 x 512 x 300 CT with 14 classes: 4.4 GB in float32), only its labels; ``sliding_window_probabilities``
holds them as its output, in host memory. Both come from the same accumulation, so the labels are
``sliding_window_probabilities(...).argmax(0)`` bit for bit.

An axis shorter than the patch is padded (zeros, split evenly before and after) and cropped back;
nothing is said about it here: a caller that wants to tell its user compares ``image.shape[1:]`` with
``patch_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from itertools import combinations, product

import torch
import torch.nn.functional as F
from torch import Tensor

Model = Callable[[Tensor], Tensor]  # B x C x *patch_size -> B x K x *patch_size logits; an nn.Module in eval mode


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Where the windows along one axis start: nnU-Net's ``compute_steps_for_sliding_window``.

    ceil((size - patch) / (patch * (1 - overlap))) + 1 windows, the first at 0 and the last ending at
    the border, the ones between spread evenly (rounded to whole voxels), so neighbours overlap by at
    least ``overlap`` of the patch. ``size`` must be at least ``patch`` (pad the axis first).
    """
    if size < patch:
        raise ValueError(f"axis of {size} voxels is shorter than the patch ({patch}): pad it first")
    count = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    if count == 1:
        return [0]
    step = (size - patch) / (count - 1)
    return [round(step * i) for i in range(count)]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> Tensor:
    """The weight of each voxel of a window: nnU-Net's ``compute_gaussian``, float32, shaped ``patch_size``.

    A Gaussian centred on voxel ``patch // 2`` of every axis with sigma ``patch * sigma_scale``, scaled
    to a maximum of 1. nnU-Net filters a unit impulse with ``scipy.ndimage.gaussian_filter``; its
    normalised kernel, divided by its peak, is this closed form. Weights that underflow to 0 (a small
    ``sigma_scale``) take the smallest non-zero one, as in nnU-Net: a voxel covered only by window
    corners would otherwise divide 0 by 0.
    """
    weights = torch.ones(())
    for patch in patch_size:
        offset = torch.arange(patch, dtype=torch.float64) - patch // 2
        sigma = patch * sigma_scale
        weights = weights.unsqueeze(-1) * torch.exp(-(offset**2) / (2 * sigma**2))
    weights = (weights / weights.max()).float()
    weights[weights == 0] = weights[weights > 0].min()
    return weights


@torch.no_grad()
def sliding_window_probabilities(
    model: Model,
    image: Tensor,
    patch_size: Sequence[int],
    *,
    batch_size: int,
    overlap: float = 0.5,
    mirror: bool = False,
    device: torch.device | None = None,
    amp: bool = False,
) -> Tensor:
    """``image`` C x *spatial -> class probabilities K x *spatial (float32, on the CPU).

    ``model`` maps B x C x *patch_size to B x K x *patch_size logits and is called as it is (the
    caller puts it in eval mode); ``batch_size`` windows go through it per forward pass, on
    ``device`` (the model's; default: the image's). ``mirror`` averages the logits over flips along every subset
    of the spatial axes (2^ndim passes per window), each flipped back. ``amp``: bfloat16 autocast.
    The whole case's probabilities are the output: where labels are enough, ``sliding_window_labels``.
    """
    probabilities: Tensor | None = None
    for first, logits in _mean_logits(model, image, patch_size, batch_size, overlap, mirror, device, amp):
        if probabilities is None:
            probabilities = torch.empty(logits.shape[0], *image.shape[1:])
        probabilities[:, first : first + logits.shape[1]] = logits.softmax(dim=0).cpu()
    assert probabilities is not None  # every row of the image lies in some band
    return probabilities


@torch.no_grad()
def sliding_window_labels(
    model: Model,
    image: Tensor,
    patch_size: Sequence[int],
    *,
    batch_size: int,
    overlap: float = 0.5,
    mirror: bool = False,
    device: torch.device | None = None,
    amp: bool = False,
) -> Tensor:
    """``image`` C x *spatial -> labels *spatial (uint8, on the CPU), streamed along the first spatial axis.

    Holds the labels and a buffer of ``patch_size[0]`` rows of logits, never the whole case's
    probabilities. Arguments as ``sliding_window_probabilities``, whose argmax this equals bit for bit:
    the argmax is taken of the same probabilities, not of the logits, because the softmax can round
    two nearly equal logits to one probability.
    """
    labels = torch.empty(tuple(image.shape[1:]), dtype=torch.uint8)
    for first, logits in _mean_logits(model, image, patch_size, batch_size, overlap, mirror, device, amp):
        labels[first : first + logits.shape[1]] = logits.softmax(dim=0).argmax(dim=0).to(torch.uint8).cpu()
    return labels


def _mean_logits(
    model: Model,
    image: Tensor,
    patch_size: Sequence[int],
    batch_size: int,
    overlap: float,
    mirror: bool,
    device: torch.device | None,
    amp: bool,
) -> Iterator[tuple[int, Tensor]]:
    """The Gaussian-weighted mean logits of the image's rows along the first spatial axis, in order:
    (first row, K x rows x *rest) once per band, for the rows that no later band touches.

    Every voxel sums its windows in the same order whatever ``batch_size`` is, so the result does
    not depend on it (given a model whose output for a window does not depend on its batch).
    """
    spatial = tuple(image.shape[1:])
    patch_size = tuple(patch_size)
    if len(patch_size) != len(spatial):
        raise ValueError(f"patch size {patch_size} for an image of spatial shape {spatial}")
    device = image.device if device is None else device
    short = [max(p - s, 0) for s, p in zip(spatial, patch_size)]  # what an axis lacks of the patch
    before = [n // 2 for n in short]  # the odd voxel goes after, as in nnU-Net
    padded = image.float()
    if any(short):  # F.pad copies even when it pads nothing
        padded = F.pad(padded, [side for b, n in zip(reversed(before), reversed(short)) for side in (b, n - b)])
    starts = [window_starts(s, p, overlap) for s, p in zip(padded.shape[1:], patch_size)]
    ends0 = starts[0][1:] + [padded.shape[1]]
    # a band's windows along the other axes, the same in every band
    corners = [tuple(slice(s, s + p) for s, p in zip(corner, patch_size[1:])) for corner in product(*starts[1:])]
    crop = tuple(slice(b, b + s) for b, s in zip(before[1:], spatial[1:]))
    depth = patch_size[0]
    gaussian = gaussian_importance(patch_size).to(device)
    weight_sum = torch.zeros(depth, *padded.shape[2:], device=device)
    logit_sum: Tensor | None = None  # K x depth x *rest, sized by the first forward pass
    all_ = slice(None)
    for start, end in zip(starts[0], ends0):
        for i in range(0, len(corners), batch_size):
            batch = corners[i : i + batch_size]
            x = torch.stack([padded[(all_, slice(start, start + depth)) + corner] for corner in batch])
            logits = _forward(model, x.to(device), mirror, amp)
            if logit_sum is None:
                logit_sum = logits.new_zeros(logits.shape[1], *weight_sum.shape)
            for corner, window in zip(batch, logits):
                logit_sum[(all_, all_) + corner] += window * gaussian
                weight_sum[(all_,) + corner] += gaussian
        first, last = max(start, before[0]), min(end, before[0] + spatial[0])  # the image's rows, unpadded
        if first < last:
            rows = slice(first - start, last - start)
            yield first - before[0], logit_sum[(all_, rows) + crop] / weight_sum[(rows,) + crop]
        done = end - start
        logit_sum = logit_sum.roll(-done, dims=1)
        logit_sum[:, depth - done :] = 0
        weight_sum = weight_sum.roll(-done, dims=0)
        weight_sum[depth - done :] = 0


def _forward(model: Model, x: Tensor, mirror: bool, amp: bool) -> Tensor:
    """B x K x *patch float32 logits of a batch of windows; with ``mirror``, their mean over the flips
    along every subset of the spatial axes, each flipped back (nnU-Net's mirroring)."""
    axes = range(2, x.ndim)
    flips = [dims for r in range(len(axes) + 1) for dims in combinations(axes, r)] if mirror else [()]
    total = torch.zeros(())
    for dims in flips:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.flip(dims))
        total = total + logits.float().flip(dims)
    return total / len(flips)
