"""Segmentation networks (encoder, decoder, head: ``models/base.py``) behind the model registry.

A backbone registers a builder returning a :class:`SegmentationModel` (``@MODELS.register``);
importing this package registers the built-in ones (``unet``, ``litemedsam``, ``dinov2``). Extra
heads are built by the methods from ``feature_channels`` (VQ-Seg's reconstruction branch decodes
the bottleneck alone, which a backbone's skip-connected decoder could not do).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn

from vqseg.config import Config, ConfigError, ModelConfig
from vqseg.models.base import Features, SegmentationHead, SegmentationModel
from vqseg.models.unet import UNetDecoder, UNetEncoder
from vqseg.registry import MODELS

__all__ = ["Features", "SegmentationHead", "SegmentationModel", "available_models", "build_model"]


ModelBuilder = Callable[[ModelConfig, int, int], SegmentationModel]


def available_models() -> list[str]:
    return MODELS.names()


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    return MODELS[cfg.name](cfg, in_channels, num_classes)


def _check_unet(cfg: Config) -> None:
    """Each U-Net level below the first halves the image (max-pooling, rounding down); below a
    1 x 1 bottleneck the pooling fails."""
    if len(cfg.train.patch_size) == 3:
        raise ConfigError(f"train.patch_size={cfg.train.patch_size} is 3D: use model.name=unet3d (unet is 2D)")
    smallest = 2 ** (len(cfg.model.channels) - 1)
    if cfg.train.image_size < smallest:
        raise ConfigError(
            f"train.image_size={cfg.train.image_size} is too small for the {len(cfg.model.channels)}-level "
            f"model.channels: it must be at least {smallest} (each level halves it)"
        )


@MODELS.register("unet", resolve=_check_unet)
def _unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    encoder = UNetEncoder(in_channels, cfg.channels, cfg.dropout)
    return SegmentationModel(encoder, UNetDecoder(cfg.channels), SegmentationHead(cfg.channels[0], num_classes, 3))


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Batch norm keeps normalising with batch statistics but stops updating its running ones.

    For passes whose features are deliberately corrupted (VQ-Seg's perturbed codes): otherwise
    the running statistics used at evaluation drift towards the corrupted feature distribution.
    The batch counter is restored too: a cumulative-average norm (``momentum=None``) weighs the
    next batches by it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


# Registers litemedsam and dinov2 (imported last: it builds on what is above).
from vqseg.models import pretrained as _pretrained  # noqa: E402,F401
from vqseg.models import unet3d as _unet3d  # noqa: E402,F401  (registers unet3d)
