"""A segmentation backbone with vector-quantized features, as VQ-Seg builds it.

Chosen encoder levels (default: the deepest) pass through their own quantizer; the decoder sees
the quantized maps. Perturbation (QPM on code indices, or plain feature dropout for the paper's
comparison) is applied to the quantized maps only when the caller asks, i.e. on the student's
unlabelled pass. An optional reconstruction branch decodes the image from the post-VQ bottleneck
alone: with U-Net skips available it could copy the input from the first skip and learn nothing.

2D or 3D like the backbone: a 3D backbone (``models/unet3d.py``, its head a Conv3d) gets 3D
quantizer convs and reconstruction branch, and the codebook quantizes the tokens of its 3D
bottleneck; an encoder whose levels do not halve every axis (anisotropic pooling) lists each
level's per-axis factors as ``reconstruction_scales`` for the reconstruction branch to undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.config import ConfigError
from vqseg.models import SegmentationModel
from vqseg.models.pretrained import PretrainedEncoder
from vqseg.modules.foundation import note_once
from vqseg.modules.qpm import jump_stats
from vqseg.modules.vq import VectorQuantizer, VQOutput

Perturb = Callable[[Tensor, Tensor], Tensor]


@dataclass
class VQForward:
    logits: Tensor
    post_vq: Tensor  # the deepest quantized map (what PFA aligns and reconstruction decodes)
    vq_loss: Tensor
    perplexity: Tensor
    recon: Tensor | None = None
    codes: dict[str, VQOutput] = field(default_factory=dict)  # per quantized level, for monitoring


def _conv_and_norm(dims: int) -> tuple[type[nn.Module], type[nn.Module]]:
    """The convolution and batch norm of 2D or 3D maps."""
    if dims not in (2, 3):
        raise ValueError(f"only 2D and 3D maps are supported, got {dims} spatial axes")
    return (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)


class BottleneckDecoder(nn.Sequential):
    """Upsample + conv-BN-LeakyReLU per level, then a 3x3 (3x3x3) conv to the image channels (the
    caller resizes the output to the image).

    Each level upsamples x2 on every axis unless ``scales`` gives its per-axis factors (shallowest
    first, like ``channels``: ``scales[i]`` takes level i + 1 to level i), e.g. [1, 2, 2] where a
    3D encoder kept the depth.
    """

    def __init__(
        self, channels: list[int], out_channels: int, dims: int = 2, scales: list[list[int]] | None = None
    ) -> None:
        scales = scales or [[2] * dims] * (len(channels) - 1)
        if len(scales) != len(channels) - 1 or any(len(scale) != dims for scale in scales):
            raise ValueError(f"scales={scales}: give {len(channels) - 1} factors of {dims} axes, one per upsampling")
        conv, norm = _conv_and_norm(dims)
        mode = "bilinear" if dims == 2 else "trilinear"
        layers: list[nn.Module] = []
        rev = channels[::-1]
        for c_in, c_out, scale in zip(rev[:-1], rev[1:], scales[::-1]):
            layers += [
                nn.Upsample(scale_factor=tuple(scale), mode=mode, align_corners=False),
                conv(c_in, c_out, 3, padding=1),
                norm(c_out),
                nn.LeakyReLU(),
            ]
        layers.append(conv(channels[0], out_channels, 3, padding=1))
        super().__init__(*layers)


class FactorizedQuantizer(nn.Module):
    """Quantize in a ``code_dim``-wide space between two 1x1 convs (ViT-VQGAN's factorized codes).

    A 32-wide lookup makes the nearest-code search and QPM's distance rows 4-8x cheaper than in
    the 128-256 channels of a U-Net bottleneck at K = 16384, and ViT-VQGAN reports better codebook
    usage with it. ``code_dim`` = 0 quantizes the features directly, as the paper's ViT does.
    """

    def __init__(
        self,
        channels: int,
        code_dim: int,
        codebook_size: int,
        beta: float,
        cosine: bool,
        center: bool = False,
        dims: int = 2,
    ) -> None:
        super().__init__()
        width = code_dim or channels
        conv, norm = _conv_and_norm(dims)
        # ``center``: a frozen encoder's features share one dominant direction (LiteMedSAM's neck:
        # mean pairwise cosine 0.58 over ACDC tokens, 0.001 once centred), the tokens crowd onto few
        # codes and, with nothing before the lookup able to spread them, the codebook collapsed to
        # ~2 codes in training; standardising each channel first (running statistics at
        # evaluation) removes that direction (benchmarks/frozen_feature_direction.py).
        self.center = norm(channels, affine=False) if center else nn.Identity()
        self.down = conv(channels, width, 1) if code_dim else nn.Identity()
        self.up = conv(width, channels, 1) if code_dim else nn.Identity()
        self.vq = VectorQuantizer(width, codebook_size, beta, cosine=cosine)

    def forward(self, z: Tensor, perturb: Perturb | None = None) -> VQOutput:
        out = self.vq(self.down(self.center(z)), perturb=perturb)
        return out._replace(quantized=self.up(out.quantized))

    def usage(self) -> dict[str, float]:
        return self.vq.usage()

    def reset_usage(self) -> None:
        self.vq.reset_usage()


class VQSegNet(nn.Module):
    def __init__(
        self,
        base: SegmentationModel,
        in_channels: int,
        levels: list[int],
        codebook_size: int,
        beta: float,
        reconstruct: bool,
        cosine: bool = True,
        code_dim: int = 0,
        center: bool = False,
        pool: int = 1,
    ) -> None:
        super().__init__()
        self.base = base
        self.pool = pool
        channels = base.feature_channels
        depth = len(channels)
        if not all(-depth <= level < depth for level in levels):
            raise ConfigError(f"method.vq_levels={levels}: this backbone has levels 0..{depth - 1} (or -{depth}..-1)")
        self.levels = sorted({level % depth for level in levels})
        dims = len(base.head.kernel_size)  # the head is a Conv2d or Conv3d: one size per spatial axis
        self.quantizers = nn.ModuleDict({
            str(level): FactorizedQuantizer(channels[level], code_dim, codebook_size, beta, cosine, center, dims)
            for level in self.levels
        })
        self.recon_decoder = None
        if reconstruct:
            scales = getattr(base.encoder, "reconstruction_scales", None)  # None: x2 per axis and level
            self.recon_decoder = BottleneckDecoder(base.reconstruction_channels, in_channels, dims, scales)
        self._register_load_state_dict_pre_hook(self._quantizers_of_older_checkpoints)

    def _quantizers_of_older_checkpoints(self, state: dict, prefix: str, *_: object) -> None:
        """A pretrained backbone's image stem used to be its level 0, so an older checkpoint names
        the quantizer of level k ``quantizers.<k + 1>`` (its deepest: 4 where it is now 3)."""
        if not any(isinstance(m, PretrainedEncoder) for m in self.base.modules()):
            return
        own = prefix + "quantizers."
        if any(k.startswith(f"{own}{level}.") for k in state for level in self.levels):
            return
        renamed = {}
        for key in [k for k in state if k.startswith(own)]:
            index, rest = key[len(own):].split(".", 1)
            renamed[f"{own}{int(index) - 1}.{rest}"] = state.pop(key)
        if renamed:
            state.update(renamed)
            note_once("vqseg: an older VQ-Seg checkpoint counted the image stem as level 0; its quantizers "
                      "are read one level lower (same weights)")

    def run(
        self, x: Tensor, perturb: Perturb | None = None, dropout: float = 0.0, reconstruct: bool = False
    ) -> VQForward:
        features = self.base.encode(x)
        levels = list(features.levels)
        vq_loss, perplexity, post_vq = x.new_zeros(()), x.new_zeros(()), levels[-1]
        codes: dict[str, VQOutput] = {}
        for level in self.levels:
            z = levels[level]
            if any(side % self.pool for side in z.shape[2:]):
                raise ConfigError(f"method.vq_pool={self.pool} does not divide level {level}'s grid {tuple(z.shape[2:])}")
            coarse = _avg_pool(z, self.pool) if self.pool > 1 else z
            out = self.quantizers[str(level)](coarse, perturb=perturb)
            codes[str(level)] = out
            vq_loss = vq_loss + out.loss
            perplexity = perplexity + out.perplexity / len(self.levels)
            post_vq = out.quantized
            quantized = out.quantized
            if self.pool > 1:  # the quantized coarse map, plus the detail below its grid
                quantized = _nearest_up(quantized, self.pool) + (z - _nearest_up(coarse, self.pool))
            levels[level] = _channel_dropout(quantized, dropout) if dropout > 0 else quantized
        recon = None
        if reconstruct and self.recon_decoder is not None:
            mode = "bilinear" if x.dim() == 4 else "trilinear"
            recon = F.interpolate(self.recon_decoder(levels[-1]), size=x.shape[2:], mode=mode, align_corners=False)
        return VQForward(self.base.decode(features.with_levels(levels)), post_vq, vq_loss, perplexity, recon, codes)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x).logits

    def code_usage(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for name, quantizer in self.quantizers.items():
            for key, value in quantizer.usage().items():
                stats[f"vq{name}_{key}"] = value
            quantizer.reset_usage()
        return stats

    @torch.no_grad()
    def jump_stats(self, forward: VQForward) -> dict[str, float]:
        """What the perturbation of a pass did to each quantized level (see `qpm.jump_stats`); syncs."""
        stats: dict[str, float] = {}
        for name, out in forward.codes.items():
            codebook = self.quantizers[name].vq.codebook.detach()
            for key, value in jump_stats(out.indices, out.used_indices, codebook).items():
                stats[f"vq{name}_jump_{key}"] = value
        return stats


def _channel_dropout(x: Tensor, p: float) -> Tensor:
    """Drop whole channels of a 2D or 3D map (the paper's comparison perturbation), in any mode."""
    return (F.dropout2d if x.dim() == 4 else F.dropout3d)(x, p, training=True)


def _avg_pool(x: Tensor, factor: int) -> Tensor:
    """Average over factor^d blocks of a 2D or 3D map (``method.vq_pool``: the grid the codebook sits on)."""
    return (F.avg_pool3d if x.dim() == 5 else F.avg_pool2d)(x, factor)


def _nearest_up(x: Tensor, factor: int) -> Tensor:
    return F.interpolate(x, scale_factor=factor, mode="nearest")

