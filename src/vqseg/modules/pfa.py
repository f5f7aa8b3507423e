"""Post-VQ Feature Adapter (PFA) of VQ-Seg: align post-VQ features with a frozen foundation model.

The quantised feature map is resized to the foundation model's patch grid and projected to its
channel count by a 1x1 convolution; a patch-wise InfoNCE loss then pulls each location towards the
foundation feature at the same location and away from the other locations of the same image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PostVQAdapter(nn.Module):
    """Bilinear resize to ``grid`` followed by a 1x1 conv to ``out_dim`` channels.

    Both steps are linear and the bilinear weights sum to one, so they commute exactly (bias
    included); the conv is applied on whichever side of the resize has fewer pixels, which saves
    most of its cost when a 16 x 16 post-VQ map is upsampled to a 64 x 64 foundation grid.
    """

    def __init__(self, in_channels: int, out_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.proj = nn.Conv2d(in_channels, out_dim, kernel_size=1)

    def _resize(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == self.grid:
            return x
        return F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False)

    def forward(self, post_vq: Tensor) -> Tensor:
        h, w = post_vq.shape[-2:]
        if h * w <= self.grid[0] * self.grid[1]:
            return self._resize(self.proj(post_vq))
        return self.proj(self._resize(post_vq))


def patch_infonce(student: Tensor, teacher: Tensor, tau: float = 0.07, num_samples: int | None = 256,
                  generator: torch.Generator | None = None, valid: Tensor | None = None) -> Tensor:
    """Patch-wise InfoNCE between B x D x h x w student and teacher maps (mean over locations).

    For each image, the logits of a student location are its cosine similarities / ``tau`` to the
    teacher features of the sampled locations of the same image; the target is the same location.
    ``num_samples`` random locations per image (the same ones in both maps) bound the O(n^2) cost;
    None uses every location. ``valid`` (B x h x w, bool) restricts both to the teacher's valid
    cells (not the zero padding of a warp): each image samples among its own valid cells, and an
    image with fewer than two contributes nothing; all valid is the same loss as no mask. The
    teacher is detached; the loss is computed in float32 through ``cross_entropy`` (log-sum-exp),
    so a float16 teacher cache and small ``tau`` are safe. No host synchronisation.
    """
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher must both be B x D x h x w, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if valid is not None and valid.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(f"valid must be B x h x w = {(student.shape[0], *student.shape[2:])}, got {tuple(valid.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if num_samples is not None and num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (one positive and a negative), got {num_samples}")
    b, d = student.shape[:2]
    s = F.normalize(student.float().flatten(2), dim=1)
    t = F.normalize(teacher.detach().float().flatten(2), dim=1)
    n = s.shape[-1]
    valid = torch.ones(b, n, dtype=torch.bool, device=s.device) if valid is None else valid.to(s.device).flatten(1)
    m = n if num_samples is None else min(num_samples, n)
    if m < n:
        noise_device = s.device if generator is None else generator.device
        noise = torch.rand(b, n, generator=generator, device=noise_device).to(s.device)
        order = noise.masked_fill(~valid, 2.0).argsort(dim=1)[:, :m]  # valid cells first, in random order
    else:
        order = (~valid).to(torch.uint8).argsort(dim=1, stable=True)  # valid cells first, in place order
    idx = order.unsqueeze(1).expand(b, d, m)
    s, t = s.gather(2, idx), t.gather(2, idx)
    taken = valid.sum(dim=1).clamp(max=m)  # the first `taken` of each image's m columns are valid
    columns = torch.arange(m, device=s.device) < taken[:, None]
    rows = columns & (taken >= 2)[:, None]
    logits = torch.einsum("bdi,bdj->bij", s, t) / tau
    logits = logits.masked_fill(~columns[:, None, :], torch.finfo(logits.dtype).min)  # finite: no NaN gradients
    target = torch.arange(m, device=s.device).repeat(b)
    losses = F.cross_entropy(logits.reshape(b * m, m), target, reduction="none")
    rows = rows.flatten()
    return torch.where(rows, losses, 0.0).sum() / rows.sum().clamp_min(1)
