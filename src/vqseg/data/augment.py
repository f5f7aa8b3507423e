"""Batched augmentation on the model's device, with independent random parameters per sample.

Geometry (flip, rot90, rotation, scale) is one affine warp per sample so images, labels and any
aligned feature map (cached foundation-model features) can be warped by the same matrix.
Intensity changes (contrast, gamma, blur, noise) and CutMix make the strong view. Inputs may carry
provenance channels after the image channels (frozen pretrained encoders, ``provenance.py``):
warps and CutMix move them with the pixels, intensity changes leave them alone.

The same calls take 2D batches (N x C x H x W, labels N x H x W) and 3D ones (N x C x D x H x W,
labels N x D x H x W; D the slice axis): the input's dimensionality picks the path. In 3D, as in
nnU-Net, rotation and scaling act on every axis, or only in-plane for anisotropic data (thick
slices), flips are along every axis, and blur is in-plane.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import kornia
import torch
from torch import Tensor
from torch.nn import functional as F

from vqseg.config import AugConfig
from vqseg.data.provenance import on_image


def _uniform(n: int, bounds: list[float], device: torch.device) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, device=device)


def _plane_rotation(angle: Tensor, i: int, j: int) -> Tensor:
    """n x 3 x 3 rotations by ``angle`` in the plane of coordinates i and j."""
    rotation = torch.eye(3, device=angle.device).repeat(len(angle), 1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation[:, i, i], rotation[:, i, j], rotation[:, j, i], rotation[:, j, j] = cos, -sin, sin, cos
    return rotation


class Augmenter:
    def __init__(self, cfg: AugConfig, image_channels: int | None = None, anisotropic: bool = False) -> None:
        """``image_channels``: how many leading channels are image (None: all of them); ``anisotropic``:
        3D data with thick slices (the plan's flag), rotated and zoomed in-plane only."""
        self.cfg = cfg
        self.image_channels = image_channels
        self.anisotropic = anisotropic

    def random_affine(self, n: int, device: torch.device, size: Sequence[int] | None = None) -> Tensor:
        """n x 2 x 3 matrices for ``affine_grid`` mapping output to input coordinates; for a 3D ``size``
        (D, H, W), n x 3 x 4 ones (:meth:`random_affine_3d`)."""
        if size is not None and len(size) == 3:
            return self.random_affine_3d(n, device, size)
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

    def random_affine_3d(self, n: int, device: torch.device, size: Sequence[int]) -> Tensor:
        """n x 3 x 4 matrices for a D x H x W patch: R_D(in-plane: quarter turns, if ``rot90``, plus
        +-rotate_deg) R_H R_W (+-rotate_deg each) diag(flips) / zoom, built in voxel units and expressed
        in ``affine_grid``'s per-axis [-1, 1] coordinates, so a rotation stays a rotation on a non-cubic
        patch. Anisotropic data are rotated and zoomed in-plane only (nnU-Net's "dummy 2D"
        augmentation: thick slices are not interpolated between), flipped along every axis.
        Coordinates are (x, y, z) = (W, H, D), as ``affine_grid``'s."""
        c = self.cfg
        angles = torch.zeros(n, 3, device=device)  # about D (the x-y plane), about H (x-z), about W (y-z)
        if c.rot90:
            angles[:, 0] += (math.pi / 2) * torch.randint(0, 4, (n,), device=device)
        if c.rotate_deg > 0:
            for axis in range(1 if self.anisotropic else 3):
                angles[:, axis] += torch.deg2rad(_uniform(n, [-c.rotate_deg, c.rotate_deg], device))
        zoom = _uniform(n, c.scale, device)[:, None].repeat(1, 3)
        if self.anisotropic:
            zoom[:, 2] = 1.0
        flips = torch.ones(n, 3, device=device)
        if c.flip:
            flips = torch.where(torch.rand(n, 3, device=device) < 0.5, -1.0, 1.0)
        voxels = (
            _plane_rotation(angles[:, 0], 0, 1) @ _plane_rotation(angles[:, 1], 0, 2) @ _plane_rotation(angles[:, 2], 1, 2)
        ) * (flips / zoom)[:, None, :]
        extent = torch.tensor([float(s) for s in reversed(size)], device=device)
        # affine_grid's coordinates are u = 2 p / extent per axis: theta = diag(2 / extent) A diag(extent / 2)
        linear = voxels * (extent[None, :] / extent[:, None])
        return torch.cat([linear, torch.zeros(n, 3, 1, device=device)], dim=2)

    @staticmethod
    def warp(x: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
        """Warp images (bilinear), soft maps or features; labels go through :meth:`warp_labels`."""
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)

    @classmethod
    def warp_labels(cls, labels: Tensor, theta: Tensor) -> Tensor:
        return cls.warp(labels[:, None].float(), theta, mode="nearest")[:, 0].round().long()

    def geometric(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        theta = self.random_affine(images.shape[0], images.device, images.shape[2:])
        warped_labels = None if labels is None else self.warp_labels(labels, theta)
        return self.warp(images, theta), warped_labels, theta

    def intensity(self, images: Tensor) -> Tensor:
        """Contrast and gamma, Gaussian blur with a random sigma per sample, additive noise (image channels only)."""
        return on_image(images, self.image_channels, self._intensity)

    def photometric_copy(self, images: Tensor, copy: int) -> Tensor:
        """Copy number ``copy`` of every image under :meth:`intensity`, its parameters drawn from a
        generator seeded by the image's content and ``copy``: a slice gets the same copies in every
        run, split and seed, so the content-keyed feature cache keeps serving their encodings."""
        out = torch.empty_like(images)
        for i, image in enumerate(images):
            seed = zlib.crc32(image.detach().cpu().float().numpy().tobytes()) * 1009 + copy
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out[i] = self.intensity(image[None].cpu())[0].to(out)
        return out

    def _intensity(self, images: Tensor) -> Tensor:
        c = self.cfg
        n, device = images.shape[0], images.device
        shape = (n,) + (1,) * (images.dim() - 1)
        mean = images.mean(dim=tuple(range(1, images.dim())), keepdim=True)
        x = (images - mean) * _uniform(n, c.contrast, device).view(shape) + mean
        x = x.clamp(0, 1) ** _uniform(n, c.gamma, device).view(shape)
        if c.blur_prob > 0:
            blurred = _blur_in_plane(x, _uniform(n, c.blur_sigma, device))
            x = torch.where((torch.rand(n, device=device) < c.blur_prob).view(shape), blurred, x)
        if c.noise_std > 0:
            x = x + c.noise_std * torch.rand(shape, device=device) * torch.randn_like(x)
        return x.clamp(0, 1)

    def cutmix_mask(self, n: int, size: Sequence[int], device: torch.device) -> Tensor:
        """n x *size boolean boxes, empty for samples not mixed. 2D (H, W): area 2-40 %, aspect ratio
        log-uniform in [0.3, 1 / 0.3] in pixels, as UniMatch. 3D (D, H, W): volume 2-40 %, each side
        the cube root of that share of its axis times a log-uniform factor in [0.3, 1 / 0.3] (the three
        normalised to a product of one), so an anisotropic patch gets boxes of the drawn volume too."""
        share = _uniform(n, [0.02, 0.4], device)
        log_ratio = [math.log(0.3), math.log(1 / 0.3)]
        if len(size) == 2:
            h, w = size
            area = share * h * w
            ratio = torch.exp(_uniform(n, log_ratio, device))
            sides = [torch.sqrt(area * ratio).clamp(max=h), torch.sqrt(area / ratio).clamp(max=w)]
        else:
            factor = torch.exp(_uniform(n * 3, log_ratio, device)).view(n, 3)
            factor = factor / factor.prod(dim=1, keepdim=True) ** (1 / 3)
            sides = [(share ** (1 / 3) * factor[:, a] * s).clamp(max=s) for a, s in enumerate(size)]
        per_sample = (n,) + (1,) * len(size)
        box = torch.ones(n, *size, dtype=torch.bool, device=device)
        for axis, (s, side) in enumerate(zip(size, sides)):
            start = torch.rand(n, device=device) * (s - side)
            at = torch.arange(s, device=device).view([1] * (axis + 1) + [s] + [1] * (len(size) - axis - 1))
            box = box & (at >= start.view(per_sample)) & (at < (start + side).view(per_sample))
        active = torch.rand(n, device=device) < self.cfg.cutmix_prob
        return box & active.view(per_sample)


def _blur_in_plane(x: Tensor, sigma: Tensor) -> Tensor:
    """7 x 7 Gaussian blur with a sigma per sample over H and W; a 3D batch slice by slice (nnU-Net
    blurs anisotropic data in-plane; thick slices have nothing to blur across)."""
    if x.dim() == 4:
        return kornia.filters.gaussian_blur2d(x, (7, 7), sigma[:, None].expand(len(x), 2).contiguous())
    n, c, d, h, w = x.shape
    slices = x.transpose(1, 2).reshape(n * d, c, h, w)
    blurred = _blur_in_plane(slices, sigma.repeat_interleave(d))
    return blurred.view(n, d, c, h, w).transpose(1, 2)


def mix(mask: Tensor, inside: Tensor, outside: Tensor) -> Tensor:
    """Paste ``inside`` where ``mask`` holds; broadcasts the N x *spatial mask over channels."""
    m = mask if inside.dim() == mask.dim() else mask[:, None]
    return torch.where(m, inside, outside)
