"""Segmentation networks as encoder/decoder pairs behind a small registry.

A backbone registers a builder returning a :class:`SegmentationModel`; methods only rely on
``encode`` (a list of feature maps, deepest last), ``decode`` and ``feature_channels``. Extra
heads are built by the methods from ``feature_channels`` (VQ-Seg's reconstruction branch decodes
the bottleneck alone, which a backbone's skip-connected decoder could not do).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor, nn

from vqseg.config import Config, ConfigError, ModelConfig
from vqseg.models.unet import UNetDecoder, UNetEncoder
from vqseg.registry import MODELS


class SegmentationModel(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def feature_channels(self) -> list[int]:
        return self.encoder.out_channels

    @property
    def reconstruction_channels(self) -> list[int]:
        """Widths of a x2-per-stage decoder from the deepest map back up (VQ-Seg's reconstruction
        branch, shallowest first): the encoder's, or fewer where it stops short of full resolution."""
        return self.encoder.reconstruction_channels

    def encode(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)

    def decode(self, features: list[Tensor]) -> Tensor:
        return self.decoder(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


ModelBuilder = Callable[[ModelConfig, int, int], SegmentationModel]


def available_models() -> list[str]:
    return MODELS.names()


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    return MODELS[cfg.name](cfg, in_channels, num_classes)


def _check_unet(cfg: Config) -> None:
    """Each U-Net level below the first halves the image (max-pooling, rounding down); below a
    1 x 1 bottleneck the pooling fails."""
    smallest = 2 ** (len(cfg.model.channels) - 1)
    if cfg.train.image_size < smallest:
        raise ConfigError(
            f"train.image_size={cfg.train.image_size} is too small for the {len(cfg.model.channels)}-level "
            f"model.channels: it must be at least {smallest} (each level halves it)"
        )


@MODELS.register("unet", resolve=_check_unet)
def _unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    encoder = UNetEncoder(in_channels, cfg.channels, cfg.dropout)
    return SegmentationModel(encoder, UNetDecoder(cfg.channels, num_classes))


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
