"""Tests for the Post-VQ Feature Adapter and the patch-wise InfoNCE loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqseg.modules.pfa import PostVQAdapter, patch_infonce


def _features(b: int = 2, d: int = 16, h: int = 6, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("in_hw, grid", [((4, 6), (12, 20)), ((32, 24), (8, 5)), ((8, 5), (8, 5))])
def test_adapter_shapes_non_square(in_hw: tuple[int, int], grid: tuple[int, int]) -> None:
    adapter = PostVQAdapter(in_channels=8, out_dim=24, grid=grid)
    out = adapter(torch.randn(3, 8, *in_hw))
    assert out.shape == (3, 24, *grid)


@pytest.mark.parametrize("in_hw", [(4, 6), (32, 40)])
def test_adapter_matches_resize_then_conv(in_hw: tuple[int, int]) -> None:
    """The cheaper conv/resize order must equal the paper's resize-then-conv exactly."""
    torch.manual_seed(0)
    adapter = PostVQAdapter(in_channels=8, out_dim=5, grid=(12, 20))
    x = torch.randn(2, 8, *in_hw)
    reference = adapter.proj(F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False))
    torch.testing.assert_close(adapter(x), reference, atol=1e-5, rtol=1e-5)


def test_aligned_loss_lower_than_shuffled() -> None:
    teacher = _features()
    student = teacher + 0.1 * _features(seed=1)
    b, d, h, w = student.shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(2))
    shuffled = student.flatten(2)[:, :, perm].reshape(b, d, h, w)
    aligned_loss = patch_infonce(student, teacher, num_samples=None)
    shuffled_loss = patch_infonce(shuffled, teacher, num_samples=None)
    assert aligned_loss < 0.1 < math.log(h * w) < shuffled_loss


def test_random_features_give_about_log_n() -> None:
    loss = patch_infonce(_features(), _features(seed=1), tau=1.0, num_samples=None)
    assert abs(loss.item() - math.log(60)) < 0.5


def test_gradient_reaches_adapter_not_teacher() -> None:
    adapter = PostVQAdapter(in_channels=8, out_dim=16, grid=(6, 10))
    post_vq = torch.randn(2, 8, 3, 5, requires_grad=True)
    teacher = _features().requires_grad_(True)
    loss = patch_infonce(adapter(post_vq), teacher, num_samples=32)
    loss.backward()
    assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
    assert post_vq.grad is not None and post_vq.grad.abs().sum() > 0
    assert teacher.grad is None


def test_tau_sharpens_aligned_loss() -> None:
    teacher = _features()
    student = teacher + 0.5 * _features(seed=1)
    losses = [patch_infonce(student, teacher, tau=tau, num_samples=None).item() for tau in (1.0, 0.3, 0.07)]
    assert losses[0] > losses[1] > losses[2]
    with pytest.raises(ValueError, match="tau"):
        patch_infonce(student, teacher, tau=0.0)


def test_num_samples_behaviour() -> None:
    student, teacher = _features(), _features(seed=1)
    full = patch_infonce(student, teacher, num_samples=None)
    torch.testing.assert_close(patch_infonce(student, teacher, num_samples=60), full)
    torch.testing.assert_close(patch_infonce(student, teacher, num_samples=1000), full)
    a = patch_infonce(student, teacher, num_samples=16, generator=torch.Generator().manual_seed(3))
    b = patch_infonce(student, teacher, num_samples=16, generator=torch.Generator().manual_seed(3))
    c = patch_infonce(student, teacher, num_samples=16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    # With fewer candidates the random-feature loss approaches log(num_samples).
    assert patch_infonce(student, teacher, tau=1.0, num_samples=4) < full
    with pytest.raises(ValueError, match="num_samples"):
        patch_infonce(student, teacher, num_samples=1)


def test_subsampling_uses_same_locations_in_both_maps() -> None:
    """Identical maps stay perfectly aligned after subsampling: a tiny loss, not log(n)."""
    teacher = _features(d=64, h=16, w=16)
    loss = patch_infonce(teacher.clone(), teacher, tau=0.05, num_samples=32)
    assert loss < 1e-3


def test_stable_with_half_teacher_and_tiny_tau() -> None:
    teacher = _features().half()
    loss = patch_infonce(_features(seed=1), teacher, tau=1e-4, num_samples=None)
    assert torch.isfinite(loss)


def test_shape_mismatch_errors() -> None:
    with pytest.raises(ValueError, match="B x D x h x w"):
        patch_infonce(_features(h=6), _features(h=7))


def test_each_image_samples_its_own_locations() -> None:
    """Only sampled student locations get a gradient: each image has num_samples of them, drawn per image."""
    student = _features(b=4, h=4, w=4).requires_grad_(True)
    patch_infonce(student, _features(b=4, h=4, w=4, seed=1), num_samples=5,
                  generator=torch.Generator().manual_seed(3)).backward()
    sampled = student.grad.abs().sum(dim=1).flatten(1) > 0
    assert sampled.sum(dim=1).tolist() == [5, 5, 5, 5]
    assert len({tuple(row.tolist()) for row in sampled}) > 1  # shared locations: 1 / C(16, 5) per pair


def _old_patch_infonce(student: torch.Tensor, teacher: torch.Tensor, tau: float, num_samples: int | None,
                       generator: torch.Generator | None) -> torch.Tensor:
    """The loss before validity masks (issue 23), kept here to pin that an all-valid mask changes nothing."""
    b, d = student.shape[:2]
    s = F.normalize(student.float().flatten(2), dim=1)
    t = F.normalize(teacher.float().flatten(2), dim=1)
    n = s.shape[-1]
    if num_samples is not None and num_samples < n:
        idx = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :num_samples].unsqueeze(1).expand(b, d, -1)
        s, t, n = s.gather(2, idx), t.gather(2, idx), num_samples
    logits = torch.einsum("bdi,bdj->bij", s, t) / tau
    return F.cross_entropy(logits.reshape(b * n, n), torch.arange(n).repeat(b))


@pytest.mark.parametrize("num_samples", [None, 60, 7])
def test_all_valid_mask_is_the_unmasked_loss(num_samples: int | None) -> None:
    student, teacher = _features(b=3), _features(b=3, seed=1)
    valid = torch.ones(3, 6, 10, dtype=torch.bool)
    old = _old_patch_infonce(student, teacher, 0.1, num_samples, torch.Generator().manual_seed(5))
    for mask in (None, valid):
        new = patch_infonce(student, teacher, 0.1, num_samples, torch.Generator().manual_seed(5), valid=mask)
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6)


def test_padded_cells_are_never_sampled() -> None:
    """A target whose border is a warp's zero padding: the loss is the loss of the valid interior
    alone, whatever the padding holds, and only valid student cells are sampled and get gradients."""
    student, teacher = _features(b=2), _features(b=2, seed=1)
    valid = torch.zeros(2, 6, 10, dtype=torch.bool)
    valid[:, 1:-1, 2:-2] = True  # 4 x 6 valid cells, the border padded
    padded = teacher.masked_fill(~valid[:, None], 0.0)
    interior = patch_infonce(student[:, :, 1:-1, 2:-2], teacher[:, :, 1:-1, 2:-2], 0.1, num_samples=None)
    for target in (padded, teacher):
        torch.testing.assert_close(patch_infonce(student, target, 0.1, num_samples=None, valid=valid), interior)
    for seed in range(5):
        grad_of = student.clone().requires_grad_(True)
        patch_infonce(grad_of, padded, 0.1, num_samples=10, generator=torch.Generator().manual_seed(seed),
                      valid=valid).backward()
        sampled = grad_of.grad.abs().sum(dim=1) > 0
        assert not (sampled & ~valid).any() and sampled.flatten(1).sum(dim=1).tolist() == [10, 10]
    grad_of = student.clone().requires_grad_(True)
    patch_infonce(grad_of, padded, 0.1, num_samples=50, valid=valid).backward()  # more samples than valid cells
    assert torch.equal(grad_of.grad.abs().sum(dim=1) > 0, valid)


def test_an_image_with_fewer_than_two_valid_cells_contributes_nothing() -> None:
    student, teacher = _features(b=2), _features(b=2, seed=1)
    valid = torch.ones(2, 6, 10, dtype=torch.bool)
    valid[0] = False
    valid[0, 2, 3] = True  # a single valid cell: no negative to contrast with
    torch.testing.assert_close(patch_infonce(student, teacher, 0.1, num_samples=None, valid=valid),
                               patch_infonce(student[1:], teacher[1:], 0.1, num_samples=None))
    grad_of = student.clone().requires_grad_(True)
    loss = patch_infonce(grad_of, teacher, 0.1, num_samples=8, valid=torch.zeros_like(valid))  # nothing valid
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(grad_of.grad, torch.zeros_like(student))  # zero, not NaN
    with pytest.raises(ValueError, match="valid must be B x h x w"):
        patch_infonce(student, teacher, valid=valid[:, :5])
