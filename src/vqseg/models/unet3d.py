"""nnU-Net's generic 3D U-Net (``PlainConvUNet`` of dynamic_network_architectures, as nnU-Net v2
builds it from its plans), split into encoder, decoder and head like every model here.

Every stage is two (conv - instance norm (affine) - LeakyReLU 0.01) blocks; a stage below the
first downsamples in its first conv, strided by that stage's ``model.pool`` entry (nnU-Net's
strided convolution, not max-pooling); the decoder upsamples each level by a transposed conv of
the same factors, concatenates the skip and runs two blocks with that level's kernels; the head
is a 1x1x1 conv. Weights start as nnU-Net's (He normal, a = 0.01, zero biases). Left out:
nnU-Net's deep supervision (the methods train on the full-resolution logits), and
``model.dropout`` is not read (nnU-Net has no dropout).

Config contract (``model.*``, one [d, h, w] entry per axis, depth first):
- ``channels``: the width of each stage, shallowest first (nnU-Net: 32, 64, 128, 256, 320, 320).
- ``pool``: one [d, h, w] downsampling factor per stage below the first (len(channels) - 1
  entries), e.g. [[1, 2, 2], [2, 2, 2], ...] where thick slices keep their depth at first.
- ``kernels``: one [d, h, w] conv kernel per stage (len(channels) entries, odd sizes), e.g.
  [1, 3, 3] for in-plane only.
- Empty ``pool`` / ``kernels`` (until the planner fills them): [2, 2, 2] and [3, 3, 3] at every
  stage, a small isotropic patch's plan.
- ``train.patch_size``, when set, is [d, h, w] and divisible by the total pooling per axis
  (nnU-Net's rule), so every skip meets its upsampled map at the same size.

Layer names, for PDCR and UAFS by name (the 2D U-Net's scheme, so a config's layer list carries
over): ``encoder.stem`` (level 0, full resolution), ``encoder.downs.N`` (level N + 1),
``decoder.ups.N.up`` (the transposed conv) and ``decoder.ups.N.conv`` (the blocks after the
concatenation; N = 0 is the deepest, the last one is at full resolution), ``head``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqseg.config import Config, ConfigError, ModelConfig
from vqseg.models.base import Features, LevelEncoder, SegmentationModel
from vqseg.registry import MODELS

DEFAULT_POOL = [2, 2, 2]
DEFAULT_KERNEL = [3, 3, 3]


def stage_plan(cfg: ModelConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Per-stage (pool, kernels) of ``cfg``, the defaults where they are empty; a plan that does not
    fit ``model.channels`` is a one-line ConfigError."""
    depth = len(cfg.channels)
    pool = cfg.pool or [DEFAULT_POOL] * (depth - 1)
    kernels = cfg.kernels or [DEFAULT_KERNEL] * depth
    for key, plan, expected, what in (
        ("pool", pool, depth - 1, "one per stage below the first"),
        ("kernels", kernels, depth, "one per stage"),
    ):
        if len(plan) != expected:
            raise ConfigError(
                f"model.{key} has {len(plan)} entries but model.channels has {depth} stages: give {expected} "
                f"[d, h, w] entries ({what}), or none for the default"
            )
        for i, entry in enumerate(plan):
            if len(entry) != 3 or min(entry) < 1:
                raise ConfigError(f"model.{key}[{i}]={entry}: give 3 sizes [d, h, w], each >= 1")
    for i, kernel in enumerate(kernels):
        if any(size % 2 == 0 for size in kernel):
            raise ConfigError(f"model.kernels[{i}]={kernel}: kernel sizes must be odd (the convs keep the size)")
    return pool, kernels


def total_pooling(pool: list[list[int]]) -> list[int]:
    """The downsampling from the input to the deepest level, per axis."""
    return [math.prod(axis) for axis in zip(*pool)] if pool else [1, 1, 1]


def _check_unet3d(cfg: Config) -> None:
    """The plan fits ``model.channels``, and a patch is 3D and divisible by the total pooling."""
    pool, _ = stage_plan(cfg.model)
    patch = cfg.train.patch_size
    if len(patch) != 3:
        raise ConfigError(f"train.patch_size={patch}: model.name=unet3d trains on 3D patches, give [d, h, w]")
    if not cfg.model.pool:
        return  # the plan fills it for this patch (data/plan.py, plan_patch_run)
    total = total_pooling(pool)
    if any(size % factor for size, factor in zip(patch, total)):
        fitting = [max(1, round(size / factor)) * factor for size, factor in zip(patch, total)]
        source = "model.pool" if cfg.model.pool else f"the default model.pool ({DEFAULT_POOL} per stage)"
        raise ConfigError(
            f"train.patch_size={patch} is not divisible by the total pooling {total} of {source} "
            f"(per axis, as nnU-Net requires); e.g. {fitting}"
        )


class ConvNormAct(nn.Sequential):
    """conv - instance norm (affine) - LeakyReLU 0.01, nnU-Net's block; padding keeps the size."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int] | int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=[k // 2 for k in kernel]),
            nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class StackedConvs(nn.Sequential):
    """A stage: two blocks, the first one strided when the stage downsamples."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int] | int = 1) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, kernel, stride),
            ConvNormAct(out_channels, out_channels, kernel),
        )


class UNet3DEncoder(LevelEncoder):
    """One level per stage, the first at full resolution."""

    def __init__(self, in_channels: int, channels: list[int], pool: list[list[int]], kernels: list[list[int]]) -> None:
        super().__init__()
        self.out_channels = list(channels)
        self.reconstruction_channels = list(channels)  # back to full resolution, stage by stage
        self.reconstruction_scales = [list(p) for p in pool]  # what VQ-Seg's reconstruction branch undoes
        self.stem = StackedConvs(in_channels, channels[0], kernels[0])
        self.downs = nn.ModuleList(
            StackedConvs(c_in, c_out, kernel, stride)
            for c_in, c_out, kernel, stride in zip(channels[:-1], channels[1:], kernels[1:], pool)
        )



class UpStage(nn.Module):
    """Transposed conv by the level's pooling factors, concatenation (upsampled first, as nnU-Net),
    two blocks with the shallower level's kernel."""

    def __init__(self, deep_channels: int, skip_channels: int, pool: list[int], kernel: list[int]) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(deep_channels, skip_channels, pool, stride=pool)
        self.conv = StackedConvs(2 * skip_channels, skip_channels, kernel)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(deep), skip], dim=1))


class UNet3DDecoder(nn.Module):
    """Up from the deepest level to full resolution, ``channels[0]`` wide."""

    def __init__(self, channels: list[int], pool: list[list[int]], kernels: list[list[int]]) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            UpStage(channels[i + 1], channels[i], pool[i], kernels[i]) for i in reversed(range(len(channels) - 1))
        )

    def forward(self, features: Features) -> Tensor:
        levels = features.levels
        x = levels[-1]
        for up, skip in zip(self.ups, reversed(levels[:-1])):
            x = up(x, skip)
        return x


class SegmentationHead3d(nn.Conv3d):
    """The classifier of a 3D model: nnU-Net's 1x1x1 convolution to class logits (the 3D
    counterpart of ``models.base.SegmentationHead``, same ``weight`` / ``bias`` keys)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, 1)


def _he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2): He-normal conv weights for LeakyReLU 0.01, zero biases."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@MODELS.register("unet3d", resolve=_check_unet3d)
def _unet3d(cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    pool, kernels = stage_plan(cfg)
    model = SegmentationModel(
        UNet3DEncoder(in_channels, cfg.channels, pool, kernels),
        UNet3DDecoder(cfg.channels, pool, kernels),
        SegmentationHead3d(cfg.channels[0], num_classes),
    )
    model.apply(_he_init)
    return model
