"""Patches drawn on the fly from whole cases at their planned resolution (nnU-Net's data loader).

Each patch comes from a case drawn uniformly at random, at a uniformly random position, except
the last ``B - round(B * (1 - foreground_oversample))`` patches of every batch of B (nnU-Net's rule:
a fixed share at the end of the batch, not a coin per patch; 1 of 2, 4 of 12), which are centred on
a random voxel of a random class present in a random case that holds foreground, as far as the
patch stays within the (padded) case, so rare structures are seen every step. Forced patches come
only from cases with foreground; without labels every patch is uniform.

2D patches of 3D cases (a "2d" configuration on volumes) are 1 x h x w slabs, squeezed: a random
case, then a random slice, as nnU-Net's 2D loader. Where a case is smaller than the patch along an
axis the patch is centred on it and padded with zeros (image) and 0 (label: background, which is
what the network sees in the zero padding of an augmentation warp too); ``padding_note`` says so
once per dataset, for the caller to print.

The only state is one torch generator, so ``state_dict`` / ``load_state_dict`` resume the exact
stream, as ``engine/sampler.py``'s ``InfiniteSampler``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vqseg.errors import ConfigError

# Foreground voxels kept per class and case to centre forced patches on (nnU-Net keeps 10,000, at
# random); evenly spaced in raster order here, so a sampler is rebuilt identically without a seed.
LOCATIONS_PER_CLASS = 10_000


@dataclass
class PatchBatch:
    """``images`` B x C x *patch, ``labels`` B x *patch (None without labels), ``cases`` B indices of
    the source cases, ``origins`` B x S the first voxel of each patch in its case (S: the case's
    spatial axes; negative where padded), ``forced`` B whether the patch was forced onto foreground."""

    images: Tensor
    labels: Tensor | None
    cases: Tensor
    origins: Tensor
    forced: Tensor


def _foreground(label: Tensor) -> list[Tensor]:
    """Flat indices of each foreground class present in ``label`` (at most ``LOCATIONS_PER_CLASS`` each)."""
    flat = label.reshape(-1)
    found = []
    for c in torch.unique(flat).tolist():
        if c == 0:
            continue
        where = torch.nonzero(flat == c).squeeze(1)
        step = -(-len(where) // LOCATIONS_PER_CLASS)
        found.append(where[::step].clone())
    return found


def _crop(x: Tensor, origin: Sequence[int], extent: Sequence[int]) -> Tensor:
    """x[..., o:o+e per axis] over the trailing axes, zeros wherever that lies outside ``x``."""
    lead = x.dim() - len(extent)
    out = x.new_zeros(*x.shape[:lead], *extent)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for o, e, s in zip(origin, extent, x.shape[lead:]):
        lo, hi = max(o, 0), min(o + e, s)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = x[tuple(src)]
    return out


class PatchSampler:
    """Batches of ``patch_size`` patches from cases ``images`` (C x *spatial, 2 or 3 spatial axes) and
    ``labels`` (*spatial, or None for unlabelled data); ``patch_size`` has as many axes as the cases,
    or one fewer (2D patches of volumes)."""

    def __init__(
        self,
        images: Sequence[Tensor | np.ndarray],
        labels: Sequence[Tensor | np.ndarray] | None,
        patch_size: Sequence[int],
        batch_size: int,
        seed: int,
        foreground_oversample: float = 0.33,
    ) -> None:
        if not images:
            raise ValueError("cannot sample from an empty set")
        self.images = [torch.as_tensor(x) for x in images]
        self.labels = None if labels is None else [torch.as_tensor(y) for y in labels]
        if self.labels is not None and [y.shape for y in self.labels] != [x.shape[1:] for x in self.images]:
            raise ValueError("every case needs a label of its image's spatial shape")
        axes = {x.dim() - 1 for x in self.images}
        if len(axes) != 1:
            raise ValueError(f"cases with different numbers of spatial axes: {sorted(axes)}")
        (spatial,) = axes
        if len(patch_size) not in (spatial, spatial - 1):
            raise ConfigError(
                f"train.patch_size={list(patch_size)} has {len(patch_size)} values but the cases have "
                f"{spatial} spatial axes"
            )
        self.patch_size = list(patch_size)
        self.extent = [1] * (spatial - len(patch_size)) + self.patch_size  # a 2D patch of a volume: one slice
        self.batch_size = batch_size
        self.forced_per_batch = batch_size - round(batch_size * (1 - foreground_oversample))
        self.locations = [_foreground(y) for y in self.labels] if self.labels is not None else []
        self.foreground_cases = [i for i, found in enumerate(self.locations) if found]
        self.padded_cases = [
            i for i, x in enumerate(self.images) if any(s < e for s, e in zip(x.shape[1:], self.extent))
        ]
        self.generator = torch.Generator().manual_seed(seed)

    def padding_note(self) -> str | None:
        """One line for the caller to print when some cases are smaller than the patch."""
        if not self.padded_cases:
            return None
        return (
            f"{len(self.padded_cases)} of {len(self.images)} case(s) are smaller than the patch "
            f"{' x '.join(map(str, self.patch_size))} along some axis: their patches are padded "
            "(image 0, label background)"
        )

    def _randint(self, low: int, high: int) -> int:
        """Uniform in [low, high]."""
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def _bounds(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """Lowest and highest patch origin per axis: inside the case, or centred on it where it is smaller."""
        bounds = []
        for s, e in zip(shape, self.extent):
            low = -(max(e - s, 0) // 2)
            bounds.append((low, low + max(s - e, 0)))
        return bounds

    def _draw(self, forced: bool) -> tuple[int, list[int]]:
        if forced:
            case = self.foreground_cases[self._randint(0, len(self.foreground_cases) - 1)]
            found = self.locations[case]
            voxels = found[self._randint(0, len(found) - 1)]
            flat = int(voxels[self._randint(0, len(voxels) - 1)])
            shape = self.images[case].shape[1:]
            centre = [int(v) for v in np.unravel_index(flat, tuple(shape))]
            bounds = self._bounds(shape)
            return case, [min(max(v - e // 2, lo), hi) for v, e, (lo, hi) in zip(centre, self.extent, bounds)]
        case = self._randint(0, len(self.images) - 1)
        return case, [self._randint(lo, hi) for lo, hi in self._bounds(self.images[case].shape[1:])]

    def next(self) -> PatchBatch:
        forced = [i >= self.batch_size - self.forced_per_batch and bool(self.foreground_cases) for i in range(self.batch_size)]
        draws = [self._draw(f) for f in forced]
        slab = len(self.extent) > len(self.patch_size)  # 2D patches of volumes: drop the one-slice axis

        def crops(cases: list[Tensor], lead: int) -> Tensor:
            patches = torch.stack([_crop(cases[case], origin, self.extent) for case, origin in draws])
            return patches.squeeze(lead) if slab else patches

        return PatchBatch(
            images=crops(self.images, 2),
            labels=None if self.labels is None else crops(self.labels, 1),
            cases=torch.tensor([case for case, _ in draws]),
            origins=torch.tensor([origin for _, origin in draws]),
            forced=torch.tensor(forced),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
