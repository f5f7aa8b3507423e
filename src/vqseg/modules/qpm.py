"""Quantized Perturbation Module (QPM) of VQ-Seg: random jumps between codebook indices.

Everything here runs on the tensors' device with no host synchronisation, so a QPM call can sit
inside a CUDA training step without stalling it (the official code loops over unique codes in
Python and syncs once per code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["QPM", "perturb_indices", "shuffle_indices"]


def _check_eps(eps: float) -> None:
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1], got {eps}")


@torch.no_grad()
def perturb_indices(
    indices: Tensor,
    codebook: Tensor,
    eps: float,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int = 1024,
) -> Tensor:
    """Keep each index with probability 1 - eps, else jump to j != i with p ~ exp(-||c_i - c_j||^2 / T).

    Sampling is by inverse CDF with one uniform per token (cumsum + searchsorted): on CPU it is about
    twice as fast as Gumbel-max, which needs K uniforms and two logs per token. It is exact up to the
    float32 rounding of the CDF (a float64 CDF would more than double the cost). Every token gets a
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
        # -||c_i - c_j||^2 / T up to a per-row constant: (2 c_i.c_j - ||c_j||^2) / T
        sq_norms = codes.pow(2).sum(dim=1)
        uniforms = torch.rand(2, flat.numel(), device=flat.device, generator=generator)
        jumps = []
        for start in range(0, flat.numel(), chunk_size):
            src = flat[start : start + chunk_size].long()
            logits = torch.addmm(sq_norms, codes[src], codes.T, beta=-1.0 / temperature, alpha=2.0 / temperature)
            logits.scatter_(1, src[:, None], float("-inf"))
            cdf = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_().cumsum_(dim=1)
            total = cdf[:, -1:]
            # strictly below the total, so a zero-probability tail (e.g. j = i = K - 1) is never hit
            below_total = torch.nextafter(total, torch.zeros_like(total))
            target = torch.minimum(uniforms[1, start : start + chunk_size, None] * total, below_total)
            jumps.append(torch.searchsorted(cdf, target, right=True).squeeze(1))
        jumped = torch.cat(jumps).to(flat.dtype)
    return torch.where(uniforms[0] < eps, jumped, flat).view_as(indices)


@torch.no_grad()
def shuffle_indices(indices: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Per image (first dim), pick each token with probability eps and permute the picked tokens' indices.

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
    temperature: float = 1.0
    mode: Literal["jump", "shuffle"] = "jump"
    generator: torch.Generator | None = None

    def __call__(self, indices: Tensor, codebook: Tensor) -> Tensor:
        if self.mode == "jump":
            return perturb_indices(indices, codebook, self.eps, self.temperature, self.generator)
        if self.mode == "shuffle":
            return shuffle_indices(indices, self.eps, self.generator)
        raise ValueError(f"unknown QPM mode {self.mode!r}")
