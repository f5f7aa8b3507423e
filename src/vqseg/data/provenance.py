"""Provenance channels: where each pixel of a training view came from (frozen-encoder training).

With a frozen pretrained encoder, its features are computed once per training slice and looked up
instead of recomputed. A training batch then carries, after its image channels, four channels
``valid * slice, valid * x, valid * y, valid``: the source slice (its row in the frozen encoder's
feature bank), the source position in ``grid_sample`` coordinates (-1..1, pixel centres,
``align_corners=False``) and whether the pixel lies inside the source image. Stored premultiplied
by ``valid``, they survive the same operations as the image: a bilinear warp with zero padding
mixes them with zeros at the border exactly as it mixes the image, and dividing by ``valid``
recovers the source; CutMix, copy-paste, flips, indexing and concatenation move them with the
pixels. So no method has to pass affines or boxes around: the encoder reads the provenance of
its input. Operations that change intensities must touch the image channels only: they go
through :func:`on_image`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

PROVENANCE_CHANNELS = 4


def add_provenance(images: Tensor, slice_index: Tensor) -> Tensor:
    """Append identity provenance to N x C x H x W images taken from bank rows ``slice_index``."""
    n, _, h, w = images.shape
    device, dtype = images.device, images.dtype
    xs = (2 * torch.arange(w, device=device, dtype=dtype) + 1) / w - 1
    ys = (2 * torch.arange(h, device=device, dtype=dtype) + 1) / h - 1
    index = slice_index.to(device=device, dtype=dtype).view(n, 1, 1, 1).expand(n, 1, h, w)
    grid_x = xs.view(1, 1, 1, w).expand(n, 1, h, w)
    grid_y = ys.view(1, 1, h, 1).expand(n, 1, h, w)
    return torch.cat([images, index, grid_x, grid_y, torch.ones_like(index)], dim=1)


def split_channels(x: Tensor, image_channels: int | None) -> tuple[Tensor, Tensor | None]:
    """(image, provenance or None); ``image_channels`` None means the input is all image."""
    if image_channels is None or x.shape[1] == image_channels:
        return x, None
    if x.shape[1] != image_channels + PROVENANCE_CHANNELS:
        raise ValueError(
            f"expected {image_channels} image channels, optionally followed by {PROVENANCE_CHANNELS} "
            f"provenance channels, got {x.shape[1]}"
        )
    return x[:, :image_channels], x[:, image_channels:]


def on_image(x: Tensor, image_channels: int | None, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a non-spatial operation (intensity, noise) to the image channels only."""
    image, provenance = split_channels(x, image_channels)
    out = fn(image)
    return out if provenance is None else torch.cat([out, provenance], dim=1)


def provenance_at(provenance: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Source slice (long), source x/y (B x h x w x 2, grid_sample units) and validity at the cells
    of an h x w feature map.

    Coordinates are sampled bilinearly at cell centres (exact for an affine warp) where the cell's
    neighbourhood comes from one source slice, and from the nearest pixel where it straddles a
    CutMix or copy-paste border, so a slice index or two unrelated positions are never averaged.
    """
    h, w = size
    big_h, big_w = provenance.shape[-2:]
    rows = ((torch.arange(h, device=provenance.device) + 0.5) * big_h / h).long().clamp(max=big_h - 1)
    cols = ((torch.arange(w, device=provenance.device) + 0.5) * big_w / w).long().clamp(max=big_w - 1)
    near = provenance[:, :, rows][:, :, :, cols].float()
    smooth = F.interpolate(provenance.float(), size=(h, w), mode="bilinear", align_corners=False)
    near_valid, smooth_valid = near[:, 3], smooth[:, 3]
    near_index = near[:, 0] / near_valid.clamp_min(1e-6)
    one_source = (smooth_valid > 1e-6) & ((smooth[:, 0] / smooth_valid.clamp_min(1e-6) - near_index).abs() < 1e-3)
    chosen = torch.where(one_source[:, None], smooth, near)
    valid = chosen[:, 3]
    coords = chosen[:, 1:3] / valid.clamp_min(1e-6)[:, None]
    index = torch.where(near_valid > 1e-6, near_index, torch.zeros_like(near_index)).round().long()
    return index, coords.permute(0, 2, 3, 1), valid.clamp(0, 1)


def sample_bank(bank: Tensor, index: Tensor, coords: Tensor, valid: Tensor) -> Tensor:
    """Bilinear lookup (zero padding, ``align_corners=False``) in an N x h' x w' x C feature bank.

    ``index``, ``coords`` (x, y) and ``valid`` come from :func:`provenance_at`; the result is
    B x C x h x w float features scaled by validity, as zero padding of the image would give.
    """
    n_rows, bank_h, bank_w, channels = bank.shape
    index = index.clamp(0, n_rows - 1)
    px = ((coords[..., 0] + 1) * bank_w - 1) / 2
    py = ((coords[..., 1] + 1) * bank_h - 1) / 2
    x0, y0 = px.floor(), py.floor()
    out = torch.zeros(*index.shape, channels, device=bank.device, dtype=torch.float32)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (px - xi).abs()) * (1 - (py - yi).abs())
            inside = (xi >= 0) & (xi < bank_w) & (yi >= 0) & (yi < bank_h)
            weight = torch.where(inside, weight, torch.zeros_like(weight))
            values = bank[index, yi.long().clamp(0, bank_h - 1), xi.long().clamp(0, bank_w - 1)]
            out = out + values.float() * weight[..., None]
    return (out * valid[..., None]).permute(0, 3, 1, 2).contiguous()


def shift_rows(x: Tensor, image_channels: int, start: int, count: int, shift: Tensor) -> Tensor:
    """Point the pixels of ``x`` that come from bank rows ``start .. start + count - 1`` at rows
    ``shift[n]`` further on (one shift per sample n; other rows, e.g. a pasted labelled box, stay):
    how a strong view takes its features from a photometric copy of its slice."""
    image, provenance = split_channels(x, image_channels)
    if provenance is None:
        raise ValueError("shift_rows needs provenance channels (a frozen encoder's training view)")
    valid = provenance[:, 3:4]
    index = (provenance[:, :1] / valid.clamp_min(1e-6)).round()
    inside = (valid > 1e-6) & (index >= start) & (index < start + count)
    moved = index + shift.to(index).view(-1, 1, *[1] * (index.ndim - 2))
    row = torch.where(inside, moved * valid, provenance[:, :1])
    return torch.cat([image, row, provenance[:, 1:]], dim=1)
