"""PDCR: patch-dragsaw contrastive regularisation (Li et al., TMI 2022), see METHODS.md §2.

Sample N feature vectors per image; each stands for an input patch centred at the input pixel
under its feature cell. phi_i holds the fraction of each foreground class in that patch,
a_ij = 1 - 1/2 sum_c |phi_ic - phi_jc| (c over all classes, see below), d_ij = 1 - a_ij,
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
- Self pairs (i == j) are left out of both the numerator mean and the denominator of the
  within-layer loss: cos(f_i, f_i) = 1 always, so they only add constants (1 / tau to the mean,
  exp(0) to the sum). The cross-layer loss keeps them: the same location seen by two layers is
  an informative positive pair.
- The mean runs over all valid pairs of the batch (pairs never cross images); samples whose centre
  pixel is ignored are dropped, and a batch without any valid pair gives a zero loss that still
  carries a (zero) gradient.
- ``patch_sizes="receptive"`` uses a single patch equal to each cell's footprint, side
  max(1, round(H / h)) x max(1, round(W / w)), the paper's receptive-field variant as specified for
  this project; a tuple of sizes gives hierarchical PDCR (one loss per size, averaged).
- Everything is computed in float32 with autocast disabled; gradients flow to the features only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqseg.config import PDCR_SAMPLING as SAMPLING_MODES

PatchSize = int | tuple[int, int]


def cell_centres(feat_hw: tuple[int, int], label_hw: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Input pixel (row, col) under the centre of every feature cell, in row-major order: (h*w) x 2."""
    (h, w), (H, W) = feat_hw, label_hw
    rows = torch.div((2 * torch.arange(h, device=device) + 1) * H, 2 * h, rounding_mode="floor")
    cols = torch.div((2 * torch.arange(w, device=device) + 1) * W, 2 * w, rounding_mode="floor")
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)


def patch_fractions(
    labels: Tensor,
    centres: Tensor,
    patch_size: PatchSize,
    num_classes: int,
    ignore_index: int | None = None,
) -> Tensor:
    """Fraction of each foreground class (1..num_classes-1) among the valid pixels of each patch.

    labels: B x H x W; centres: B x N x 2 input (row, col); returns B x N x (num_classes - 1).
    Pixels outside the image or equal to ``ignore_index`` are not counted; a patch without a
    valid pixel gets phi = 0.
    """
    return _class_distribution(_label_table(labels, num_classes, ignore_index), centres, _pair(patch_size))[..., 1:]


def _label_table(labels: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """Summed-area table of [class 0 .. class K-1, valid] masks: B x (K + 1) x (H + 1) x (W + 1)."""
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    classes = torch.arange(num_classes, device=labels.device)[:, None, None]
    masks = torch.cat([(labels[:, None] == classes) & valid[:, None], valid[:, None]], dim=1)
    return F.pad(masks.cumsum(-1, dtype=torch.int32).cumsum(-2, dtype=torch.int32), (1, 0, 1, 0))


def _box_counts(table: Tensor, centres: Tensor, patch: tuple[int, int]) -> Tensor:
    """Per-channel pixel counts inside each patch, from a summed-area table: B x N x channels."""
    (ph, pw), (H, W) = patch, (table.shape[-2] - 1, table.shape[-1] - 1)
    top = (centres[..., 0] - ph // 2).clamp(0, H)
    bottom = (centres[..., 0] - ph // 2 + ph).clamp(0, H)
    left = (centres[..., 1] - pw // 2).clamp(0, W)
    right = (centres[..., 1] - pw // 2 + pw).clamp(0, W)
    flat = table.flatten(2)

    def corner(rows: Tensor, cols: Tensor) -> Tensor:
        return flat.gather(2, (rows * (W + 1) + cols)[:, None, :].expand(-1, flat.shape[1], -1))

    counts = corner(bottom, right) - corner(top, right) - corner(bottom, left) + corner(top, left)
    return counts.transpose(1, 2)


def _class_distribution(table: Tensor, centres: Tensor, patch: tuple[int, int]) -> Tensor:
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
    """Hierarchical PDCR on one feature map (B x C x h x w) against input-resolution labels (B x H x W).

    sampling: "grid" (official: a regular ~sqrt(N) x sqrt(N) grid, ignored centres get zero
    weight), "random" (uniform over valid cells, without replacement) or "balanced" (without
    replacement, weight 1 / frequency of the centre's class in the image, times
    1 + ``boundary_boost`` where the largest patch holds more than one class).
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
    if features_b.dim() != 4 or features_b.shape[0] != features_a.shape[0]:
        expected = f"B x C x h x w with B = {features_a.shape[0]}"
        raise ValueError(f"features_b must be {expected}, got shape {tuple(features_b.shape)}")
    if proj is None and features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"channel counts differ ({features_a.shape[1]} vs {features_b.shape[1]}): pass proj to map b onto a"
        )
    index_a, centres, valid, dists = _sample_patches(
        features_a, labels, num_classes, patch_sizes, num_samples, sampling, ignore_index, generator, boundary_boost
    )
    (hb, wb), (H, W) = features_b.shape[-2:], labels.shape[-2:]
    row_b = torch.div(centres[..., 0] * hb, H, rounding_mode="floor")
    col_b = torch.div(centres[..., 1] * wb, W, rounding_mode="floor")
    index_b = row_b * wb + col_b
    with torch.autocast(device_type=features_a.device.type, enabled=False):
        fa = _gather(features_a, index_a)
        fb = _gather(features_b, index_b)
        if proj is not None:
            fb = proj(fb).float()
        return _contrast(fa, fb, dists, valid, tau, exclude_self=False)


def sample_locations(
    labels: Tensor,
    feat_hw: tuple[int, int],
    num_classes: int,
    num_samples: int = 32,
    sampling: str = "grid",
    patch_sizes: tuple[PatchSize, ...] | str = (5, 7, 9),
    ignore_index: int | None = None,
    generator: torch.Generator | None = None,
    boundary_boost: float = 3.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The cells ``pdcr_loss`` would sample, for inspection: (flat index, input centres, valid), each B x N (x 2)."""
    labels = labels.long()
    patches = _patch_list(patch_sizes, labels.shape[-2:], feat_hw)
    table = _label_table(labels, num_classes, ignore_index)
    return _sample_locations(
        labels, table, feat_hw, num_samples, sampling, patches, ignore_index, generator, boundary_boost
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
    """Sampled cells (B x N flat index), input centres (B x N x 2), validity (B x N), per-size class distributions."""
    labels = labels.to(features.device, torch.long)
    patches = _patch_list(patch_sizes, labels.shape[-2:], features.shape[-2:])
    table = _label_table(labels, num_classes, ignore_index)
    index, centres, valid = _sample_locations(
        labels, table, features.shape[-2:], num_samples, sampling, patches, ignore_index, generator, boundary_boost
    )
    return index, centres, valid, [_class_distribution(table, centres, p) for p in patches]


def _sample_locations(
    labels: Tensor,
    table: Tensor,
    feat_hw: tuple[int, int],
    num_samples: int,
    sampling: str,
    patches: list[tuple[int, int]],
    ignore_index: int | None,
    generator: torch.Generator | None,
    boundary_boost: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick feature cells per image: (flat cell index B x N, input centres B x N x 2, valid B x N).

    ``valid`` is False where the centre pixel is ignored (grid mode), or where an image has fewer
    valid cells than requested samples (random / balanced), so such samples carry no weight.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    B, (h, w) = labels.shape[0], feat_hw
    all_centres = cell_centres(feat_hw, labels.shape[-2:], labels.device)
    centre_labels = labels[:, all_centres[:, 0], all_centres[:, 1]]
    valid_cells = torch.ones_like(centre_labels, dtype=torch.bool)
    if ignore_index is not None:
        valid_cells = centre_labels != ignore_index
    if sampling == "grid":
        index = _grid_indices(h, w, num_samples, labels.device).expand(B, -1)
    else:
        weight = valid_cells.float()
        if sampling == "balanced":
            weight = weight * _balance_weights(table, centre_labels, valid_cells, all_centres, patches, boundary_boost)
        index = _sample_without_replacement(weight, min(num_samples, h * w), generator)
    return index, all_centres[index], valid_cells.gather(1, index)


def _balance_weights(
    table: Tensor,
    centre_labels: Tensor,
    valid_cells: Tensor,
    all_centres: Tensor,
    patches: list[tuple[int, int]],
    boundary_boost: float,
) -> Tensor:
    """Per-cell weight (1 + boost if the largest patch holds > 1 class) / count(centre class): B x h*w."""
    num_classes = table.shape[1] - 1
    largest = max(patches, key=lambda p: p[0] * p[1])
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


def _grid_indices(h: int, w: int, num_samples: int, device: torch.device) -> Tensor:
    """Flat indices of a regular gh x gw grid, gh * gw ~ num_samples, aspect following the map."""
    gh = min(h, max(1, round(math.sqrt(num_samples * h / w))))
    gw = min(w, max(1, round(num_samples / gh)))
    rows = torch.div((2 * torch.arange(gh, device=device) + 1) * h, 2 * gh, rounding_mode="floor")
    cols = torch.div((2 * torch.arange(gw, device=device) + 1) * w, 2 * gw, rounding_mode="floor")
    return (rows[:, None] * w + cols[None, :]).reshape(1, -1)


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


def _pair(size: PatchSize) -> tuple[int, int]:
    ph, pw = (size, size) if isinstance(size, int) else size
    if ph < 1 or pw < 1:
        raise ValueError(f"patch size must be >= 1, got {size}")
    return int(ph), int(pw)


def _patch_list(
    patch_sizes: tuple[PatchSize, ...] | str, label_hw: tuple[int, int], feat_hw: tuple[int, int]
) -> list[tuple[int, int]]:
    """Patch sizes as (ph, pw) pairs; "receptive" is the footprint of one feature cell."""
    if patch_sizes == "receptive":
        return [(max(1, round(label_hw[0] / feat_hw[0])), max(1, round(label_hw[1] / feat_hw[1])))]
    if isinstance(patch_sizes, str) or len(patch_sizes) == 0:
        raise ValueError(f'patch_sizes must be a non-empty tuple of sizes or "receptive", got {patch_sizes!r}')
    return [_pair(p) for p in patch_sizes]


def _check_inputs(features: Tensor, labels: Tensor, num_classes: int, tau: float) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be B x C x h x w, got shape {tuple(features.shape)}")
    if labels.dim() != 3 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be B x H x W with B = {features.shape[0]}, got shape {tuple(labels.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
