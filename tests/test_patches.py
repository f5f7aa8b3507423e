"""Patch sampling: shapes, nnU-Net's foreground share, coverage, padding, determinism and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqseg.data.patches import PatchSampler
from vqseg.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def cases_3d() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three 2-channel volumes of different sizes, each with one small foreground blob of its own class."""
    images, labels = [], []
    for i, shape in enumerate([(6, 20, 18), (8, 16, 24), (5, 22, 20)]):
        label = torch.zeros(shape, dtype=torch.uint8)
        label[1 + i, 3 + i : 5 + i, 4 : 6 + i] = 1 + i % 2
        images.append(torch.rand(2, *shape))
        labels.append(label)
    return images, labels


def same(a, b) -> bool:
    return all(
        torch.equal(getattr(a, k), getattr(b, k)) for k in ("images", "labels", "cases", "origins", "forced")
    )


def test_3d_patches_have_the_patch_shape_and_come_from_where_they_say():
    images, labels = cases_3d()
    sampler = PatchSampler(images, labels, [4, 8, 8], batch_size=5, seed=0)
    batch = sampler.next()
    assert batch.images.shape == (5, 2, 4, 8, 8) and batch.labels.shape == (5, 4, 8, 8)
    assert batch.labels.dtype == torch.uint8 and batch.origins.shape == (5, 3)
    for i in range(5):
        case, (d, h, w) = int(batch.cases[i]), batch.origins[i].tolist()
        assert torch.equal(batch.images[i], images[case][:, d : d + 4, h : h + 8, w : w + 8])
        assert torch.equal(batch.labels[i], labels[case][d : d + 4, h : h + 8, w : w + 8])


def test_2d_patches_of_volumes_are_single_slices():
    images, labels = cases_3d()
    batch = PatchSampler(images, labels, [8, 8], batch_size=4, seed=1).next()
    assert batch.images.shape == (4, 2, 8, 8) and batch.labels.shape == (4, 8, 8) and batch.origins.shape == (4, 3)
    for i in range(4):
        case, (d, h, w) = int(batch.cases[i]), batch.origins[i].tolist()
        assert torch.equal(batch.images[i], images[case][:, d, h : h + 8, w : w + 8])


def test_2d_cases_and_numpy_input():
    images = [np.random.default_rng(0).random((3, 12, 10), dtype=np.float32)]
    batch = PatchSampler(images, None, [6, 6], batch_size=3, seed=0).next()
    assert batch.images.shape == (3, 3, 6, 6) and batch.labels is None and not batch.forced.any()


@pytest.mark.parametrize(("batch_size", "forced"), [(2, 1), (3, 1), (6, 2), (12, 4)])
def test_the_last_share_of_each_batch_is_forced_onto_foreground(batch_size, forced):
    """nnU-Net: patch i is forced when i >= round(B (1 - 0.33)); every forced patch holds foreground."""
    images, labels = cases_3d()
    sampler = PatchSampler(images, labels, [3, 6, 6], batch_size=batch_size, seed=2)
    for _ in range(20):
        batch = sampler.next()
        assert batch.forced.tolist() == [False] * (batch_size - forced) + [True] * forced
        assert all(batch.labels[i].any() for i in range(batch_size) if batch.forced[i])


def test_foreground_oversample_zero_and_one():
    images, labels = cases_3d()
    assert not PatchSampler(images, labels, [3, 6, 6], 4, 0, foreground_oversample=0.0).next().forced.any()
    batch = PatchSampler(images, labels, [3, 6, 6], 4, 0, foreground_oversample=1.0).next()
    assert batch.forced.all() and all(y.any() for y in batch.labels)


def test_uniform_patches_cover_the_whole_image():
    image = torch.arange(12 * 10, dtype=torch.float32).view(1, 12, 10)
    sampler = PatchSampler([image], None, [4, 4], batch_size=16, seed=0)
    seen = torch.zeros(12, 10, dtype=torch.bool)
    for _ in range(20):
        batch = sampler.next()
        assert (batch.origins >= 0).all() and (batch.origins[:, 0] <= 8).all() and (batch.origins[:, 1] <= 6).all()
        for h, w in batch.origins.tolist():
            seen[h : h + 4, w : w + 4] = True
    assert seen.all()


def test_a_small_image_is_centred_and_padded():
    image = torch.rand(1, 3, 5) + 1
    label = torch.ones(3, 5, dtype=torch.uint8)
    big = torch.rand(1, 10, 10)
    sampler = PatchSampler([image, big], [label, torch.zeros(10, 10, dtype=torch.uint8)], [8, 8], 8, seed=0)
    assert sampler.padded_cases == [0]
    assert sampler.padding_note() == (
        "1 of 2 case(s) are smaller than the patch 8 x 8 along some axis: their patches are padded "
        "(image 0, label background)"
    )
    batch = sampler.next()
    small = [i for i in range(8) if batch.cases[i] == 0]
    assert small  # the forced patches come from the only case with foreground
    for i in small:
        assert batch.origins[i].tolist() == [-2, -1]  # (8 - 3) // 2 rows and (8 - 5) // 2 columns before
        expected = torch.zeros(1, 8, 8)
        expected[:, 2:5, 1:6] = image
        assert torch.equal(batch.images[i], expected)
        assert torch.equal(batch.labels[i], (expected[0] > 0).to(torch.uint8))
    assert PatchSampler([big], None, [8, 8], 2, seed=0).padding_note() is None


def test_same_seed_same_stream_and_exact_resume():
    images, labels = cases_3d()
    first = PatchSampler(images, labels, [3, 6, 6], 4, seed=7)
    second = PatchSampler(images, labels, [3, 6, 6], 4, seed=7)
    assert all(same(first.next(), second.next()) for _ in range(3))
    assert not same(PatchSampler(images, labels, [3, 6, 6], 4, seed=8).next(), first.next())
    state = first.state_dict()
    expected = [first.next() for _ in range(3)]
    resumed = PatchSampler(images, labels, [3, 6, 6], 4, seed=0)
    resumed.load_state_dict(state)
    assert all(same(resumed.next(), batch) for batch in expected)


def test_a_patch_with_the_wrong_number_of_axes_names_the_setting():
    with pytest.raises(ConfigError, match=r"^train.patch_size=\[4, 4, 4, 4\] has 4 values but the cases have 3"):
        PatchSampler([torch.rand(1, 5, 5, 5)], None, [4, 4, 4, 4], 2, seed=0)
