"""Quantized Perturbation Module (QPM) of VQ-Seg: random jumps between codebook indices.

Indices are B x H x W, or B x D x H x W for a 3D bottleneck (any B x ... works): the jump law
acts token by token, and the shuffle permutes within each image (first dim) over all its positions.

Everything on the training path runs on the tensors' device with no host synchronisation, so a
QPM call can sit inside a CUDA training step without stalling it (the official code loops over
unique codes in Python and syncs once per code). `jump_stats`, which says what the jumps did,
syncs and is meant for logging steps only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TEMPERATURE", "QPM", "jump_logits", "jump_stats", "neighbour_ranks", "perturb_indices", "shuffle_indices",
]

NEAR_FRACTION = 0.01  # "near" in the logged statistics: the source's 1 % nearest codes
# At VQ-Seg's initial codebook (K = 16384, 32-wide, L2-normalised) T = 0.2 sends 81 % of jumps into
# the source's 1 % nearest codes over ~245 effective codes (median rank 21); T <= 0.1 sends most
# jumps to the one nearest code, T >= 0.5 spreads them over thousands (benchmarks/qpm_locality.py).
DEFAULT_TEMPERATURE = 0.2


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1], got {eps}")


def _sq_distances(codes: Tensor, sq_norms: Tensor, src: Tensor) -> Tensor:
    """||c_i - c_j||^2 for the source rows, with +inf at j = i so that a code is never its own neighbour."""
    dist = torch.addmm(sq_norms, codes[src], codes.T, alpha=-2.0).add_(sq_norms[src, None])
    return dist.scatter_(1, src[:, None], float("inf"))


def jump_logits(codes: Tensor, sq_norms: Tensor, src: Tensor, temperature: float) -> Tensor:
    """Log-weights -d_ij / (s_i T) of QPM's jump law for the source rows (-inf at j = i), shifted
    by a per-row constant so that each row's maximum (the nearest code) is 0, ready for exp().

    s_i is the source's nearest-neighbour squared distance, so the temperature is measured in
    units of "how far the closest other code is": the nearest code always has log-weight -1/T and
    a code at k times that distance -k/T, whatever the scale of the codes (L2-normalised or not,
    early or late in training). The median distance would be the other scale-free choice, but in
    a 32-wide code space most codes sit at about the same distance (concentration of measure), so
    a median-scaled temperature would have to be tiny to tell near from far; the nearest-neighbour
    scale anchors T to the neighbourhood the jump is meant to stay in. A zero scale (duplicate
    codes) is clamped, which sends the jump to the duplicate instead of producing NaNs.
    """
    dist = _sq_distances(codes, sq_norms, src)
    nearest = dist.amin(dim=1, keepdim=True)
    finfo = torch.finfo(dist.dtype)
    # finite even for a zero scale, so that the twin's 0 * slope stays 0 (not NaN)
    slope = nearest.clamp_min(finfo.tiny).reciprocal_().mul_(-1.0 / temperature).clamp_min_(-finfo.max)
    return dist.sub_(nearest).mul_(slope)


@torch.no_grad()
def perturb_indices(
    indices: Tensor,
    codebook: Tensor,
    eps: float,
    temperature: float = DEFAULT_TEMPERATURE,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int = 1024,
) -> Tensor:
    """Keep each index with probability 1 - eps, else jump to j != i with p(j|i) ~ exp(-d_ij / (s_i T)).

    d_ij = ||c_i - c_j||^2 and s_i = min_{j != i} d_ij (see `jump_logits`). Sampling is by inverse
    CDF with one uniform per token (cumsum + searchsorted): on CPU it is about twice as fast as
    Gumbel-max, which needs K uniforms and two logs per token. It is exact up to the float32
    rounding of the CDF (a float64 CDF would more than double the cost). Every token gets a
    candidate, since computing only the moving ones needs a host sync to size the work; the N x K
    logits are built `chunk_size` tokens at a time to bound memory.
    """
    _check_eps(eps)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if eps == 0.0 or indices.numel() == 0:
        return indices.clone()
    if codebook.shape[0] < 2:
        raise ValueError("a codebook needs at least two codes to jump between")

    flat = indices.reshape(-1)
    with torch.autocast(flat.device.type, enabled=False):
        codes = codebook.detach().float()
        sq_norms = codes.pow(2).sum(dim=1)
        uniforms = torch.rand(2, flat.numel(), device=flat.device, generator=generator)
        jumps = []
        for start in range(0, flat.numel(), chunk_size):
            logits = jump_logits(codes, sq_norms, flat[start : start + chunk_size].long(), temperature)
            cdf = logits.exp_().cumsum_(dim=1)
            total = cdf[:, -1:]
            # strictly below the total, so a zero-probability tail (e.g. j = i = K - 1) is never hit
            below_total = torch.nextafter(total, torch.zeros_like(total))
            target = torch.minimum(uniforms[1, start : start + chunk_size, None] * total, below_total)
            jumps.append(torch.searchsorted(cdf, target, right=True).squeeze(1))
        jumped = torch.cat(jumps).to(flat.dtype)
    return torch.where(uniforms[0] < eps, jumped, flat).view_as(indices)


@torch.no_grad()
def neighbour_ranks(source: Tensor, target: Tensor, codebook: Tensor) -> Tensor:
    """Rank of each target code among its source code's neighbours: 1 = the nearest code j != i.

    Ties count in the target's favour (one plus the number of strictly closer codes).
    """
    codes = codebook.detach().float()
    dist = _sq_distances(codes, codes.pow(2).sum(dim=1), source.reshape(-1).long())
    to_target = dist.gather(1, target.reshape(-1, 1).long())
    return (dist < to_target).sum(dim=1) + 1


@torch.no_grad()
def jump_stats(source: Tensor, perturbed: Tensor, codebook: Tensor, max_tokens: int = 2048) -> dict[str, float]:
    """What a perturbation did: share of tokens moved, and for moved ones where they landed.

    ``near_share`` is the share of moves into the source's 1 % nearest codes (1 % under a uniform
    swap); ``rank_mean`` / ``rank_median`` the target's neighbour rank (about K / 2 under a
    uniform swap). At most ``max_tokens`` evenly spaced moved tokens are ranked, which bounds the
    cost to one max_tokens x K distance block. Syncs with the host: call it at logging steps.
    """
    source, perturbed = source.reshape(-1), perturbed.reshape(-1)
    moved = source != perturbed
    stats = {"moved": moved.float().mean().item()}
    source, perturbed = source[moved], perturbed[moved]
    if source.numel() == 0:
        return stats
    if source.numel() > max_tokens:
        keep = torch.linspace(0, source.numel() - 1, max_tokens, device=source.device).long()
        source, perturbed = source[keep], perturbed[keep]
    ranks = neighbour_ranks(source, perturbed, codebook).float()
    near = max(1, round(NEAR_FRACTION * (codebook.shape[0] - 1)))
    stats.update(
        near_share=(ranks <= near).float().mean().item(),
        rank_mean=ranks.mean().item(),
        rank_median=ranks.median().item(),
    )
    return stats


@torch.no_grad()
def shuffle_indices(indices: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Per image (first dim), pick each token with probability eps and permute the picked tokens' indices
    across all of the image's positions (every slice of a volume).

    The per-image multiset of indices is preserved. Vectorised over the batch by two stable sorts
    (no loop, no host sync): the picked positions in ascending order receive the indices of the
    picked positions in a uniformly random order (float64 keys make ties negligible).
    """
    _check_eps(eps)
    if eps == 0.0 or indices.numel() == 0:
        return indices.clone()
    flat = indices.reshape(indices.shape[0], -1)
    keys = torch.rand(flat.shape, device=flat.device, dtype=torch.float64, generator=generator)
    picked = keys < eps
    # reuse the keys (uniform on [0, eps) given picked) as the random order of the picked tokens
    random_order = torch.where(picked, keys, 2.0).argsort(dim=1, stable=True)
    ascending_order = (~picked).to(torch.uint8).argsort(dim=1, stable=True)
    shuffled = torch.empty_like(flat).scatter_(1, ascending_order, flat.gather(1, random_order))
    return shuffled.view_as(indices)


@dataclass
class QPM:
    """A perturbation hook for `VectorQuantizer.forward(z, perturb=...)`: maps (indices, codebook) to new indices."""

    eps: float = 0.7
    temperature: float = DEFAULT_TEMPERATURE
    mode: Literal["jump", "shuffle"] = "jump"
    generator: torch.Generator | None = None

    def __call__(self, indices: Tensor, codebook: Tensor) -> Tensor:
        if self.mode == "jump":
            return perturb_indices(indices, codebook, self.eps, self.temperature, self.generator)
        if self.mode == "shuffle":
            return shuffle_indices(indices, self.eps, self.generator)
        raise ValueError(f"unknown QPM mode {self.mode!r}")
