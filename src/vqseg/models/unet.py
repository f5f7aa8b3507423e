"""The 2D U-Net used by every ACDC semi-supervised paper (SSL4MIS), about 1.8 M parameters.

Split into an encoder that returns one feature map per level and a decoder that consumes that
list, so methods can perturb, quantize or tap features between the two without touching either.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.models.base import Features, LevelEncoder


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions with batch norm and LeakyReLU, dropout between them (SSL4MIS)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )


class UNetEncoder(LevelEncoder):
    """Five levels, the first at full resolution (the U-Net's first block is a level with a skip)."""

    def __init__(self, in_channels: int, channels: list[int], dropout: list[float]) -> None:
        super().__init__()
        if len(channels) != len(dropout):
            raise ValueError(f"model.channels ({len(channels)}) and model.dropout ({len(dropout)}) differ in length")
        self.out_channels = list(channels)
        self.reconstruction_channels = list(channels)  # every level doubles: back to full resolution
        self.stem = ConvBlock(in_channels, channels[0], dropout[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(c_in, c_out, p))
            for c_in, c_out, p in zip(channels[:-1], channels[1:], dropout[1:])
        )



class UpBlock(nn.Module):
    """1x1 conv + bilinear upsampling (SSL4MIS's default), concatenation with the skip, ConvBlock."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(deep_channels, skip_channels, kernel_size=1)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(self.reduce(deep), size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, up], dim=1))


class UNetDecoder(nn.Module):
    """Up from the deepest level, concatenating each shallower one; ``channels[0]`` wide at full
    resolution (SSL4MIS's 3x3 classifier is the model's head)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        rev = channels[::-1]
        self.ups = nn.ModuleList(UpBlock(rev[i], rev[i + 1], rev[i + 1]) for i in range(len(rev) - 1))

    def forward(self, features: Features) -> Tensor:
        levels = features.levels
        x = levels[-1]
        for up, skip in zip(self.ups, reversed(levels[:-1])):
            x = up(x, skip)
        return x
