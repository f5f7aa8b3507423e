"""Batched augmentation: exact geometry, label safety, per-sample randomness, CutMix and mixing."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from vqseg.config import AugConfig
from vqseg.data.augment import Augmenter, mix
from vqseg.methods.base import UnlabeledViews, make_unlabeled_views

pytestmark = pytest.mark.usefixtures("one_thread")

NO_GEOMETRY = dict(flip=False, rot90=False, rotate_deg=0.0, scale=[1.0, 1.0])
NO_INTENSITY = dict(contrast=[1.0, 1.0], gamma=[1.0, 1.0], noise_std=0.0, blur_prob=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def random_labels(n: int, h: int, w: int, classes: int = 4) -> torch.Tensor:
    return torch.randint(0, classes, (n, h, w))


def normalized_centres(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1] as ``affine_grid(align_corners=False)`` uses them."""
    ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    return torch.meshgrid(ys, xs, indexing="ij")


def coordinate_map(n: int, h: int, w: int) -> torch.Tensor:
    """n x 2 x h x w feature map holding each pixel's own normalized (x, y)."""
    yy, xx = normalized_centres(h, w)
    return torch.stack([xx, yy]).float().expand(n, 2, h, w).contiguous()


def test_no_geometry_is_the_identity():
    aug = Augmenter(AugConfig(**NO_GEOMETRY))
    images = torch.rand(5, 2, 12, 10)
    labels = random_labels(5, 12, 10)
    warped, warped_labels, theta = aug.geometric(images, labels)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(5, 2, 3)
    torch.testing.assert_close(theta, identity)
    torch.testing.assert_close(warped, images, atol=1e-6, rtol=0)
    assert torch.equal(warped_labels, labels)


def test_geometric_without_labels_returns_none():
    aug = Augmenter(AugConfig())
    warped, labels, theta = aug.geometric(torch.rand(3, 1, 8, 8))
    assert labels is None and warped.shape == (3, 1, 8, 8) and theta.shape == (3, 2, 3)


@pytest.mark.parametrize("size", [8, 9])
def test_rot90_only_matches_torch_rot90(size):
    aug = Augmenter(AugConfig(**{**NO_GEOMETRY, "rot90": True}))
    n = 32
    labels = random_labels(n, size, size)
    images = torch.rand(n, 1, size, size)
    warped, warped_labels, theta = aug.geometric(images, labels)
    ks = torch.round(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]) / (math.pi / 2)).long() % 4
    assert set(ks.tolist()) == {0, 1, 2, 3}  # seeded: every quarter turn is drawn
    for i in range(n):
        k = int(ks[i])
        assert torch.equal(warped_labels[i], torch.rot90(labels[i], k, dims=(-2, -1))), f"sample {i}, k={k}"
        torch.testing.assert_close(warped[i], torch.rot90(images[i], k, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_flip_only_mirrors_columns():
    aug = Augmenter(AugConfig(**{**NO_GEOMETRY, "flip": True}))
    labels = random_labels(16, 6, 7)
    _, warped, theta = aug.geometric(torch.rand(16, 1, 6, 7), labels)
    flipped = theta[:, 0, 0] < 0
    assert 0 < int(flipped.sum()) < 16
    for i in range(16):
        expected = labels[i].flip(-1) if flipped[i] else labels[i]
        assert torch.equal(warped[i], expected)


def test_labels_stay_integer_and_within_classes():
    aug = Augmenter(AugConfig(rotate_deg=40.0, scale=[0.6, 1.4]))
    labels = random_labels(8, 16, 16) * 3  # values {0, 3, 6, 9}: interpolation would create others
    _, warped, _ = aug.geometric(torch.rand(8, 1, 16, 16), labels)
    assert warped.dtype == torch.long and warped.shape == labels.shape
    assert set(warped.unique().tolist()) <= {0, 3, 6, 9}
    # zoomed-out samples show the zero padding as background
    assert (warped == 0).sum() > (labels == 0).sum()


def test_per_sample_parameters_differ_within_a_batch():
    aug = Augmenter(AugConfig())
    n = 8
    theta = aug.random_affine(n, torch.device("cpu"))
    flat = theta.reshape(n, -1)
    assert torch.cdist(flat, flat).add(torch.eye(n)).min() > 1e-4  # no two samples share a warp
    same = torch.rand(1, 1, 16, 16).expand(n, 1, 16, 16).contiguous()
    strong = aug.intensity(same)
    diffs = (strong[:, None] - strong[None]).abs().flatten(2).amax(-1) + torch.eye(n)
    assert diffs.min() > 1e-3  # contrast / gamma / noise are drawn per sample


def sampled_positions(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """n x 2 x h x w: the normalized input (x, y) that each output pixel centre samples under theta."""
    yy, xx = normalized_centres(h, w)
    grid = torch.stack([xx, yy, torch.ones_like(xx)])
    return torch.einsum("nij,jhw->nihw", theta.double(), grid)


def test_warp_of_coordinate_map_is_the_affine_map():
    """A feature map warped with theta holds, at each output pixel, the input position theta maps it to."""
    aug = Augmenter(AugConfig(rotate_deg=30.0, scale=[0.8, 1.2]))
    n, h, w = 6, 20, 16
    theta = aug.random_affine(n, torch.device("cpu"))
    warped = Augmenter.warp(coordinate_map(n, h, w), theta)
    expected = sampled_positions(theta, h, w)
    # bilinear interpolation of a linear function is exact wherever no zero padding is sampled
    inside = (expected.abs() < 1 - 2.0 / min(h, w)).all(dim=1, keepdim=True).expand_as(warped)
    assert inside.float().mean() > 0.3
    torch.testing.assert_close(warped[inside].double(), expected[inside], atol=1e-5, rtol=0)


def test_warp_is_consistent_between_images_labels_and_coarse_features():
    aug = Augmenter(AugConfig(rotate_deg=25.0, scale=[0.9, 1.1]))
    n, h, w = 4, 16, 16
    index = torch.arange(h * w).view(1, h, w).expand(n, h, w).contiguous()  # label = pixel index
    images = index[:, None].float()
    warped_images, warped_index, theta = aug.geometric(images, index)
    coords = Augmenter.warp(coordinate_map(n, h, w), theta)  # an aligned feature map, same theta
    interior = (sampled_positions(theta, h, w).abs() < 1 - 2.0 / h).all(dim=1)
    assert interior.float().mean() > 0.3
    # a label lands where the warped coordinate map says it came from (nearest pixel)
    col = torch.floor((coords[:, 0] + 1) * w / 2).long()
    row = torch.floor((coords[:, 1] + 1) * h / 2).long()
    assert torch.equal(warped_index[interior], (row * w + col)[interior])
    # images: bilinear of a linear ramp equals the ramp at the sampled position
    x_in = (coords[:, 0] + 1) * w / 2 - 0.5
    y_in = (coords[:, 1] + 1) * h / 2 - 0.5
    torch.testing.assert_close(warped_images[:, 0][interior], (y_in * w + x_in)[interior], atol=1e-3, rtol=0)
    # the same theta on a 2x coarser feature map gives the 2x2 average of the fine warp
    coarse = Augmenter.warp(coordinate_map(n, h // 2, w // 2), theta)
    pooled = F.avg_pool2d(coords, 2)
    interior_coarse = (sampled_positions(theta, h // 2, w // 2).abs() < 1 - 4.0 / h).all(dim=1)
    assert interior_coarse.float().mean() > 0.2
    mask = interior_coarse[:, None].expand_as(coarse)
    torch.testing.assert_close(coarse[mask], pooled[mask], atol=1e-5, rtol=0)


def test_intensity_range_and_shape():
    aug = Augmenter(AugConfig(noise_std=0.2, blur_prob=1.0))
    images = torch.rand(6, 3, 12, 10)
    out = aug.intensity(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().max() > 0.05


def test_intensity_with_neutral_settings_is_the_identity():
    aug = Augmenter(AugConfig(**NO_INTENSITY))
    images = torch.rand(4, 1, 9, 9)
    torch.testing.assert_close(aug.intensity(images), images)


def test_blur_smooths():
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "blur_prob": 1.0, "blur_sigma": [1.0, 1.5]}))
    images = (torch.rand(4, 1, 16, 16) > 0.5).float()
    out = aug.intensity(images)
    assert out.std() < 0.6 * images.std()
    torch.testing.assert_close(out.mean(), images.mean(), atol=0.05, rtol=0)


def _box_fractions(mask: torch.Tensor) -> torch.Tensor:
    return mask.flatten(1).float().mean(1)


def test_cutmix_masks_are_boxes_of_the_expected_area():
    aug = Augmenter(AugConfig(cutmix_prob=1.0))
    n, h, w = 200, 64, 64
    mask = aug.cutmix_mask(n, (h, w), torch.device("cpu"))
    assert mask.shape == (n, h, w) and mask.dtype == torch.bool
    area = _box_fractions(mask)
    assert (area > 0.01).all() and (area < 0.45).all(), (area.min(), area.max())
    assert area.min() < 0.06 and area.max() > 0.25  # the whole 2-40 % range is used
    rows, cols = mask.any(2), mask.any(1)
    assert torch.equal(mask, rows[:, :, None] & cols[:, None, :])  # each mask is one rectangle
    assert len({tuple(m.nonzero()[0].tolist()) for m in mask}) > n // 2  # boxes move around


def test_cutmix_prob_zero_gives_empty_masks():
    aug = Augmenter(AugConfig(cutmix_prob=0.0))
    assert not aug.cutmix_mask(50, (32, 32), torch.device("cpu")).any()


def test_cutmix_prob_half_mixes_about_half():
    aug = Augmenter(AugConfig(cutmix_prob=0.5))
    active = aug.cutmix_mask(400, (16, 16), torch.device("cpu")).flatten(1).any(1).float().mean()
    assert 0.4 < active < 0.6


def test_mix_semantics():
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 0, :] = True
    mask[1, :, 2] = True
    inside = torch.full((2, 4, 3, 3), 7.0)
    outside = torch.zeros(2, 4, 3, 3)
    images = mix(mask, inside, outside)  # N x H x W mask broadcast over channels
    assert images.shape == (2, 4, 3, 3)
    assert torch.equal(images == 7.0, mask[:, None].expand(2, 4, 3, 3))
    labels = mix(mask, torch.ones(2, 3, 3, dtype=torch.long), torch.zeros(2, 3, 3, dtype=torch.long))
    assert torch.equal(labels.bool(), mask)


def test_unlabeled_views_mix_takes_the_box_from_the_permuted_sample():
    box = torch.zeros(3, 2, 2, dtype=torch.bool)
    box[0, 0, 0] = True
    target = torch.arange(3).view(3, 1, 1).expand(3, 2, 2).clone()
    views = UnlabeledViews(weak=None, strong=None, theta=None, box=box, perm=torch.tensor([2, 0, 1]))
    mixed = views.mix(target)
    assert mixed[0, 0, 0] == 2 and (mixed[0].flatten()[1:] == 0).all()
    assert torch.equal(mixed[1:], target[1:])


def test_make_unlabeled_views_without_cutmix():
    aug = Augmenter(AugConfig(cutmix_prob=1.0))
    images = torch.rand(4, 1, 16, 16)
    views = make_unlabeled_views(aug, images, cutmix=False)
    assert not views.box.any()
    assert views.weak.shape == views.strong.shape == images.shape
    assert views.strong.min() >= 0 and views.strong.max() <= 1
    with_mix = make_unlabeled_views(aug, images, cutmix=True)
    assert with_mix.box.flatten(1).any(1).all()


class RecordingAugmenter(Augmenter):
    """Keeps every intensity draw, so a view can be rebuilt from its parts."""

    def __init__(self, cfg: AugConfig) -> None:
        super().__init__(cfg)
        self.intensity_calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def intensity(self, images: torch.Tensor) -> torch.Tensor:
        out = super().intensity(images)
        self.intensity_calls.append((images, out))
        return out


def test_geometric_warps_labels_with_the_images_affine():
    aug = Augmenter(AugConfig())
    images = torch.rand(6, 1, 16, 16)
    labels = random_labels(6, 16, 16)
    warped, warped_labels, theta = aug.geometric(images, labels)
    assert torch.equal(warped, Augmenter.warp(images, theta))
    assert torch.equal(warped_labels, Augmenter.warp_labels(labels, theta))
    assert not torch.equal(warped_labels, labels)  # a warp that skipped the labels would fail above


def test_weak_view_is_geometry_only_and_strong_view_is_its_mixed_intensity_draw():
    """weak = warp(u); strong = CutMix(box, I(weak)[perm], I(weak)) with I the intensity draw."""
    aug = RecordingAugmenter(AugConfig(cutmix_prob=1.0))
    images = torch.rand(4, 1, 16, 16)
    torch.manual_seed(5)
    views = make_unlabeled_views(aug, images)
    torch.manual_seed(5)
    assert torch.equal(views.weak, aug.geometric(images)[0])
    assert torch.equal(views.weak, Augmenter.warp(images, views.theta))
    (source, strong), = aug.intensity_calls
    assert source is views.weak and not torch.equal(strong, views.weak)
    assert views.box.flatten(1).any(1).all() and sorted(views.perm.tolist()) == [0, 1, 2, 3]
    assert torch.equal(views.strong, torch.where(views.box[:, None], strong[views.perm], strong))
    # The pseudo-labels follow the same box and partner as the image.
    target = torch.arange(4).view(4, 1, 1).expand(4, 16, 16)
    assert torch.equal(views.mix(target), torch.where(views.box, views.perm.view(4, 1, 1), target))


# ---------------------------------------------------------------------------------------------
# Recipe: each draw of the geometric and intensity augmentation, stated from first principles
# ---------------------------------------------------------------------------------------------


def test_affine_is_flip_then_rotation_divided_by_the_zoom():
    """theta[:, :, :2] = R(angle) @ diag(flip, 1) / zoom, no translation: a similarity per sample."""
    aug = Augmenter(AugConfig(flip=True, rot90=True, rotate_deg=30.0, scale=[0.5, 2.0]))
    theta = aug.random_affine(400, torch.device("cpu")).double()
    linear = theta[:, :, :2]
    assert not theta[:, :, 2].any()
    gram = linear @ linear.transpose(1, 2)
    inv_zoom_sq = gram[:, 0, 0]
    torch.testing.assert_close(gram, inv_zoom_sq[:, None, None] * torch.eye(2, dtype=torch.float64).expand(400, 2, 2))
    zoom = inv_zoom_sq.rsqrt()
    assert zoom.min() >= 0.5 - 1e-6 and zoom.max() <= 2.0 + 1e-6 and zoom.min() < 0.6 and zoom.max() > 1.8
    flip = torch.sign(torch.linalg.det(linear))
    assert 0.4 < (flip < 0).double().mean() < 0.6  # a mirror in half of the samples
    # the second column is the rotation's: (-sin, cos) / zoom, whatever the flip
    torch.testing.assert_close(linear[:, 0, 1] ** 2 + linear[:, 1, 1] ** 2, inv_zoom_sq)


def test_rotation_angle_is_symmetric_and_scale_magnifies():
    aug = Augmenter(AugConfig(**{**NO_GEOMETRY, "rotate_deg": 20.0}))
    theta = aug.random_affine(300, torch.device("cpu"))
    angle = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    torch.testing.assert_close(theta[:, 0, 1], -theta[:, 1, 0])
    assert angle.abs().max() <= 20.0 + 1e-4 and angle.min() < -15.0 and angle.max() > 15.0
    assert abs(angle.mean()) < 3.0
    # scale s: the output shows the input magnified s times (theta maps output to input by 1 / s)
    zoom_in = Augmenter(AugConfig(**{**NO_GEOMETRY, "scale": [2.0, 2.0]})).random_affine(3, torch.device("cpu"))
    torch.testing.assert_close(zoom_in, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]).expand(3, 2, 3))
    image = torch.zeros(1, 1, 8, 8)
    image[..., 2:6, 2:6] = 1.0  # the central half, magnified 2x, fills the frame
    assert Augmenter.warp(image, zoom_in[:1])[..., 1:7, 1:7].eq(1).all()
    zoom_out = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    shrunk = Augmenter.warp(torch.ones(1, 1, 8, 8), zoom_out)
    assert shrunk[..., 2:6, 2:6].eq(1).all() and shrunk[..., :2, :].eq(0).all()  # zero padding outside


def _with_channel_means(n: int = 4) -> torch.Tensor:
    """Two channels with different levels, so a per-channel mean differs from the per-sample one."""
    images = torch.rand(n, 2, 10, 9)
    images[:, 0] = 0.2 + 0.3 * images[:, 0]
    images[:, 1] = 0.5 + 0.4 * images[:, 1]
    return images


@pytest.mark.parametrize("contrast, gamma", [(2.0, 1.0), (1.0, 2.0), (0.5, 0.6), (3.0, 0.5)])
def test_contrast_about_the_sample_mean_then_clamped_gamma(contrast, gamma):
    """x <- clamp((x - mean) c + mean, 0, 1) ** g, mean over all channels and pixels of a sample."""
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "contrast": [contrast, contrast], "gamma": [gamma, gamma]}))
    images = _with_channel_means()
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    expected = ((images - mean) * contrast + mean).clamp(0, 1) ** gamma
    out = aug.intensity(images)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected.clamp(0, 1))


def test_intensity_leaves_provenance_channels_alone():
    aug = Augmenter(AugConfig(noise_std=0.1, blur_prob=1.0, contrast=[2.0, 2.0]), image_channels=1)
    images = torch.rand(3, 5, 12, 12)  # 1 image channel + 4 provenance channels
    out = aug.intensity(images)
    assert torch.equal(out[:, 1:], images[:, 1:])
    assert (out[:, :1] - images[:, :1]).abs().max() > 0.1


def reference_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """7 x 7 separable Gaussian with reflected borders."""
    offsets = torch.arange(7, dtype=torch.float64) - 3
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")
    c = x.shape[1]
    rows = F.conv2d(padded, kernel.view(1, 1, 7, 1).expand(c, 1, 7, 1), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, 1, 7).expand(c, 1, 1, 7), groups=c)


@pytest.mark.parametrize("sigma", [0.6, 1.4])
def test_blur_is_a_7x7_gaussian_with_the_drawn_sigma(sigma):
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "blur_prob": 1.0, "blur_sigma": [sigma, sigma]}))
    images = torch.rand(3, 1, 12, 11)
    torch.testing.assert_close(aug.intensity(images), reference_blur(images, sigma), atol=1e-5, rtol=0)


def test_blur_probability_is_per_sample():
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "blur_prob": 0.25}))
    images = torch.rand(400, 1, 8, 8)
    blurred = (aug.intensity(images) != images).flatten(1).any(1).float().mean()
    assert 0.18 < blurred < 0.32


def test_noise_level_is_drawn_per_sample_up_to_noise_std():
    """x + noise_std * U(0, 1) * N(0, 1): each sample gets its own noise level in [0, noise_std]."""
    aug = Augmenter(AugConfig(**{**NO_INTENSITY, "noise_std": 0.1}))
    images = torch.full((64, 1, 32, 32), 0.5)
    levels = (aug.intensity(images) - images).flatten(1).std(1)
    assert levels.max() < 0.1 * 1.1 and levels.max() > 0.08 and levels.min() < 0.02
    assert 0.035 < levels.mean() < 0.065


@pytest.mark.parametrize("size, prob", [((32, 32), 1.0), ((24, 40), 0.6)])
def test_cutmix_box_replayed_from_its_draws(size, prob):
    """UniMatch's box: area U(0.02, 0.4) H W, aspect ratio log-uniform in [0.3, 1 / 0.3], sides
    sqrt(area * r) x sqrt(area / r) clipped to the image, corner uniform so the box fits,
    pixels y0 <= y < y0 + bh (same for x); then kept with probability cutmix_prob."""
    aug = Augmenter(AugConfig(cutmix_prob=prob))
    n, (h, w) = 200, size
    torch.manual_seed(7)
    mask = aug.cutmix_mask(n, size, torch.device("cpu"))
    torch.manual_seed(7)
    area = (0.02 + (0.4 - 0.02) * torch.rand(n)) * h * w
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n))
    bh, bw = torch.sqrt(area * ratio).clamp(max=h), torch.sqrt(area / ratio).clamp(max=w)
    y0, x0 = torch.rand(n) * (h - bh), torch.rand(n) * (w - bw)
    active = torch.rand(n) < prob
    for i in range(n):
        ys = torch.arange(h)
        xs = torch.arange(w)
        rows = (ys >= y0[i]) & (ys < y0[i] + bh[i])
        cols = (xs >= x0[i]) & (xs < x0[i] + bw[i])
        expected = rows[:, None] & cols[None, :] & active[i]
        assert torch.equal(mask[i], expected), i
    assert 0 < int(active.sum()) and (prob == 1.0 or not active.all())
