"""A light DPT head over an encoder pyramid, plus a cheap full-resolution image stem.

DPT (Ranftl et al., ICCV 2021) as UniMatch V2's ``DPTHead``: each pyramid level is projected
(1x1), reassembled to its own scale (strides 4, 8, 16 and 32 of the image, deepest coarsest),
brought to a common width (3x3) and fused from the deepest up by RefineNet fusion blocks (two
residual conv units each). Departures, to keep the costly layers at a quarter of the input
resolution (the stem's two at a half, one at full) on a CPU: bilinear resampling instead of (transposed) strided convolutions,
so one head serves any encoder stride (LiteMedSAM 4, DINOv2 14); and the quarter-resolution
output is fused with an image stem so boundaries are not limited to the encoder's stride. The
stem is one 3x3 conv on the image at full resolution; the decoder brings it to half resolution
(strided 3x3), fuses it there with the upsampled DPT output (3x3), and returns [fused map
upsampled, stem], so that only the model's 1x1 segmentation head runs at full resolution: at
256 px, 3x3 convs at full resolution dominated the CPU step (benchmarks/pretrained_speed.py). The
stem's map travels beside the encoder's levels (``Features.stem``): it is not a level, so feature
perturbations and quantizers that act on levels leave it alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.models.base import Features

DPT_STRIDES = (4, 8, 16, 32)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )


class ImageStem(ConvBNReLU):
    """One 3x3 conv-BN-ReLU at the image's own resolution (the costly layers run at 1/2 or below)."""


class ResidualConvUnit(nn.Module):
    """DPT's ``ResidualConvUnit_custom`` without batch norm (UniMatch V2's ``use_bn=False``)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT's ``FeatureFusionBlock``: add the skip (after a residual unit), refine, resize, project."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features)
        self.unit = ResidualConvUnit(features)
        self.out = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.unit(x), size=size, mode="bilinear", align_corners=True)
        return self.out(x)


def _scaled(size: tuple[int, int], stride: int) -> tuple[int, int]:
    return max(1, math.ceil(size[0] / stride)), max(1, math.ceil(size[1] / stride))


class DPTDecoder(nn.Module):
    """Levels 1-4 and the image stem -> a ``2 * stem_channels`` map at the stem's (= the input's) size.

    ``strides``: where each level is reassembled (of the input; DPT's 4, 8, 16, 32 by default). The
    fusion path runs from level 4 to level 1 at the finest stride met so far, so a fine deep level
    (LiteMedSAM's neck kept at stride 4) is never pooled on the way.
    """

    def __init__(self, levels: list[int], stem_channels: int, features: int = 64,
                 strides: list[int] | tuple[int, ...] = DPT_STRIDES) -> None:
        super().__init__()
        if len(levels) != len(DPT_STRIDES) or len(strides) != len(DPT_STRIDES):
            raise ValueError(f"the DPT head takes {len(DPT_STRIDES)} pyramid levels and strides, got {len(levels)}")
        self.strides = tuple(strides)
        # fusion i runs at the finest stride among levels i.. (the default: DPT's own sizes)
        self.path_strides = tuple(min(self.strides[i:]) for i in range(len(self.strides)))
        widths = [features // 2, features, features * 2, features * 2]  # UniMatch V2's out_channels, scaled
        self.projects = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(levels, widths))
        self.layers_rn = nn.ModuleList(nn.Conv2d(w, features, 3, padding=1, bias=False) for w in widths)
        self.fusions = nn.ModuleList(FusionBlock(features) for _ in widths)
        half = features // 2
        self.output_conv = nn.Sequential(nn.Conv2d(features, half, 3, padding=1), nn.ReLU(inplace=True))
        self.stem_down = ConvBNReLU(stem_channels, stem_channels, stride=2)
        self.fuse = ConvBNReLU(half + stem_channels, stem_channels)
        self.out_channels = 2 * stem_channels

    def forward(self, features: Features) -> Tensor:
        stem, levels = features.stem, features.levels
        size = tuple(stem.shape[-2:])
        sizes = [_scaled(size, stride) for stride in self.strides]
        paths = [_scaled(size, stride) for stride in self.path_strides]
        rn = [
            layer_rn(F.interpolate(project(x), size=s, mode="bilinear", align_corners=False))
            for x, project, layer_rn, s in zip(levels, self.projects, self.layers_rn, sizes)
        ]
        path = self.fusions[-1](rn[-1], None, paths[-2])
        for i in range(len(rn) - 2, -1, -1):
            path = self.fusions[i](path, F.interpolate(rn[i], size=paths[i], mode="bilinear", align_corners=False)
                                   if sizes[i] != paths[i] else rn[i], paths[i - 1] if i > 0 else paths[0])
        stem_half = self.stem_down(stem)
        coarse = F.interpolate(self.output_conv(path), size=stem_half.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.fuse(torch.cat([coarse, stem_half], dim=1))
        fused = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        return torch.cat([fused, stem], dim=1)
