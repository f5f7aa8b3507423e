"""PDCR: patch-dragsaw contrastive regularisation (Li et al., TMI 2022), see METHODS.md §2.

Sample N feature vectors per image; each stands for an input patch centred at the input pixel
(voxel, for 3D maps) under its feature cell. phi_i holds the fraction of each foreground class in
that patch, a_ij = 1 - 1/2 sum_c |phi_ic - phi_jc| (c over all classes, see below), d_ij = 1 - a_ij,
s_ij = cos(f_i, f_j) / tau and

    L = mean_{b,i,j} [ logsumexp_k(d_ik s_ik) - a_ij s_ij ],

so pairs are pulled in proportion to their affinity and pushed in proportion to their divergence
(the official 2D code swaps a and d, reads centres transposed and sums by hand; none of that here).

Decisions (the paper is silent):
- The affinity's L1 distance runs over the patch's full class distribution, background
  (1 - sum of foreground fractions) included: the total-variation distance, in [0, 1] as the 1/2
  promises. Over foreground fractions alone a pure-background patch and a pure-foreground patch
  would get a = d = 1/2 and be neither pulled nor pushed; in the binary case both readings give
  the official code's a = 1 - |phi_i - phi_j|. ``patch_fractions`` still returns foreground phi.
- Patch pixels outside the image and ignored pixels (``ignore_index``) are not counted: phi is a
  fraction of the valid pixels only (``count_include_pad=False``), so border patches are not
  diluted by padding that would otherwise read as background.
- A feature cell (r, c) of an h x w map over an H x W input is centred at input pixel
  (floor((r + 1/2) H / h), floor((c + 1/2) W / w)), i.e. round((r + 1/2) H/h - 1/2) with halves
  rounded up, so even-sized patches of side H/h cover exactly the cell's footprint.
  A patch of side p spans [centre - p // 2, centre - p // 2 + p - 1] on each axis.
- 3D (B x C x d x h x w maps, B x D x H x W labels) follows the same rules on every axis: the
  cell centres, the patch boxes (a count over the box, i.e. ``avg_pool3d`` of the one-hot labels
  with ``count_include_pad=False`` read at the centre, computed from a 3D summed-area table), the
  regular sampling grid (the official 3D code samples a regular 3D grid too) and the cross-layer
  cell lookup. An int patch size is a cube (5 -> 5 x 5 x 5, as the 2D square); a tuple gives one
  side per axis, e.g. (3, 5, 5) to keep the patch's physical extent near-isotropic on volumes
  with thick slices. The official 3D temperature is tau = 0.5 (``pdcr.tau``); the functions'
  default stays the 2D one.
- Self pairs (i == j) are left out of both the numerator mean and the denominator of the
  within-layer loss: cos(f_i, f_i) = 1 always, so they only add constants (1 / tau to the mean,
  exp(0) to the sum). The cross-layer loss keeps them: the same location seen by two layers is
  an informative positive pair.
- The mean runs over all valid pairs of the batch (pairs never cross images); samples whose centre
  pixel is ignored are dropped, and a batch without any valid pair gives a zero loss that still
  carries a (zero) gradient.
- ``patch_sizes="receptive"`` uses a single patch equal to each cell's footprint, side
  max(1, round(H / h)) x max(1, round(W / w)) (and the depth's likewise in 3D), the paper's
  receptive-field variant as specified for this project; a tuple of sizes gives hierarchical PDCR
  (one loss per size, averaged).
- Everything is computed in float32 with autocast disabled; gradients flow to the features only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqseg.config import PDCR_SAMPLING as SAMPLING_MODES

PatchSize = int | tuple[int, ...]  # an int is the same side on every axis
Shape = Sequence[int]  # spatial sizes: (h, w) or (d, h, w)


def cell_centres(feat_shape: Shape, label_shape: Shape, device: torch.device | None = None) -> Tensor:
    """Input pixel (row, col) or voxel (slice, row, col) under the centre of every feature cell, in
    row-major order: (h*w) x 2 or (d*h*w) x 3."""
    axes = [
        torch.div((2 * torch.arange(n, device=device) + 1) * size, 2 * n, rounding_mode="floor")
        for n, size in zip(feat_shape, label_shape)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes))


def _ravel(coords: Sequence[Tensor], shape: Shape) -> Tensor:
    """Row-major flat index of per-axis coordinates in a map of ``shape``."""
    index = coords[0]
    for coord, size in zip(coords[1:], shape[1:]):
        index = index * size + coord
    return index


def patch_fractions(
    labels: Tensor,
    centres: Tensor,
    patch_size: PatchSize,
    num_classes: int,
    ignore_index: int | None = None,
) -> Tensor:
    """Fraction of each foreground class (1..num_classes-1) among the valid pixels of each patch.

    labels: B x H x W (or B x D x H x W); centres: B x N x 2 input (row, col) (or x 3: slice, row,
    col); returns B x N x (num_classes - 1). Pixels outside the image or equal to ``ignore_index``
    are not counted; a patch without a valid pixel gets phi = 0.
    """
    table = _label_table(labels, num_classes, ignore_index)
    return _class_distribution(table, centres, _patch(patch_size, labels.dim() - 1))[..., 1:]


def _label_table(labels: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """Summed-area table of [class 0 .. class K-1, valid] masks: B x (K + 1) x (H + 1) x (W + 1)
    (x (D + 1) first in 3D), exact in int32."""
    dims = labels.dim() - 1
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    classes = torch.arange(num_classes, device=labels.device).view(-1, *[1] * dims)
    table = torch.cat([(labels[:, None] == classes) & valid[:, None], valid[:, None]], dim=1)
    for axis in range(-1, -dims - 1, -1):
        table = table.cumsum(axis, dtype=torch.int32)
    return F.pad(table, (1, 0) * dims)


def _box_counts(table: Tensor, centres: Tensor, patch: tuple[int, ...]) -> Tensor:
    """Per-channel pixel counts inside each patch, from a summed-area table: B x N x channels.

    Inclusion-exclusion over the box's 2^dims corners (4 in 2D, 8 in 3D).
    """
    table_shape = table.shape[2:]
    ends = []  # per axis: (low, high) corner coordinates in the table
    for axis, (side, size) in enumerate(zip(patch, table_shape)):
        start = centres[..., axis] - side // 2
        ends.append((start.clamp(0, size - 1), (start + side).clamp(0, size - 1)))
    flat = table.flatten(2)
    counts = None
    for corner in itertools.product((0, 1), repeat=len(patch)):
        index = _ravel([ends[axis][high] for axis, high in enumerate(corner)], table_shape)
        value = flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1))
        value = value if (len(patch) - sum(corner)) % 2 == 0 else -value
        counts = value if counts is None else counts + value
    return counts.transpose(1, 2)


def _class_distribution(table: Tensor, centres: Tensor, patch: tuple[int, ...]) -> Tensor:
    """Fraction of every class, background included, among the valid pixels of each patch: B x N x K."""
    counts = _box_counts(table, centres, patch).float()
    return counts[..., :-1] / counts[..., -1:].clamp_min(1)


def pdcr_loss(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    patch_sizes: tuple[PatchSize, ...] | str = (5, 7, 9),
    num_samples: int = 32,
    tau: float = 1.0,
    sampling: str = "grid",
    ignore_index: int | None = None,
    generator: torch.Generator | None = None,
    boundary_boost: float = 3.0,
) -> Tensor:
    """Hierarchical PDCR on one feature map (B x C x h x w) against input-resolution labels (B x H x W),
    or on a 3D map (B x C x d x h x w) against B x D x H x W labels.

    sampling: "grid" (official: a regular ~sqrt(N) x sqrt(N) grid, ~N^(1/3) per axis in 3D, its
    aspect following the map's; ignored centres get zero weight), "random" (uniform over valid
    cells, without replacement) or "balanced" (without replacement, weight 1 / frequency of the
    centre's class in the image, times 1 + ``boundary_boost`` where the largest patch holds more
    than one class).
    """
    _check_inputs(features, labels, num_classes, tau)
    index, _, valid, dists = _sample_patches(
        features, labels, num_classes, patch_sizes, num_samples, sampling, ignore_index, generator, boundary_boost
    )
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = _gather(features, index)
        return _contrast(f, f, dists, valid, tau, exclude_self=True)


def cross_layer_pdcr_loss(
    features_a: Tensor,
    features_b: Tensor,
    labels: Tensor,
    num_classes: int,
    patch_sizes: tuple[PatchSize, ...] | str = (5, 7, 9),
    num_samples: int = 32,
    tau: float = 1.0,
    sampling: str = "grid",
    ignore_index: int | None = None,
    generator: torch.Generator | None = None,
    boundary_boost: float = 3.0,
    proj: nn.Module | None = None,
) -> Tensor:
    """PDCR between two layers: s_ij = cos(f^a_i, f^b_j) / tau at shared input locations.

    Locations are sampled on map a (as in ``pdcr_loss``); each one reads map b at the cell that
    contains its input centre pixel, so f^a_i and f^b_i see the same patch. Without ``proj`` both
    maps must have the same channel count; ``proj`` maps sampled b vectors (B x N x C_b) to C_a
    (e.g. ``nn.Linear(C_b, C_a)``) and is trained by this loss. "receptive" patches follow map a.
    """
    _check_inputs(features_a, labels, num_classes, tau)
    if features_b.dim() != features_a.dim() or features_b.shape[0] != features_a.shape[0]:
        expected = f"a {features_a.dim()}-D tensor like features_a with B = {features_a.shape[0]}"
        raise ValueError(f"features_b must be {expected}, got shape {tuple(features_b.shape)}")
    if proj is None and features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"channel counts differ ({features_a.shape[1]} vs {features_b.shape[1]}): pass proj to map b onto a"
        )
    index_a, centres, valid, dists = _sample_patches(
        features_a, labels, num_classes, patch_sizes, num_samples, sampling, ignore_index, generator, boundary_boost
    )
    shape_b, label_shape = features_b.shape[2:], labels.shape[1:]
    cells_b = [
        torch.div(centres[..., axis] * size_b, size, rounding_mode="floor")
        for axis, (size_b, size) in enumerate(zip(shape_b, label_shape))
    ]
    index_b = _ravel(cells_b, shape_b)
    with torch.autocast(device_type=features_a.device.type, enabled=False):
        fa = _gather(features_a, index_a)
        fb = _gather(features_b, index_b)
        if proj is not None:
            fb = proj(fb).float()
        return _contrast(fa, fb, dists, valid, tau, exclude_self=False)


def sample_locations(
    labels: Tensor,
    feat_shape: Shape,
    num_classes: int,
    num_samples: int = 32,
    sampling: str = "grid",
    patch_sizes: tuple[PatchSize, ...] | str = (5, 7, 9),
    ignore_index: int | None = None,
    generator: torch.Generator | None = None,
    boundary_boost: float = 3.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The cells ``pdcr_loss`` would sample, for inspection: (flat index, input centres, valid), each
    B x N (x 2, or x 3 for 3D labels and a 3D ``feat_shape``)."""
    labels = labels.long()
    patches = _patch_list(patch_sizes, labels.shape[1:], feat_shape)
    table = _label_table(labels, num_classes, ignore_index)
    return _sample_locations(
        labels, table, feat_shape, num_samples, sampling, patches, ignore_index, generator, boundary_boost
    )


def _sample_patches(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    patch_sizes: tuple[PatchSize, ...] | str,
    num_samples: int,
    sampling: str,
    ignore_index: int | None,
    generator: torch.Generator | None,
    boundary_boost: float,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Sampled cells (B x N flat index), input centres (B x N x dims), validity (B x N), per-size class
    distributions."""
    labels = labels.to(features.device, torch.long)
    patches = _patch_list(patch_sizes, labels.shape[1:], features.shape[2:])
    table = _label_table(labels, num_classes, ignore_index)
    index, centres, valid = _sample_locations(
        labels, table, features.shape[2:], num_samples, sampling, patches, ignore_index, generator, boundary_boost
    )
    return index, centres, valid, [_class_distribution(table, centres, p) for p in patches]


def _sample_locations(
    labels: Tensor,
    table: Tensor,
    feat_shape: Shape,
    num_samples: int,
    sampling: str,
    patches: list[tuple[int, ...]],
    ignore_index: int | None,
    generator: torch.Generator | None,
    boundary_boost: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick feature cells per image: (flat cell index B x N, input centres B x N x dims, valid B x N).

    ``valid`` is False where the centre pixel is ignored (grid mode), or where an image has fewer
    valid cells than requested samples (random / balanced), so such samples carry no weight.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    all_centres = cell_centres(feat_shape, labels.shape[1:], labels.device)
    centre_labels = labels[(slice(None), *all_centres.unbind(1))]
    valid_cells = torch.ones_like(centre_labels, dtype=torch.bool)
    if ignore_index is not None:
        valid_cells = centre_labels != ignore_index
    if sampling == "grid":
        index = _grid_indices(feat_shape, num_samples, labels.device).expand(labels.shape[0], -1)
    else:
        weight = valid_cells.float()
        if sampling == "balanced":
            weight = weight * _balance_weights(table, centre_labels, valid_cells, all_centres, patches, boundary_boost)
        index = _sample_without_replacement(weight, min(num_samples, math.prod(feat_shape)), generator)
    return index, all_centres[index], valid_cells.gather(1, index)


def _balance_weights(
    table: Tensor,
    centre_labels: Tensor,
    valid_cells: Tensor,
    all_centres: Tensor,
    patches: list[tuple[int, ...]],
    boundary_boost: float,
) -> Tensor:
    """Per-cell weight (1 + boost if the largest patch holds > 1 class) / count(centre class): B x h*w."""
    num_classes = table.shape[1] - 1
    largest = max(patches, key=math.prod)
    class_counts = _box_counts(table, all_centres.expand(table.shape[0], -1, -1), largest)[..., :-1]
    mixed = (class_counts > 0).sum(-1) > 1
    classes = centre_labels.masked_fill(~valid_cells, 0)
    frequency = (F.one_hot(classes, num_classes) * valid_cells[..., None]).sum(1).gather(1, classes)
    return (1.0 + boundary_boost * mixed.float()) / frequency.clamp_min(1)


def _sample_without_replacement(weight: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Batched weighted sampling without replacement (exponential race: top-n of log w - log E)."""
    device = generator.device if generator is not None else weight.device
    race = torch.empty(weight.shape, device=device).exponential_(generator=generator).to(weight.device)
    keys = torch.where(weight > 0, weight.log() - race.log(), float("-inf"))
    return keys.topk(n, dim=1).indices


def _grid_indices(shape: Shape, num_samples: int, device: torch.device) -> Tensor:
    """Flat indices of a regular grid, ~num_samples points, aspect following the map, row-major.

    Axis by axis, the count is what an equal spacing on the remaining axes would give
    (gh = sqrt(N h / w) in 2D; gd = cbrt(N d^2 / (h w)) first in 3D), and the last axis takes the
    rest of the samples; each count lies in [1, size]. Points sit at the centres of equal bins.
    """
    counts: list[int] = []
    for axis, size in enumerate(shape):
        remaining = num_samples / math.prod(counts)
        rest = len(shape) - axis  # axes still to share the samples, this one included
        if rest == 1:
            count = remaining
        else:
            root = math.sqrt if rest == 2 else math.cbrt
            count = root(remaining * size ** (rest - 1) / math.prod(shape[axis + 1 :]))
        counts.append(min(size, max(1, round(count))))
    axes = [
        torch.div((2 * torch.arange(count, device=device) + 1) * size, 2 * count, rounding_mode="floor")
        for count, size in zip(counts, shape)
    ]
    return _ravel(torch.meshgrid(*axes, indexing="ij"), shape).reshape(1, -1)


def _gather(features: Tensor, index: Tensor) -> Tensor:
    """Feature vectors at flat cell indices, as float32: B x N x C."""
    flat = features.float().flatten(2)
    return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).transpose(1, 2)


def _contrast(fa: Tensor, fb: Tensor, dists: list[Tensor], valid: Tensor, tau: float, exclude_self: bool) -> Tensor:
    """Mean over valid pairs of logsumexp_k(d_ik s_ik) - a_ij s_ij, averaged over patch sizes.

    ``dists`` holds each patch's class distribution p (background included), a_ij = 1 - 1/2 |p_i - p_j|_1.
    """
    s = F.normalize(fa, dim=-1) @ F.normalize(fb, dim=-1).transpose(1, 2) / tau
    pair = valid[:, :, None] & valid[:, None, :]
    if exclude_self:
        pair = pair & ~torch.eye(pair.shape[-1], dtype=torch.bool, device=pair.device)
    num_pairs = pair.sum().clamp_min(1)
    losses = []
    for p in dists:
        a = 1 - 0.5 * (p[:, :, None, :] - p[:, None, :, :]).abs().sum(-1)
        d = 1 - a
        masked_logits = (d * s).masked_fill(~pair, torch.finfo(s.dtype).min)
        log_denominator = torch.logsumexp(masked_logits, dim=-1, keepdim=True)
        nll = log_denominator - a * s
        losses.append(nll.masked_fill(~pair, 0).sum() / num_pairs)
    return torch.stack(losses).mean()


def _patch(size: PatchSize, dims: int) -> tuple[int, ...]:
    """One side per axis: an int is a square (2D) or a cube (3D)."""
    sides = (size,) * dims if isinstance(size, int) else tuple(size)
    if len(sides) != dims or min(sides) < 1:
        raise ValueError(f"patch size must be an int or {dims} sides, each >= 1, got {size}")
    return tuple(int(side) for side in sides)


def _patch_list(
    patch_sizes: tuple[PatchSize, ...] | str, label_shape: Shape, feat_shape: Shape
) -> list[tuple[int, ...]]:
    """Patch sizes, one side per axis; "receptive" is the footprint of one feature cell."""
    if patch_sizes == "receptive":
        return [tuple(max(1, round(size / n)) for size, n in zip(label_shape, feat_shape))]
    if isinstance(patch_sizes, str) or len(patch_sizes) == 0:
        raise ValueError(f'patch_sizes must be a non-empty tuple of sizes or "receptive", got {patch_sizes!r}')
    return [_patch(p, len(label_shape)) for p in patch_sizes]


def _check_inputs(features: Tensor, labels: Tensor, num_classes: int, tau: float) -> None:
    if features.dim() not in (4, 5):
        raise ValueError(f"features must be B x C x h x w or B x C x d x h x w, got shape {tuple(features.shape)}")
    if labels.dim() != features.dim() - 1 or labels.shape[0] != features.shape[0]:
        expected = "B x H x W" if features.dim() == 4 else "B x D x H x W"
        raise ValueError(f"labels must be {expected} with B = {features.shape[0]}, got shape {tuple(labels.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
