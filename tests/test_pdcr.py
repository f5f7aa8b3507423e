"""PDCR: gradient direction, patch fractions, centre mapping, sampling, ignore_index, stability."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqseg.modules.pdcr import cell_centres, cross_layer_pdcr_loss, patch_fractions, pdcr_loss, sample_locations


def two_class_problem(seed: int = 0, background: bool = False) -> tuple[Tensor, Tensor]:
    """8 x 8 random features over a 16 x 16 label: left half class 1, right half class 2 (or 0)."""
    labels = torch.ones(1, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 0 if background else 2
    features = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    return features, labels


def mean_cosines(features: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean cosine similarity over same-class pairs (i != j) and over different-class pairs."""
    h, w = features.shape[-2:]
    centres = cell_centres((h, w), labels.shape[-2:])
    classes = labels[0, centres[:, 0], centres[:, 1]]
    vectors = F.normalize(features[0].flatten(1).T, dim=1)
    cos = vectors @ vectors.T
    same = (classes[:, None] == classes[None, :]) & ~torch.eye(len(classes), dtype=torch.bool)
    different = classes[:, None] != classes[None, :]
    return cos[same].mean().item(), cos[different].mean().item()


def class_distribution(labels: Tensor, centres: Tensor, patch: int, num_classes: int) -> Tensor:
    """(background, foreground phi) per patch, the distribution the affinity compares."""
    phi = patch_fractions(labels, centres, patch, num_classes)
    return torch.cat([1 - phi.sum(-1, keepdim=True), phi], dim=-1)


def swapped_pdcr(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The official code's defect: pull by divergence, push by affinity (a and d swapped)."""
    h, w = features.shape[-2:]
    centres = cell_centres((h, w), labels.shape[-2:])[None]
    f = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)
    s = f @ f.transpose(1, 2)
    off_diagonal = ~torch.eye(h * w, dtype=torch.bool)
    losses = []
    for p in (5, 7, 9):
        dist = class_distribution(labels, centres, p, num_classes)
        a = 1 - 0.5 * torch.cdist(dist, dist, p=1)
        d = 1 - a
        log_den = torch.logsumexp((a * s).masked_fill(~off_diagonal, -math.inf), dim=-1, keepdim=True)
        losses.append((log_den - d * s)[:, off_diagonal].mean())
    return torch.stack(losses).mean()


def one_sgd_step(loss_fn: Callable[[Tensor, Tensor], Tensor], background: bool) -> tuple[float, float, float, float]:
    features, labels = two_class_problem(background=background)
    features.requires_grad_(True)
    loss_fn(features, labels).backward()
    stepped = (features - 50.0 * features.grad).detach()
    return *mean_cosines(features.detach(), labels), *mean_cosines(stepped, labels)


@pytest.mark.parametrize("background", [False, True])
def test_one_step_pulls_same_class_and_pushes_different_classes(background: bool) -> None:
    same_before, diff_before, same_after, diff_after = one_sgd_step(
        lambda f, y: pdcr_loss(f, y, num_classes=3, num_samples=64), background
    )
    assert same_after > same_before
    assert diff_after < diff_before


@pytest.mark.parametrize("background", [False, True])
def test_swapped_weights_fail_the_same_criterion(background: bool) -> None:
    same_before, diff_before, same_after, diff_after = one_sgd_step(
        lambda f, y: swapped_pdcr(f, y, num_classes=3), background
    )
    assert not (same_after > same_before and diff_after < diff_before)


def reference_pdcr(
    features: Tensor, labels: Tensor, num_classes: int, tau: float, patch_sizes: tuple[int, ...]
) -> Tensor:
    """Pair-by-pair transcription of the equation over every cell (i != j, k != i)."""
    h, w = features.shape[-2:]
    centres = cell_centres((h, w), labels.shape[-2:])[None]
    f = features.flatten(2)[0].T
    n = h * w
    per_size = []
    for p in patch_sizes:
        dist = class_distribution(labels, centres, p, num_classes)[0]
        terms = []
        for i in range(n):
            s = F.cosine_similarity(f[i][None], f, dim=1) / tau
            a = 1 - 0.5 * (dist[i] - dist).abs().sum(1)
            d = 1 - a
            others = [k for k in range(n) if k != i]
            denominator = torch.exp(d[others] * s[others]).sum()
            terms += [-torch.log(torch.exp(a[j] * s[j]) / denominator) for j in others]
        per_size.append(torch.stack(terms).mean())
    return torch.stack(per_size).mean()


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_matches_pairwise_reference(tau: float) -> None:
    labels = torch.zeros(1, 12, 20, dtype=torch.long)
    labels[:, 2:8, 4:13] = 1
    labels[:, 6:, 14:] = 2
    features = torch.randn(1, 5, 3, 5, generator=torch.Generator().manual_seed(1))
    loss = pdcr_loss(features, labels, 3, patch_sizes=(3, 5), num_samples=15, tau=tau)
    torch.testing.assert_close(loss, reference_pdcr(features, labels, 3, tau, (3, 5)))


def rectangles() -> Tensor:
    """24 x 40 label: class 1 in rows 4-9 x cols 10-19, class 2 in rows 14-21 x cols 30-39 (right border)."""
    labels = torch.zeros(1, 24, 40, dtype=torch.long)
    labels[:, 4:10, 10:20] = 1
    labels[:, 14:22, 30:40] = 2
    return labels


@pytest.mark.parametrize(
    ("centre", "patch", "expected"),
    [
        ((4, 10), 5, (9 / 25, 0.0)),
        ((9, 19), 7, (16 / 49, 0.0)),
        ((0, 0), 5, (0.0, 0.0)),
        ((16, 39), 5, (0.0, 1.0)),
        ((21, 30), 3, (0.0, 4 / 9)),
        ((4, 10), (2, 4), (2 / 8, 0.0)),
    ],
)
def test_patch_fractions_exact(
    centre: tuple[int, int], patch: int | tuple[int, int], expected: tuple[float, float]
) -> None:
    phi = patch_fractions(rectangles(), torch.tensor([[centre]]), patch, num_classes=3)
    assert phi.shape == (1, 1, 2)
    assert phi[0, 0].tolist() == pytest.approx(expected, abs=1e-7)


def test_patch_fractions_match_brute_force() -> None:
    labels = torch.randint(0, 4, (2, 13, 21), generator=torch.Generator().manual_seed(3))
    labels[0, :3] = 255
    centres = torch.stack([torch.randint(0, 13, (2, 10)), torch.randint(0, 21, (2, 10))], dim=-1)
    phi = patch_fractions(labels, centres, 7, num_classes=4, ignore_index=255)
    for b in range(2):
        for n in range(10):
            r, c = centres[b, n].tolist()
            window = labels[b, max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4]
            valid = window[window != 255]
            expected = [(valid == k).sum().item() / max(valid.numel(), 1) for k in (1, 2, 3)]
            assert phi[b, n].tolist() == pytest.approx(expected, abs=1e-6)


def test_ignored_pixels_are_not_counted_in_phi() -> None:
    labels = rectangles()
    labels[0, 4, 10] = 255
    phi = patch_fractions(labels, torch.tensor([[(4, 10)]]), 5, num_classes=3, ignore_index=255)
    assert phi[0, 0, 0].item() == pytest.approx(8 / 24)


@pytest.mark.parametrize("label_hw", [(24, 40), (25, 41)])
def test_cell_centres_are_row_major_and_not_transposed(label_hw: tuple[int, int]) -> None:
    centres = cell_centres((3, 5), label_hw)
    assert centres.shape == (15, 2)
    assert centres[:, 0].view(3, 5)[:, 0].tolist() == [4, 12, 20]
    assert centres[:, 1].view(3, 5)[0].tolist() == [4, 12, 20, 28, 36]
    labels = torch.zeros(1, *label_hw, dtype=torch.long)
    labels[:, :, :16] = 1
    phi = patch_fractions(labels, centres[None], 1, num_classes=2)[0, :, 0].view(3, 5)
    assert phi.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]] * 3


def test_grid_sampling_covers_a_non_square_map_in_row_major_order() -> None:
    labels = torch.zeros(1, 12, 20, dtype=torch.long)
    index, centres, valid = sample_locations(labels, (6, 10), num_classes=2, num_samples=15)
    rows, cols = index[0] // 10, index[0] % 10
    assert sorted(set(rows.tolist())) == [1, 3, 5]
    assert sorted(set(cols.tolist())) == [1, 3, 5, 7, 9]
    assert torch.equal(centres[0], torch.stack([2 * rows + 1, 2 * cols + 1], dim=-1))
    assert bool(valid.all())


@pytest.mark.parametrize(
    "features",
    [
        torch.randn(2, 8, 6, 10) * 1e6,
        torch.ones(2, 8, 6, 10),
        torch.zeros(2, 8, 6, 10),
        torch.randn(2, 8, 6, 10) * 1e-20,
    ],
    ids=["large", "identical", "zero", "tiny"],
)
@pytest.mark.parametrize("tau", [1e-3, 1.0, 100.0])
def test_finite_for_extreme_features(features: Tensor, tau: float) -> None:
    features = features.clone().requires_grad_(True)
    loss = pdcr_loss(features, rectangles().expand(2, -1, -1), 3, tau=tau)
    loss.backward()
    assert torch.isfinite(loss)
    assert bool(torch.isfinite(features.grad).all())


def test_temperature_scales_the_logits() -> None:
    features, labels = two_class_problem()
    losses = [pdcr_loss(features, labels, 3, num_samples=64, tau=tau).item() for tau in (0.1, 1.0)]
    assert losses[0] != pytest.approx(losses[1])
    with pytest.raises(ValueError, match="tau"):
        pdcr_loss(features, labels, 3, tau=0.0)


@pytest.mark.parametrize("sampling", ["grid", "random", "balanced"])
@pytest.mark.parametrize("patch_sizes", [(5, 7, 9), "receptive"])
def test_all_sampling_modes_run_on_non_square_batches(sampling: str, patch_sizes: tuple[int, ...] | str) -> None:
    labels = rectangles().expand(3, -1, -1).clone()
    features = torch.randn(3, 4, 6, 10, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    loss = pdcr_loss(features, labels, 3, patch_sizes, 16, sampling=sampling, generator=generator)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert features.grad.abs().sum() > 0


@pytest.mark.parametrize("sampling", ["grid", "random", "balanced"])
def test_ignored_centres_get_no_gradient(sampling: str) -> None:
    labels = rectangles()
    labels[:, :12] = 255
    features = torch.randn(1, 4, 24, 40, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    pdcr_loss(features, labels, 3, num_samples=64, sampling=sampling, ignore_index=255, generator=generator).backward()
    assert features.grad[..., :12, :].abs().sum() == 0
    assert features.grad[..., 12:, :].abs().sum() > 0


def test_random_sampling_never_picks_ignored_centres() -> None:
    labels = rectangles()
    labels[:, :20] = 255
    index, centres, valid = sample_locations(
        labels, (24, 40), 3, 200, "random", ignore_index=255, generator=torch.Generator().manual_seed(0)
    )
    assert int(valid.sum()) == 4 * 40
    assert bool((labels[0, centres[0, :, 0], centres[0, :, 1]][valid[0]] != 255).all())


def test_fully_ignored_batch_gives_zero_loss_with_gradient() -> None:
    labels = torch.full((2, 24, 40), 255, dtype=torch.long)
    features = torch.randn(2, 4, 6, 10, requires_grad=True)
    loss = pdcr_loss(features, labels, 3, ignore_index=255)
    loss.backward()
    assert loss.item() == 0.0
    assert features.grad is not None and features.grad.abs().sum() == 0


def test_balanced_sampling_prefers_boundaries_and_minority_class() -> None:
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, 12:20, 12:20] = 1
    generator = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    near_square = (ys >= 8) & (ys < 24) & (xs >= 8) & (xs < 24)
    boundary_rate, minority_rate = {}, {}
    for sampling in ("random", "balanced"):
        boundary, minority = [], []
        for _ in range(20):
            _, centres, _ = sample_locations(labels, (32, 32), 2, 32, sampling, generator=generator)
            r, c = centres[0, :, 0], centres[0, :, 1]
            boundary.append(near_square[r, c].float().mean())
            minority.append((labels[0, r, c] == 1).float().mean())
        boundary_rate[sampling] = torch.stack(boundary).mean().item()
        minority_rate[sampling] = torch.stack(minority).mean().item()
    assert boundary_rate["random"] == pytest.approx(0.25, abs=0.05)
    assert boundary_rate["balanced"] > boundary_rate["random"] + 0.3
    assert minority_rate["balanced"] > minority_rate["random"] + 0.3


def test_autocast_computes_in_float32() -> None:
    features = torch.randn(2, 8, 6, 10).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pdcr_loss(features, rectangles().expand(2, -1, -1), 3)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert features.grad.dtype == torch.bfloat16


def test_input_validation() -> None:
    features = torch.randn(1, 4, 6, 10)
    with pytest.raises(ValueError, match="labels"):
        pdcr_loss(features, torch.zeros(2, 24, 40, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="sampling"):
        pdcr_loss(features, rectangles(), 3, sampling="stratified")
    with pytest.raises(ValueError, match="patch_sizes"):
        pdcr_loss(features, rectangles(), 3, patch_sizes="hierarchical")


def test_cross_layer_runs_and_checks_channels() -> None:
    labels = rectangles().expand(2, -1, -1)
    fa = torch.randn(2, 8, 12, 20, requires_grad=True)
    fb = torch.randn(2, 8, 6, 10, requires_grad=True)
    loss = cross_layer_pdcr_loss(fa, fb, labels, 3, num_samples=16)
    loss.backward()
    assert torch.isfinite(loss) and fa.grad.abs().sum() > 0 and fb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="proj"):
        cross_layer_pdcr_loss(fa, torch.randn(2, 4, 6, 10), labels, 3)
    proj = nn.Linear(4, 8)
    cross_layer_pdcr_loss(fa, torch.randn(2, 4, 6, 10), labels, 3, proj=proj).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_cross_layer_reads_the_cell_under_the_same_pixel() -> None:
    """With b an upsampled copy of a, every sampled pair sees identical vectors at i == j."""
    labels = rectangles()
    fa = torch.randn(1, 8, 6, 10)
    fb = F.interpolate(fa, scale_factor=4, mode="nearest")
    same = cross_layer_pdcr_loss(fa, fb, labels, 3, num_samples=60)
    assert same.item() == pytest.approx(cross_layer_pdcr_loss(fa, fa, labels, 3, num_samples=60).item(), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    features = torch.randn(2, 8, 6, 10, device="cuda", requires_grad=True)
    labels = rectangles().expand(2, -1, -1).cuda()
    for sampling in ("grid", "random", "balanced"):
        loss = pdcr_loss(features, labels, 3, sampling=sampling, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# Recipe details: defaults, the cross-layer pairs, receptive patches, balanced sampling weights
# ---------------------------------------------------------------------------------------------


def reference_cross_pdcr(
    fa: Tensor, fb: Tensor, labels: Tensor, num_classes: int, tau: float, patch_sizes: tuple[int, ...]
) -> Tensor:
    """Every cell i of map a against map b read at the cell containing i's centre pixel; self pairs kept."""
    (h, w), (hb, wb), (H, W) = fa.shape[-2:], fb.shape[-2:], labels.shape[-2:]
    centres = cell_centres((h, w), (H, W))
    b_cells = [(int(r) * hb // H) * wb + int(c) * wb // W for r, c in centres]
    va = fa.flatten(2)[0].T
    vb = fb.flatten(2)[0].T[b_cells]
    n = h * w
    per_size = []
    for p in patch_sizes:
        dist = class_distribution(labels, centres[None], p, num_classes)[0]
        terms = []
        for i in range(n):
            s = F.cosine_similarity(va[i][None], vb, dim=1) / tau
            a = 1 - 0.5 * (dist[i] - dist).abs().sum(1)
            denominator = torch.exp((1 - a) * s).sum()
            terms += [-torch.log(torch.exp(a[j] * s[j]) / denominator) for j in range(n)]
        per_size.append(torch.stack(terms).mean())
    return torch.stack(per_size).mean()


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_cross_layer_matches_pairwise_reference(tau: float) -> None:
    labels = torch.zeros(1, 12, 20, dtype=torch.long)
    labels[:, 2:8, 4:13] = 1
    labels[:, 6:, 14:] = 2
    g = torch.Generator().manual_seed(2)
    fa, fb = torch.randn(1, 5, 3, 5, generator=g), torch.randn(1, 5, 4, 7, generator=g)
    loss = cross_layer_pdcr_loss(fa, fb, labels, 3, patch_sizes=(3, 5), num_samples=15, tau=tau)
    torch.testing.assert_close(loss, reference_cross_pdcr(fa, fb, labels, 3, tau, (3, 5)))


def test_defaults_are_the_official_2d_settings() -> None:
    """Hierarchical patches (5, 7, 9), 32 samples on a grid, tau = 1 (METHODS.md §2)."""
    labels = rectangles().expand(2, -1, -1)
    g = torch.Generator().manual_seed(4)
    fa, fb = torch.randn(2, 6, 12, 20, generator=g), torch.randn(2, 6, 6, 10, generator=g)
    explicit = dict(patch_sizes=(5, 7, 9), num_samples=32, tau=1.0, sampling="grid")
    torch.testing.assert_close(pdcr_loss(fa, labels, 3), pdcr_loss(fa, labels, 3, **explicit))
    cross = cross_layer_pdcr_loss(fa, fb, labels, 3)
    torch.testing.assert_close(cross, cross_layer_pdcr_loss(fa, fb, labels, 3, **explicit))
    default = pdcr_loss(fa, labels, 3).item()
    for changed in (dict(tau=0.5), dict(num_samples=16), dict(patch_sizes=(5, 7))):
        assert pdcr_loss(fa, labels, 3, **{**explicit, **changed}).item() != pytest.approx(default)


def test_receptive_patch_is_the_rounded_cell_footprint() -> None:
    """14 x 20 labels over a 4 x 6 map: footprint round(3.5) x round(3.33) = 4 x 3 pixels."""
    labels = torch.randint(0, 3, (1, 14, 20), generator=torch.Generator().manual_seed(6))
    features = torch.randn(1, 5, 4, 6, generator=torch.Generator().manual_seed(7))
    receptive = pdcr_loss(features, labels, 3, "receptive", num_samples=24)
    torch.testing.assert_close(receptive, pdcr_loss(features, labels, 3, ((4, 3),), num_samples=24))
    assert receptive.item() != pytest.approx(pdcr_loss(features, labels, 3, ((3, 3),), num_samples=24).item())


def test_balanced_sampling_weights_boundaries_and_class_frequency() -> None:
    """P(pick cell) is proportional to (1 + 3 [largest patch holds > 1 class]) / count(valid cells of
    the centre's class); ignored centres are never picked and do not count."""
    labels = torch.zeros(10, 10, dtype=torch.long)
    labels[1:4, 1:4] = 1
    labels[7:] = 255
    patches = (1, 3)
    # expected weights, cell by cell (cells are pixels here)
    valid = labels != 255
    freq = {c: int(((labels == c) & valid).sum()) for c in (0, 1)}
    weight = torch.zeros(10, 10, dtype=torch.float64)
    mixed = torch.zeros(10, 10, dtype=torch.bool)
    for r in range(10):
        for c in range(10):
            if not valid[r, c]:
                continue
            window = labels[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
            mixed[r, c] = len(set(window[window != 255].tolist())) > 1
            weight[r, c] = (1 + 3 * mixed[r, c].item()) / freq[int(labels[r, c])]
    expected = weight / weight.sum()
    n = 8000
    index, _, _ = sample_locations(
        labels.expand(n, -1, -1), (10, 10), 2, 1, "balanced", patches, ignore_index=255,
        generator=torch.Generator().manual_seed(0),
    )
    observed = torch.bincount(index[:, 0], minlength=100).double().view(10, 10) / n
    assert observed[~valid].sum() == 0
    for group in (labels == 1, (labels == 0) & mixed, (labels == 0) & ~mixed & valid):
        assert observed[group].sum().item() == pytest.approx(expected[group].sum().item(), abs=0.02)
    # without replacement: 5 distinct valid cells per draw
    index, _, ok = sample_locations(labels[None], (10, 10), 2, 5, "balanced", patches, ignore_index=255)
    assert len(set(index[0].tolist())) == 5 and ok.all()


def test_cross_layer_trains_both_layers_through_the_projection() -> None:
    labels = rectangles().expand(2, -1, -1)
    fa = torch.randn(2, 8, 12, 20, requires_grad=True)
    fb = torch.randn(2, 4, 6, 10, requires_grad=True)
    proj = nn.Linear(4, 8)
    loss = cross_layer_pdcr_loss(fa, fb, labels, 3, num_samples=16, proj=proj)
    loss.backward()
    assert fa.grad.abs().sum() > 0 and fb.grad.abs().sum() > 0 and proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the projected b vectors are what a is contrasted with
        projected = F.conv2d(fb, proj.weight[:, :, None, None], proj.bias)
        expected = cross_layer_pdcr_loss(fa, projected, labels, 3, num_samples=16)
    torch.testing.assert_close(loss.detach(), expected)
