"""Sliding-window inference (issue 25): nnU-Net's window placement and Gaussian, mirroring, padding,
and the streamed labels against a plain full accumulation."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch
from torch import nn

from vqseg.inference import predict_volume_windows
from vqseg.sliding_window import (
    gaussian_importance,
    sliding_window_labels,
    sliding_window_probabilities,
    window_starts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class PositionModel(nn.Module):
    """Logits K=2: class 0 = input channel 0 times ``ramp`` (a function of the voxel's place in the
    window, so overlapping windows disagree and flips matter), class 1 = 0. Counts forward passes."""

    def __init__(self, ramp: torch.Tensor) -> None:
        super().__init__()
        self.ramp = ramp
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.stack([x[:, 0] * self.ramp, torch.zeros_like(x[:, 0])], dim=1)


class Pointwise(nn.Module):
    """Per-voxel logits from the channels plus a term by place in the window: elementwise arithmetic
    only, so a window's output does not depend on the batch it is in."""

    def __init__(self, channels: int, classes: int, patch_size: tuple[int, ...]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.mix = torch.randn(classes, channels, generator=g)
        self.place = torch.randn(classes, *patch_size, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, *self.mix.shape, *[1] * (x.ndim - 2))
        return (x.unsqueeze(1) * self.mix.view(shape)).sum(dim=2) + self.place


class LevelClassifier(nn.Module):
    """Class c wherever the intensity is nearest c / 3, in 2D or 3D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).view(1, 4, *[1] * (x.ndim - 2))
        return -50 * (x - levels) ** 2


def full_accumulation(model: nn.Module, image: torch.Tensor, patch_size: tuple[int, ...], overlap: float):
    """The reference: every window, one at a time, summed into whole-image buffers, then divided."""
    starts = [window_starts(s, p, overlap) for s, p in zip(image.shape[1:], patch_size)]
    gaussian = gaussian_importance(patch_size)
    logit_sum, weight_sum = None, torch.zeros(image.shape[1:])
    for corner in product(*starts):
        region = tuple(slice(s, s + p) for s, p in zip(corner, patch_size))
        logits = model(image[(slice(None), *region)].unsqueeze(0))[0]
        if logit_sum is None:
            logit_sum = torch.zeros(logits.shape[0], *image.shape[1:])
        logit_sum[(slice(None), *region)] += logits * gaussian
        weight_sum[region] += gaussian
    return logit_sum / weight_sum


@pytest.mark.parametrize(
    "size, patch, overlap", [(10, 4, 0.5), (100, 32, 0.5), (37, 16, 0.5), (33, 8, 0.3), (50, 7, 0.9), (16, 16, 0.5)]
)
def test_window_starts_follow_nnunet(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert len(starts) == math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    steps = np.diff(starts)
    assert (steps <= math.ceil(patch * (1 - overlap))).all()  # windows overlap by at least `overlap`
    assert len(steps) == 0 or steps.max() - steps.min() <= 1  # evenly spread


def test_window_starts_tile_without_overlap_and_refuse_short_axes():
    assert window_starts(12, 4, 0.0) == [0, 4, 8]
    assert window_starts(11, 4, 0.5) == [0, 2, 4, 5, 7]  # steps of 7 / 4, rounded (half to even)
    assert window_starts(4, 4, 0.0) == [0]
    with pytest.raises(ValueError, match="pad it first"):
        window_starts(3, 4, 0.5)


@pytest.mark.parametrize("patch_size", [(16, 16), (9, 16, 7)])
def test_gaussian_importance(patch_size):
    g = gaussian_importance(patch_size)
    assert g.shape == patch_size and g.dtype == torch.float32
    centre = tuple(p // 2 for p in patch_size)
    assert g.max() == 1 and g[centre] == 1 and (g > 0).all()
    # sigma = patch / 8: one sigma from the centre along the 16-voxel axis (2 voxels) weighs exp(-1/2)
    one_sigma = list(centre)
    one_sigma[1] += 2
    assert g[tuple(one_sigma)].item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    # symmetric about the centre: odd axes whole, even axes without their first voxel
    body = g[tuple(slice(1 - p % 2, None) for p in patch_size)]
    assert torch.equal(body, body.flip(tuple(range(g.ndim))))


def test_gaussian_importance_replaces_zeros_by_smallest_weight():
    g = gaussian_importance((64, 64), sigma_scale=1 / 64)  # the corners underflow float32
    positive = g[g > 0]
    assert (g > 0).all() and g[0, 0] == positive.min()


@pytest.mark.parametrize("spatial, patch_size", [((5, 7), (8, 8)), ((3, 5, 4), (4, 6, 6))])
def test_window_larger_than_image_equals_whole_image_forward(spatial, patch_size):
    """Padded with zeros and cropped back: a zero-padded convolution sees the same thing either way."""
    torch.manual_seed(0)
    conv = (nn.Conv2d if len(spatial) == 2 else nn.Conv3d)(2, 3, 3, padding=1)
    image = torch.randn(2, *spatial)
    probs = sliding_window_probabilities(conv, image, patch_size, batch_size=2)
    expected = conv(image.unsqueeze(0))[0].softmax(dim=0)
    assert probs.shape == (3, *spatial)
    # one window: (logits * weight) / weight, within a rounding of the logits
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    labels = sliding_window_labels(conv, image, patch_size, batch_size=2)
    assert labels.shape == spatial and labels.dtype == torch.uint8


def test_two_windows_average_by_gaussian_weight():
    """1 x 6 image, patch 1 x 4, overlap 1/2: windows at columns 0 and 2; class-0 logit = place in window."""
    image = torch.ones(1, 1, 6)
    model = PositionModel(torch.arange(4.0).view(1, 4))
    probs = sliding_window_probabilities(model, image, (1, 4), batch_size=1)
    # weights along the patch: exp(-(j - 2)^2 / (2 * 0.5^2)) = e^-8, e^-2, 1, e^-2
    w = [math.exp(-8), math.exp(-2), 1.0, math.exp(-2)]
    logit0 = [
        0.0,  # column 0: first window only
        1.0,  # column 1: first window only
        (2 * w[2] + 0 * w[0]) / (w[2] + w[0]),  # column 2: place 2 of the first, 0 of the second
        (3 * w[3] + 1 * w[1]) / (w[3] + w[1]),  # column 3: place 3 and 1, equal weights
        2.0,  # columns 4, 5: second window only
        3.0,
    ]
    expected = torch.stack([torch.tensor(logit0), torch.zeros(6)]).softmax(dim=0).view(2, 1, 6)
    torch.testing.assert_close(probs, expected)
    assert model.calls == 2


@pytest.mark.parametrize("spatial", [(2, 3), (2, 3, 2)])
def test_mirroring_averages_flipped_back_predictions(spatial):
    """An affine ramp times the input: flipping along axes A gives input * ramp flipped along A, and the
    mean of an affine ramp over all its flips is its value at the centre, its mean."""
    ramp = torch.arange(1.0, 1 + math.prod(spatial)).view(spatial)
    image = torch.rand(1, *spatial)
    model = PositionModel(ramp)
    probs = sliding_window_probabilities(model, image, spatial, batch_size=1, mirror=True)
    expected = torch.stack([image[0] * ramp.mean(), torch.zeros(spatial)]).softmax(dim=0)
    torch.testing.assert_close(probs, expected)
    assert model.calls == 2 ** len(spatial)
    plain = sliding_window_probabilities(model, image, spatial, batch_size=1)
    torch.testing.assert_close(plain, torch.stack([image[0] * ramp, torch.zeros(spatial)]).softmax(dim=0))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_labels_equal_argmax_of_full_accumulation(batch_size):
    patch_size, overlap = (4, 5, 6), 0.5
    image = torch.rand(2, 11, 9, 13, generator=torch.Generator().manual_seed(0))
    model = Pointwise(channels=2, classes=3, patch_size=patch_size)
    reference = full_accumulation(model, image, patch_size, overlap).softmax(dim=0)
    labels = sliding_window_labels(model, image, patch_size, batch_size=batch_size, overlap=overlap)
    probs = sliding_window_probabilities(model, image, patch_size, batch_size=batch_size, overlap=overlap)
    assert torch.equal(labels, reference.argmax(dim=0).to(torch.uint8))
    assert torch.equal(labels, probs.argmax(dim=0).to(torch.uint8))
    torch.testing.assert_close(probs, reference)


def test_padding_gives_the_input_size():
    image = torch.rand(1, 3, 2, 5)
    model = Pointwise(channels=1, classes=2, patch_size=(4, 4, 8))
    assert sliding_window_probabilities(model, image, (4, 4, 8), batch_size=1).shape == (2, 3, 2, 5)
    assert sliding_window_labels(model, image, (4, 4, 8), batch_size=1).shape == (3, 2, 5)


def test_padding_is_split_evenly_with_the_odd_voxel_after():
    """Width 3 in a patch of 6: one zero column before, two after (nnU-Net's split), seen by a position model."""
    image = torch.ones(1, 1, 3)
    probs = sliding_window_probabilities(PositionModel(torch.arange(6.0).view(1, 6)), image, (1, 6), batch_size=1)
    expected = torch.stack([torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3)]).softmax(dim=0)
    torch.testing.assert_close(probs, expected)


def test_labels_are_the_argmax_of_the_probabilities_not_of_the_logits():
    """Logits 1e-8 apart round to one probability: the labels follow the probabilities (the first class)."""

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), torch.full_like(x, 1e-8)], dim=1)

    image = torch.zeros(1, 4, 4)
    probs = sliding_window_probabilities(model, image, (2, 2), batch_size=4)
    assert (probs[0] == probs[1]).all()
    assert (sliding_window_labels(model, image, (2, 2), batch_size=4) == 0).all()


@pytest.mark.parametrize("patch_size", [(16, 8), (4, 16, 8)])
def test_predict_volume_windows_native_labels(patch_size):
    """D x C x H x W in, D x H x W uint8 out, slice-wise (2D) or as one volume (3D), nothing resized."""
    levels = np.random.default_rng(0).integers(0, 4, size=(6, 1, 21, 13))
    image = (levels / 3).astype(np.float32)
    pred = predict_volume_windows(LevelClassifier(), image, patch_size, batch_size=4, device=torch.device("cpu"))
    assert pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, levels[:, 0])
