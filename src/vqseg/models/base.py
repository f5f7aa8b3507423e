"""What every segmentation network is made of (as in segmentation_models_pytorch): an encoder that
returns its levels, a decoder that turns them into a feature map at the input's resolution, and a
segmentation head that turns that map into class logits.

Methods rely only on ``encode``, ``decode`` and ``feature_channels``: they perturb, quantize or tap
the levels between the two (UniMatch's feature dropout, VQ-Seg's codebook, PDCR), so only encoder
levels are counted there. A pretrained encoder's full-resolution image stem is not a level: it is
carried beside them in :class:`Features` for the decoder alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class Features:
    """An encoder's output: its levels, shallowest first (the deepest last), and an image stem's
    full-resolution map for the decoder when the encoder has one (not a level)."""

    levels: list[Tensor]
    stem: Tensor | None = None

    def with_levels(self, levels: list[Tensor]) -> Features:
        """The same stem with other (perturbed, quantized) levels."""
        return Features(list(levels), self.stem)

    def rows(self, index: slice) -> Features:
        """The features of some images of the batch."""
        return Features([level[index] for level in self.levels], None if self.stem is None else self.stem[index])


class LevelEncoder(nn.Module):
    """A U-Net encoder: ``stem`` at full resolution, then each of ``downs`` halves (or pools) the
    previous level; every output is a level (its skip), the first included."""

    stem: nn.Module
    downs: nn.ModuleList

    def forward(self, x: Tensor) -> Features:
        levels = [self.stem(x)]
        for down in self.downs:
            levels.append(down(levels[-1]))
        return Features(levels)


class SegmentationHead(nn.Conv2d):
    """The classifier: one convolution from the decoder's map to class logits."""

    def __init__(self, in_channels: int, num_classes: int, kernel_size: int = 1) -> None:
        super().__init__(in_channels, num_classes, kernel_size, padding=kernel_size // 2)


class SegmentationModel(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self._register_load_state_dict_pre_hook(_head_of_older_checkpoints)

    @property
    def feature_channels(self) -> list[int]:
        """Widths of the encoder's levels, shallowest first."""
        return self.encoder.out_channels

    @property
    def reconstruction_channels(self) -> list[int]:
        """Widths of a x2-per-stage decoder from the deepest map back up (VQ-Seg's reconstruction
        branch, shallowest first): the encoder's, or fewer where it stops short of full resolution."""
        return self.encoder.reconstruction_channels

    def encode(self, x: Tensor) -> Features:
        return self.encoder(x)

    def decode(self, features: Features) -> Tensor:
        """Class logits at the input's resolution."""
        return self.head(self.decoder(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _head_of_older_checkpoints(state: dict, prefix: str, *_: object) -> None:
    """Checkpoints written before the head was its own module kept it as ``decoder.head``."""
    for key in [k for k in state if k.startswith(prefix + "decoder.head.")]:
        state[prefix + "head." + key[len(prefix + "decoder.head."):]] = state.pop(key)
