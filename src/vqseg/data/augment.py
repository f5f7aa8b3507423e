"""Batched augmentation on the model's device, with independent random parameters per sample.

Geometry (flip, rot90, rotation, scale) is one affine warp per sample so images, labels and any
aligned feature map (cached foundation-model features) can be warped by the same matrix.
Intensity changes (contrast, gamma, blur, noise) and CutMix make the strong view. Inputs may carry
provenance channels after the image channels (frozen pretrained encoders, ``provenance.py``):
warps and CutMix move them with the pixels, intensity changes leave them alone.
"""

from __future__ import annotations

import math

import kornia
import torch
from torch import Tensor
from torch.nn import functional as F

from vqseg.config import AugConfig
from vqseg.data.provenance import on_image


def _uniform(n: int, bounds: list[float], device: torch.device) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, device=device)


class Augmenter:
    def __init__(self, cfg: AugConfig, image_channels: int | None = None) -> None:
        """``image_channels``: how many leading channels are image (None: all of them)."""
        self.cfg = cfg
        self.image_channels = image_channels

    def random_affine(self, n: int, device: torch.device) -> Tensor:
        """n x 2 x 3 matrices for ``affine_grid`` mapping output to input coordinates."""
        c = self.cfg
        angle = torch.zeros(n, device=device)
        if c.rot90:
            angle = angle + (math.pi / 2) * torch.randint(0, 4, (n,), device=device)
        if c.rotate_deg > 0:
            angle = angle + torch.deg2rad(_uniform(n, [-c.rotate_deg, c.rotate_deg], device))
        zoom = _uniform(n, c.scale, device)
        flip = torch.ones(n, device=device)
        if c.flip:
            flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = cos * flip
        theta[:, 0, 1] = -sin
        theta[:, 1, 0] = sin * flip
        theta[:, 1, 1] = cos
        return theta

    @staticmethod
    def warp(x: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
        """Warp images (bilinear), soft maps or features; labels go through :meth:`warp_labels`."""
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)

    @classmethod
    def warp_labels(cls, labels: Tensor, theta: Tensor) -> Tensor:
        return cls.warp(labels[:, None].float(), theta, mode="nearest")[:, 0].round().long()

    def geometric(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        theta = self.random_affine(images.shape[0], images.device)
        warped_labels = None if labels is None else self.warp_labels(labels, theta)
        return self.warp(images, theta), warped_labels, theta

    def intensity(self, images: Tensor) -> Tensor:
        """Contrast and gamma, Gaussian blur with a random sigma per sample, additive noise (image channels only)."""
        return on_image(images, self.image_channels, self._intensity)

    def _intensity(self, images: Tensor) -> Tensor:
        c = self.cfg
        n, device = images.shape[0], images.device
        shape = (n, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        x = (images - mean) * _uniform(n, c.contrast, device).view(shape) + mean
        x = x.clamp(0, 1) ** _uniform(n, c.gamma, device).view(shape)
        if c.blur_prob > 0:
            sigma = _uniform(n, c.blur_sigma, device)
            blurred = kornia.filters.gaussian_blur2d(x, (7, 7), sigma[:, None].expand(n, 2).contiguous())
            x = torch.where((torch.rand(n, device=device) < c.blur_prob).view(shape), blurred, x)
        if c.noise_std > 0:
            x = x + c.noise_std * torch.rand(shape, device=device) * torch.randn_like(x)
        return x.clamp(0, 1)

    def cutmix_mask(self, n: int, size: tuple[int, int], device: torch.device) -> Tensor:
        """n x H x W boolean boxes (area 2-40 %, as UniMatch), empty for samples not mixed."""
        h, w = size
        area = _uniform(n, [0.02, 0.4], device) * h * w
        ratio = torch.exp(_uniform(n, [math.log(0.3), math.log(1 / 0.3)], device))
        bh = torch.sqrt(area * ratio).clamp(max=h)
        bw = torch.sqrt(area / ratio).clamp(max=w)
        y0 = torch.rand(n, device=device) * (h - bh)
        x0 = torch.rand(n, device=device) * (w - bw)
        ys = torch.arange(h, device=device).view(1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, w)
        box = (
            (ys >= y0.view(n, 1, 1)) & (ys < (y0 + bh).view(n, 1, 1))
            & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + bw).view(n, 1, 1))
        )
        active = torch.rand(n, device=device) < self.cfg.cutmix_prob
        return box & active.view(n, 1, 1)


def mix(mask: Tensor, inside: Tensor, outside: Tensor) -> Tensor:
    """Paste ``inside`` where ``mask`` holds; broadcasts the N x H x W mask over channels."""
    m = mask if inside.dim() == mask.dim() else mask[:, None]
    return torch.where(m, inside, outside)
