"""Vector quantizer with a SimVQ codebook (frozen random table times a learnable linear map).

Tokens are the feature vectors at every spatial position of a B x C x H x W map or, for a 3D
network's bottleneck, of a B x C x D x H x W one: the lookup does not care where a token sits.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqseg.modules.foundation import note_once

__all__ = ["VQOutput", "VectorQuantizer"]

Perturb = Callable[[Tensor, Tensor], Tensor]


class VQOutput(NamedTuple):
    """What one quantizer pass returns; every tensor stays on the device (no host sync)."""

    quantized: Tensor  # B x C x *spatial (H x W or D x H x W), straight-through w.r.t. the input
    indices: Tensor  # B x *spatial, nearest codes (before any perturbation)
    used_indices: Tensor  # B x *spatial, the codes in ``quantized`` (``indices`` unless perturbed)
    loss: Tensor  # codebook + beta * commitment, 0-dim
    perplexity: Tensor  # of this batch's code histogram, 0-dim


def _perplexity(counts: Tensor) -> Tensor:
    probs = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(probs, probs).sum())


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through estimator, trained by codebook + beta * commitment loss.

    SimVQ parametrisation: codes = frozen N(0, dim^-1/2) table @ learnable linear map, so every
    code moves whenever the map is updated, which keeps most of a large codebook in use. The table
    is drawn from ``table_seed`` and saved with the weights (2 MB at K = 16384, 32 wide): another
    torch build may draw another table from the same seed, and a checkpoint must keep its codes.
    It is a parameter that never trains, so optimisers and EMA teachers leave it alone.
    With ``cosine`` features and codes are L2-normalised before the search (as in ViT-VQGAN): raw
    post-activation CNN features are far from the unit-scale codes, and the nearest-code rule then
    collapsed onto a handful of codes in an exploratory run on the U-Net bottleneck.
    Code usage since the last `reset_usage()` is counted in training mode in a non-persistent
    buffer: it is a monitoring statistic, so it stays out of checkpoints.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int = 16384,
        beta: float = 0.25,
        chunk_size: int = 4096,
        cosine: bool = False,
        table_seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.beta, self.chunk_size = dim, codebook_size, beta, chunk_size
        self.cosine = cosine
        self.table_seed = table_seed
        self.frozen_codebook = nn.Parameter(self._draw_table(), requires_grad=False)
        self.mapping = nn.Linear(dim, dim, bias=False)
        self.register_buffer("code_counts", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        self.register_load_state_dict_pre_hook(_regenerate_missing_table)

    def _draw_table(self) -> Tensor:
        generator = torch.Generator().manual_seed(self.table_seed)
        return torch.randn(self.codebook_size, self.dim, generator=generator) * self.dim**-0.5

    @property
    def codebook(self) -> Tensor:
        codes = self.mapping(self.frozen_codebook)
        return F.normalize(codes, dim=1) if self.cosine else codes

    @torch.no_grad()
    def nearest(self, tokens: Tensor, codebook: Tensor) -> Tensor:
        """Exact argmin_k ||z - c_k||^2 (||z||^2 dropped: constant per token), `chunk_size` tokens at a time."""
        sq_norms = codebook.pow(2).sum(dim=1)
        return torch.cat([
            torch.addmm(sq_norms, chunk, codebook.T, alpha=-2.0).argmin(dim=1)
            for chunk in tokens.split(self.chunk_size)
        ])

    def forward(self, z: Tensor, perturb: Perturb | None = None) -> VQOutput:
        """Quantize z (B x C x *spatial); `perturb` (e.g. a `QPM`) picks the codes of the output only,
        the losses see the true ones."""
        b, c, *spatial = z.shape
        compute_dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(z.device.type, enabled=False):
            codebook = self.codebook.to(compute_dtype)
            tokens = z.movedim(1, -1).reshape(-1, c).to(compute_dtype)
            if self.cosine:
                tokens = F.normalize(tokens, dim=1)
                z = tokens.view(b, *spatial, c).movedim(-1, 1).to(z.dtype)
            indices = self.nearest(tokens.detach(), codebook.detach())
            codes = F.embedding(indices, codebook)
            loss = F.mse_loss(codes, tokens.detach()) + self.beta * F.mse_loss(tokens, codes.detach())

            indices = indices.view(b, *spatial)
            out_indices = indices if perturb is None else perturb(indices, codebook.detach())
            out_codes = F.embedding(out_indices, codebook.detach()).movedim(-1, 1).to(z.dtype)
            quantized = z + (out_codes - z).detach()

        with torch.no_grad():
            flat_indices = indices.flatten()
            counts = torch.zeros_like(self.code_counts).index_add_(0, flat_indices, torch.ones_like(flat_indices))
            if self.training:
                self.code_counts += counts
        return VQOutput(quantized, indices, out_indices, loss, _perplexity(counts))

    @torch.no_grad()
    def usage(self) -> dict[str, float]:
        """Fraction of codes used and perplexity since the last reset (syncs: call it when logging)."""
        return {
            "fraction_used": (self.code_counts > 0).float().mean().item(),
            "perplexity": _perplexity(self.code_counts).item(),
        }

    def reset_usage(self) -> None:
        self.code_counts.zero_()


def _regenerate_missing_table(module: VectorQuantizer, state: dict, prefix: str, *_: object) -> None:
    """Checkpoints written before the table was saved lack it: draw it from its seed, as they were
    trained with (on this torch build; said once)."""
    key = prefix + "frozen_codebook"
    if key not in state:
        state[key] = module._draw_table().to(module.frozen_codebook.device)
        note_once(f"vqseg: this older checkpoint has no saved VQ code table: regenerated from seed {module.table_seed}, "
                  "the same codes only on a torch build that draws the same random numbers")
