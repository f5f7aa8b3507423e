"""UAFS: uncertainty-aware feature selection (Li et al., TMI 2022), see METHODS.md §2.

A = conv1x1(ReLU(BN(conv_kxk(X)))) with M channels, U = entropy(softmax(A)) / log M in [0, 1],
X' = X + X * (1 - U): confident locations are amplified (up to 2x), uncertain ones pass unchanged.
The block has no loss of its own; it learns only through the task loss. On 3D feature maps
(``dims=3``) the convolutions and the batch norm are the 3D ones (kxkxk, 1x1x1), the rest is the
same: the entropy runs over the M channels at every voxel.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class UAFS(nn.Module):
    """Residual re-weighting of a feature map by one minus its normalised attention entropy."""

    def __init__(self, channels: int, m: int = 2, kernel_size: int = 3, dims: int = 2) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3 (the feature map's spatial axes), got {dims}")
        if m < 2:
            raise ValueError(f"m must be >= 2 (entropy of one channel is always 0), got {m}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the spatial size, got {kernel_size}")
        self.m = m
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.attention = nn.Sequential(
            conv(channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm(channels),
            nn.ReLU(inplace=True),
            conv(channels, m, 1),
        )
        self.last_uncertainty: Tensor | None = None

    def uncertainty(self, x: Tensor) -> Tensor:
        """U = entropy(softmax(A)) / log M, B x 1 x H x W (B x 1 x D x H x W in 3D), computed in float32.

        Written as 1 - KL(softmax(A) || uniform) / log M, the same quantity, because it is exactly
        1 when A is constant (then X' == X bit for bit) and cannot leave [0, 1] by rounding.
        """
        log_p = F.log_softmax(self.attention(x).float(), dim=1)
        log_m = math.log(self.m)
        certainty = (log_p.exp() * (log_p + log_m)).sum(1, keepdim=True) / log_m
        return 1 - certainty.clamp(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        u = self.uncertainty(x)
        self.last_uncertainty = u.detach()
        return x + x * (1 - u).to(x.dtype)
