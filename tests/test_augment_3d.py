"""3D batched augmentation: the same Augmenter calls on N x C x D x H x W batches."""

from __future__ import annotations

import pytest
import torch

from vqseg.config import AugConfig
from vqseg.data.augment import Augmenter, mix
from vqseg.data.provenance import PROVENANCE_CHANNELS

pytestmark = pytest.mark.usefixtures("one_thread")

NO_GEOMETRY = dict(flip=False, rot90=False, rotate_deg=0.0, scale=[1.0, 1.0])
NO_INTENSITY = dict(contrast=[1.0, 1.0], gamma=[1.0, 1.0], noise_std=0.0, blur_prob=0.0)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)


def labels_3d(n: int, d: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 4, (n, d, h, w))


def test_neutral_ranges_are_the_identity():
    aug = Augmenter(AugConfig(**NO_GEOMETRY, **NO_INTENSITY))
    images, labels = torch.rand(3, 2, 5, 8, 7), labels_3d(3, 5, 8, 7)
    warped, warped_labels, theta = aug.geometric(images, labels)
    identity = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1).expand(3, 3, 4)
    assert torch.equal(theta, identity)
    torch.testing.assert_close(warped, images, atol=1e-6, rtol=0)
    assert torch.equal(warped_labels, labels)
    torch.testing.assert_close(aug.intensity(images), images)


def test_known_affine_moves_label_voxels_where_expected():
    """A shift by 2 slices along D and a 2x magnification in-plane, written in affine_grid's units."""
    labels = labels_3d(1, 6, 8, 8)
    shift = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 2 * 2 / 6]]])  # z_in = z_out + 2 slices
    shifted = Augmenter.warp_labels(labels, shift)
    assert torch.equal(shifted[0, :4], labels[0, 2:]) and not shifted[0, 4:].any()
    magnify = torch.tensor([[[0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.0, 0]]])
    zoomed = Augmenter.warp_labels(labels, magnify)
    # pixel centres: output index i samples input index i / 2 + 1.75, i.e. rows 2..5 each twice
    expected = labels[0][:, [2, 2, 3, 3, 4, 4, 5, 5]][:, :, [2, 2, 3, 3, 4, 4, 5, 5]]
    assert torch.equal(zoomed[0], expected)


def test_flips_mirror_the_axes_their_signs_say():
    aug = Augmenter(AugConfig(**{**NO_GEOMETRY, "flip": True}))
    labels = labels_3d(24, 4, 6, 5)
    _, warped, theta = aug.geometric(torch.rand(24, 1, 4, 6, 5), labels)
    signs = torch.diagonal(theta[:, :, :3], dim1=1, dim2=2)  # (x, y, z) = (W, H, D)
    assert set(signs.flatten().tolist()) == {-1.0, 1.0} and (signs < 0).any(0).all()  # every axis gets flipped
    for i in range(24):
        dims = [dim for dim, sign in zip((3, 2, 1), signs[i]) if sign < 0]
        assert torch.equal(warped[i], labels[i : i + 1].flip(dims)[0]), i


def test_in_plane_warps_agree_with_the_2d_path_slice_by_slice():
    """Anisotropic data rotate and zoom about the first axis only: each slice is warped by the 2D
    warp of the affine's x-y block."""
    aug = Augmenter(AugConfig(flip=False, rotate_deg=30.0, scale=[0.8, 1.2]), anisotropic=True)
    images = torch.rand(4, 1, 5, 12, 12)
    warped, _, theta = aug.geometric(images)
    assert not theta[:, :2, 2].any() and not theta[:, 2, :2].any()  # D is neither rotated nor mixed in
    assert torch.equal(theta[:, 2, 2], torch.ones(4))
    theta_2d = theta[:, :2][:, :, [0, 1, 3]]
    for d in range(5):
        torch.testing.assert_close(warped[:, :, d], Augmenter.warp(images[:, :, d], theta_2d), atol=1e-5, rtol=0)


@pytest.mark.parametrize("anisotropic", [False, True])
def test_affine_is_a_rotation_over_the_zoom_in_voxel_units(anisotropic):
    """On a non-cubic patch the matrix, taken back to voxel units, is a similarity (no shear)."""
    size = (6, 16, 12)
    aug = Augmenter(AugConfig(flip=True, rot90=True, rotate_deg=25.0, scale=[0.7, 1.4]), anisotropic=anisotropic)
    theta = aug.random_affine(200, CPU, size).double()
    assert theta.shape == (200, 3, 4) and not theta[:, :, 3].any()
    extent = torch.tensor([12.0, 16.0, 6.0], dtype=torch.float64)  # (x, y, z) = (W, H, D)
    voxels = theta[:, :, :3] * (extent[:, None] / extent[None, :])
    gram = voxels @ voxels.transpose(1, 2)
    inv_zoom_sq = gram[:, 0, 0]
    zoom = inv_zoom_sq.rsqrt()
    assert zoom.min() >= 0.7 - 1e-6 and zoom.max() <= 1.4 + 1e-6
    tilted = voxels[:, 2, :2].abs().amax(1) > 1e-6  # the D axis mixed with H or W
    if anisotropic:  # in-plane similarity, D only flipped
        assert not tilted.any() and torch.equal(voxels[:, 2, 2].abs(), torch.ones(200, dtype=torch.float64))
        gram = gram[:, :2, :2]
    else:
        assert tilted.all()
    eye = torch.eye(len(gram[0]), dtype=torch.float64)
    torch.testing.assert_close(gram, inv_zoom_sq[:, None, None] * eye, atol=1e-6, rtol=0)


def test_intensity_changes_image_channels_only_and_keeps_shapes():
    aug = Augmenter(AugConfig(noise_std=0.1, gamma=[1.5, 1.5], blur_prob=1.0), image_channels=1)
    images = torch.rand(3, 1 + PROVENANCE_CHANNELS, 4, 10, 9)
    out = aug.intensity(images)
    assert out.shape == images.shape and torch.equal(out[:, 1:], images[:, 1:])
    assert (out[:, :1] - images[:, :1]).abs().max() > 0.05 and out.min() >= 0 and out.max() <= 1


def test_contrast_and_gamma_use_the_sample_mean_over_every_voxel():
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "contrast": [2.0, 2.0], "gamma": [0.5, 0.5]}))
    images = torch.rand(2, 2, 3, 6, 5)
    mean = images.mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(aug.intensity(images), ((images - mean) * 2 + mean).clamp(0, 1) ** 0.5)


def test_3d_blur_is_the_2d_blur_of_every_slice():
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "blur_prob": 1.0, "blur_sigma": [1.2, 1.2]}))
    images = torch.rand(2, 1, 3, 12, 11)
    per_slice = torch.stack([aug.intensity(images[:, :, d]) for d in range(3)], dim=2)
    torch.testing.assert_close(aug.intensity(images), per_slice, atol=1e-6, rtol=0)


def test_noise_is_drawn_per_sample_on_volumes():
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "noise_std": 0.1}))
    images = torch.full((32, 1, 4, 16, 16), 0.5)
    levels = (aug.intensity(images) - images).flatten(1).std(1)
    assert levels.max() < 0.11 and levels.min() < 0.03 and levels.max() > 0.07


def test_cutmix_boxes_in_3d_have_the_drawn_volume():
    aug = Augmenter(AugConfig(cutmix_prob=1.0))
    n, size = 200, (16, 32, 24)
    mask = aug.cutmix_mask(n, size, CPU)
    assert mask.shape == (n, *size) and mask.dtype == torch.bool
    volume = mask.flatten(1).float().mean(1)
    assert (volume > 0.01).all() and (volume < 0.45).all(), (volume.min(), volume.max())
    assert volume.min() < 0.06 and volume.max() > 0.25
    d, h, w = mask.any(3).any(2), mask.any(3).any(1), mask.any(2).any(1)
    assert torch.equal(mask, d[:, :, None, None] & h[:, None, :, None] & w[:, None, None, :])  # one box each
    assert not Augmenter(AugConfig(cutmix_prob=0.0)).cutmix_mask(10, size, CPU).any()


def test_cutmix_boxes_on_a_thin_patch_keep_their_volume():
    """Sides are fractions of each axis, so 4 slices do not cut every box down to 4 voxels deep."""
    mask = Augmenter(AugConfig(cutmix_prob=1.0)).cutmix_mask(300, (4, 64, 64), CPU)
    assert mask.flatten(1).float().mean(1).mean() > 0.12


def test_geometric_and_mix_keep_5d_shapes():
    aug = Augmenter(AugConfig(cutmix_prob=1.0))
    images, labels = torch.rand(3, 2, 4, 10, 8), labels_3d(3, 4, 10, 8)
    warped, warped_labels, theta = aug.geometric(images, labels)
    assert warped.shape == images.shape and warped_labels.shape == labels.shape and theta.shape == (3, 3, 4)
    box = aug.cutmix_mask(3, tuple(images.shape[-3:]), CPU)
    mixed = mix(box, warped.flip(0), warped)
    assert mixed.shape == images.shape
    inside = box[:, None].expand_as(mixed)  # the D x H x W box, over every channel
    assert torch.equal(mixed[inside], warped.flip(0)[inside]) and torch.equal(mixed[~inside], warped[~inside])
