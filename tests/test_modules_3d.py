"""The building blocks on 3D maps (B x C x D x H x W): PDCR (grid positions, patch fractions, the
gradient direction, the cross-layer term), UAFS (also inserted by name into unet3d), VQ and QPM on
3D token grids, and VQ-Seg's network on unet3d."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqseg.config import ModelConfig
from vqseg.models import build_model
from vqseg.models.vq_net import FactorizedQuantizer, VQSegNet
from vqseg.modules.attach import insert_uafs
from vqseg.modules.pdcr import cell_centres, cross_layer_pdcr_loss, patch_fractions, pdcr_loss, sample_locations
from vqseg.modules.qpm import QPM, perturb_indices, shuffle_indices
from vqseg.modules.uafs import UAFS
from vqseg.modules.vq import VectorQuantizer

# ---------------------------------------------------------------------------------------------
# PDCR
# ---------------------------------------------------------------------------------------------


def test_cell_centres_are_row_major_over_depth_rows_and_columns() -> None:
    centres = cell_centres((2, 3, 5), (8, 12, 20))
    assert centres.shape == (30, 3)
    grid = centres.view(2, 3, 5, 3)
    assert grid[:, 0, 0, 0].tolist() == [2, 6]  # depth varies slowest
    assert grid[0, :, 0, 1].tolist() == [2, 6, 10]
    assert grid[0, 0, :, 2].tolist() == [2, 6, 10, 14, 18]


def test_grid_sampling_is_a_regular_3d_grid() -> None:
    """30 samples on a 4 x 6 x 10 map: cbrt(30 * 4^2 / 60) = 2 slices, sqrt(15 * 6 / 10) = 3 rows,
    5 columns, at the centres of equal bins, in row-major order."""
    labels = torch.zeros(1, 8, 12, 20, dtype=torch.long)
    index, centres, valid = sample_locations(labels, (4, 6, 10), num_classes=2, num_samples=30)
    depth, rows, cols = index[0] // 60, index[0] // 10 % 6, index[0] % 10
    assert sorted(set(depth.tolist())) == [1, 3]
    assert sorted(set(rows.tolist())) == [1, 3, 5]
    assert sorted(set(cols.tolist())) == [1, 3, 5, 7, 9]
    assert index.shape == (1, 30) and index[0].tolist() == sorted(index[0].tolist())
    assert torch.equal(centres[0], torch.stack([2 * depth + 1, 2 * rows + 1, 2 * cols + 1], dim=-1))
    assert bool(valid.all())
    cube, _, _ = sample_locations(torch.zeros(1, 8, 8, 8, dtype=torch.long), (8, 8, 8), 2, 64)
    assert cube[0].tolist() == [(d * 8 + r) * 8 + c for d in (1, 3, 5, 7) for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]


def boxes() -> Tensor:
    """6 x 10 x 10 label: class 1 in slices 1-3 x rows 2-5 x cols 2-5, class 2 in slices 3-5 x rows
    7-9 x cols 7-9 (the far corner)."""
    labels = torch.zeros(1, 6, 10, 10, dtype=torch.long)
    labels[:, 1:4, 2:6, 2:6] = 1
    labels[:, 3:6, 7:10, 7:10] = 2
    return labels


@pytest.mark.parametrize(
    ("centre", "patch", "expected"),
    [
        ((2, 3, 3), 3, (1.0, 0.0)),  # inside class 1
        ((0, 2, 2), 3, (4 / 18, 0.0)),  # 2 x 3 x 3 valid voxels at the first slice, 1 x 2 x 2 of class 1
        ((5, 9, 9), 3, (0.0, 1.0)),  # 2 x 2 x 2 valid voxels in the corner, all class 2
        ((3, 6, 6), (1, 3, 3), (1 / 9, 1 / 9)),  # one slice: one voxel of each class
        ((2, 3, 3), 5, (48 / 125, 0.0)),  # the whole class-1 box (3 x 4 x 4) in a 5-cube
    ],
)
def test_patch_fractions_exact_in_3d(
    centre: tuple[int, int, int], patch: int | tuple[int, int, int], expected: tuple[float, float]
) -> None:
    phi = patch_fractions(boxes(), torch.tensor([[centre]]), patch, num_classes=3)
    assert phi.shape == (1, 1, 2)
    assert phi[0, 0].tolist() == pytest.approx(expected, abs=1e-7)


def test_patch_fractions_are_avg_pool3d_of_the_one_hot_labels_without_padding() -> None:
    labels = torch.randint(0, 3, (2, 5, 7, 9), generator=torch.Generator().manual_seed(0))
    every_voxel = cell_centres((5, 7, 9), (5, 7, 9)).expand(2, -1, -1)
    phi = patch_fractions(labels, every_voxel, (3, 5, 5), num_classes=3)
    pooled = F.avg_pool3d(
        F.one_hot(labels, 3).movedim(-1, 1).float(), (3, 5, 5), stride=1, padding=(1, 2, 2), count_include_pad=False
    )
    torch.testing.assert_close(phi, pooled[:, 1:].flatten(2).transpose(1, 2))


def two_class_volume(background: bool) -> tuple[Tensor, Tensor]:
    """4 x 8 x 8 random features over an 8 x 16 x 16 label: left half class 1, right half class 2 (or 0)."""
    labels = torch.ones(1, 8, 16, 16, dtype=torch.long)
    labels[..., 8:] = 0 if background else 2
    return torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), labels


def mean_cosines(features: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean cosine over same-class pairs (i != j) and over different-class pairs of cell vectors."""
    centres = cell_centres(features.shape[2:], labels.shape[1:])
    classes = labels[0, centres[:, 0], centres[:, 1], centres[:, 2]]
    vectors = F.normalize(features[0].flatten(1).T, dim=1)
    cos = vectors @ vectors.T
    same = (classes[:, None] == classes[None, :]) & ~torch.eye(len(classes), dtype=torch.bool)
    return cos[same].mean().item(), cos[classes[:, None] != classes[None, :]].mean().item()


@pytest.mark.parametrize("background", [False, True])
def test_one_step_pulls_same_class_and_pushes_different_classes_in_3d(background: bool) -> None:
    features, labels = two_class_volume(background)
    features.requires_grad_(True)
    pdcr_loss(features, labels, num_classes=3, num_samples=256, tau=0.5).backward()  # every cell
    stepped = (features - 50.0 * features.grad).detach()
    same_before, diff_before = mean_cosines(features.detach(), labels)
    same_after, diff_after = mean_cosines(stepped, labels)
    assert same_after > same_before and diff_after < diff_before


def reference_pdcr(features: Tensor, labels: Tensor, tau: float, patch: int) -> Tensor:
    """Pair-by-pair transcription of the equation over every cell of a 3D map (i != j, k != i)."""
    centres = cell_centres(features.shape[2:], labels.shape[1:])
    phi = patch_fractions(labels, centres[None], patch, 3)[0]
    dist = torch.cat([1 - phi.sum(-1, keepdim=True), phi], dim=-1)
    f = features.flatten(2)[0].T
    n = len(f)
    terms = []
    for i in range(n):
        s = F.cosine_similarity(f[i][None], f, dim=1) / tau
        a = 1 - 0.5 * (dist[i] - dist).abs().sum(1)
        others = [k for k in range(n) if k != i]
        denominator = torch.exp((1 - a[others]) * s[others]).sum()
        terms += [-torch.log(torch.exp(a[j] * s[j]) / denominator) for j in others]
    return torch.stack(terms).mean()


def test_matches_the_pairwise_reference_in_3d() -> None:
    features = torch.randn(1, 5, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    loss = pdcr_loss(features, boxes(), 3, patch_sizes=(3,), num_samples=18, tau=0.5)
    torch.testing.assert_close(loss, reference_pdcr(features, boxes(), 0.5, 3))


@pytest.mark.parametrize("sampling", ["grid", "random", "balanced"])
@pytest.mark.parametrize("patch_sizes", [(3, 5), ((1, 3, 3), (3, 5, 5)), "receptive"])
def test_every_sampling_mode_and_patch_form_runs_on_3d_maps(sampling: str, patch_sizes: tuple | str) -> None:
    labels = boxes().expand(2, -1, -1, -1).clone()
    labels[1, :2] = 255
    features = torch.randn(2, 4, 3, 5, 5, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    loss = pdcr_loss(features, labels, 3, patch_sizes, 16, sampling=sampling, ignore_index=255, generator=generator)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and features.grad.abs().sum() > 0
    assert features.grad[1, :, 0].abs().sum() == 0  # slices 0-1 are ignored: the first cell slice gets nothing


def test_cross_layer_in_3d_reads_the_cell_under_the_same_voxel_and_trains_both() -> None:
    labels = boxes()
    fa = torch.randn(1, 8, 3, 5, 5, requires_grad=True)
    fb = F.interpolate(fa.detach(), scale_factor=2, mode="nearest").requires_grad_(True)  # 6 x 10 x 10
    same = cross_layer_pdcr_loss(fa, fb, labels, 3, num_samples=20, tau=0.5)
    torch.testing.assert_close(same, cross_layer_pdcr_loss(fa, fa, labels, 3, num_samples=20, tau=0.5))
    same.backward()
    assert fa.grad.abs().sum() > 0 and fb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="features_b"):
        cross_layer_pdcr_loss(fa, torch.randn(1, 8, 5, 5), labels, 3)
    with pytest.raises(ValueError, match="B x D x H x W"):
        pdcr_loss(fa, labels[0], 3)
    with pytest.raises(ValueError, match="3 sides"):
        pdcr_loss(fa, labels, 3, patch_sizes=((3, 3),))


# ---------------------------------------------------------------------------------------------
# UAFS
# ---------------------------------------------------------------------------------------------


def test_uafs_3d_block_keeps_the_shape_and_reweights_by_uncertainty() -> None:
    torch.manual_seed(0)
    block = UAFS(6, dims=3)
    conv, norm, relu, head = block.attention
    assert isinstance(conv, nn.Conv3d) and conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1)
    assert isinstance(norm, nn.BatchNorm3d) and isinstance(relu, nn.ReLU)
    assert isinstance(head, nn.Conv3d) and head.kernel_size == (1, 1, 1) and head.out_channels == 2
    x = torch.randn(2, 6, 3, 5, 4)
    out = block(x)
    u = block.last_uncertainty
    assert out.shape == x.shape and u.shape == (2, 1, 3, 5, 4)
    p = F.softmax(block.attention(x), dim=1)
    torch.testing.assert_close(u, -(p * p.log()).sum(1, keepdim=True) / math.log(2))
    torch.testing.assert_close(out, x * (2 - u))
    with pytest.raises(ValueError, match="dims"):
        UAFS(6, dims=1)


def test_uafs_3d_is_the_identity_when_attention_is_constant() -> None:
    block = UAFS(4, dims=3)
    nn.init.zeros_(block.attention[-1].weight)
    nn.init.zeros_(block.attention[-1].bias)
    x = torch.randn(2, 4, 3, 5, 4)
    assert torch.equal(block(x), x)
    assert torch.equal(block.last_uncertainty, torch.ones(2, 1, 3, 5, 4))


def test_uafs_3d_gradient_reaches_the_attention_convolutions() -> None:
    torch.manual_seed(0)
    block = UAFS(4, dims=3)
    x = torch.randn(2, 4, 3, 4, 4, requires_grad=True)
    block(x).square().mean().backward()
    for conv in (block.attention[0], block.attention[-1]):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def tiny_unet3d() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="unet3d", channels=[2, 4, 8], dropout=[0.0] * 3, pool=[[1, 2, 2], [2, 2, 2]], kernels=[[1, 3, 3]] * 3
    )
    return build_model(cfg, in_channels=1, num_classes=2)


def test_insert_uafs_on_unet3d_layer_names_builds_3d_blocks() -> None:
    model = tiny_unet3d()
    x = torch.randn(1, 1, 4, 8, 8)
    before = model(x)
    insert_uafs(model, ["encoder.downs.0", "decoder.ups.1.conv"], example_input=x)
    blocks = [model.encoder.downs[0][1], model.decoder.ups[1].conv[1]]
    assert all(isinstance(b, UAFS) and isinstance(b.attention[0], nn.Conv3d) for b in blocks)
    assert [b.attention[0].in_channels for b in blocks] == [4, 2]
    after = model(x)
    assert after.shape == before.shape and not torch.allclose(after, before)
    plain = insert_uafs(tiny_unet3d(), ["encoder.stem"], channels={"encoder.stem": 2})  # no dry run: from the convs
    assert isinstance(plain.encoder.stem[1].attention[0], nn.Conv3d)


# ---------------------------------------------------------------------------------------------
# VQ and QPM on 3D token grids
# ---------------------------------------------------------------------------------------------


def test_vq_quantizes_3d_token_grids_like_their_flattened_2d_view() -> None:
    """Tokens are the vectors at each voxel: a D x H x W grid quantizes, and passes gradients back,
    exactly as the (D*H) x W image of the same tokens."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64, chunk_size=16, cosine=True)
    z = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    z2d = z.detach().reshape(2, 8, 12, 5).requires_grad_(True)
    out, flat = vq(z), vq(z2d)
    assert out.indices.shape == out.used_indices.shape == (2, 3, 4, 5) and out.quantized.shape == z.shape
    assert torch.equal(out.indices.reshape(2, 12, 5), flat.indices)
    torch.testing.assert_close(out.quantized, vq.codebook.detach()[out.indices].movedim(-1, 1))
    torch.testing.assert_close(out.loss, flat.loss)
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().add(out.loss).backward()
    (flat.quantized * upstream.reshape(2, 8, 12, 5)).sum().add(flat.loss).backward()
    torch.testing.assert_close(z.grad.reshape(2, 8, 12, 5), z2d.grad)


def test_vq_straight_through_is_the_identity_without_cosine_and_sees_3d_indices() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 64)
    z = torch.randn(2, 8, 2, 3, 4, requires_grad=True)
    seen = []
    out = vq(z, perturb=lambda indices, codebook: seen.append(indices.shape) or (indices + 1) % 64)
    assert seen == [(2, 2, 3, 4)]
    torch.testing.assert_close(out.quantized, vq.codebook.detach()[(out.indices + 1) % 64].movedim(-1, 1))
    upstream = torch.randn_like(z)
    out.quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)


def test_qpm_jump_law_is_token_by_token_whatever_the_grid() -> None:
    codebook = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    indices = torch.randint(0, 32, (2, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    grid = perturb_indices(indices, codebook, 0.7, generator=torch.Generator().manual_seed(2))
    flat = perturb_indices(indices.flatten(), codebook, 0.7, generator=torch.Generator().manual_seed(2))
    assert grid.shape == indices.shape and torch.equal(grid.flatten(), flat)


def test_qpm_shuffle_permutes_within_each_volume_across_its_slices() -> None:
    indices = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)  # every position its own index
    shuffled = shuffle_indices(indices, 1.0, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        assert sorted(shuffled[b].flatten().tolist()) == indices[b].flatten().tolist()  # the volume's multiset
    moved_slice = (shuffled // 16 % 3) != torch.arange(3).view(1, 3, 1, 1)
    assert moved_slice.float().mean() > 0.5  # tokens travel between slices, not only within one
    assert torch.equal(QPM(eps=0.0, mode="shuffle")(indices, torch.zeros(1, 1)), indices)


def test_factorized_quantizer_in_3d_uses_3d_norm_and_1x1x1_convs() -> None:
    quantizer = FactorizedQuantizer(16, 4, 64, 0.25, cosine=True, center=True, dims=3)
    assert isinstance(quantizer.center, nn.BatchNorm3d) and not quantizer.center.affine
    assert isinstance(quantizer.down, nn.Conv3d) and quantizer.down.kernel_size == (1, 1, 1)
    out = quantizer(torch.randn(2, 16, 2, 3, 3))
    assert out.quantized.shape == (2, 16, 2, 3, 3) and out.indices.shape == (2, 2, 3, 3)


# ---------------------------------------------------------------------------------------------
# VQ-Seg's network on unet3d
# ---------------------------------------------------------------------------------------------


def test_vq_net_on_unet3d_quantizes_the_deepest_level_decodes_and_reconstructs(monkeypatch) -> None:
    base = tiny_unet3d()
    net = VQSegNet(base, 1, [-1], 64, 0.25, reconstruct=True, cosine=True, code_dim=4).train()
    x = torch.rand(2, 1, 4, 8, 8)
    features = base.encode(x).levels
    quantized = net.quantizers["2"](features[2])
    decoded = []
    decode = base.decode
    monkeypatch.setattr(base, "decode", lambda f: decoded.append(list(f.levels)) or decode(f))
    fwd = net.run(x, reconstruct=True)
    assert quantized.indices.shape == (2, 2, 2, 2)  # the 4 x 8 x 8 patch pooled by [1, 2, 2] then [2, 2, 2]
    torch.testing.assert_close(decoded[0][2], quantized.quantized)
    for level in (0, 1):
        torch.testing.assert_close(decoded[0][level], features[level])
    torch.testing.assert_close(fwd.post_vq, quantized.quantized)
    assert fwd.logits.shape == (2, 2, 4, 8, 8) and fwd.recon.shape == x.shape
    upsamples = [m.scale_factor for m in net.recon_decoder if isinstance(m, nn.Upsample)]
    assert upsamples == [(2.0, 2.0, 2.0), (1.0, 2.0, 2.0)]  # the pooling undone, deepest first
    assert all(not isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in net.modules())
    (fwd.logits.mean() + fwd.recon.mean() + fwd.vq_loss).backward()
    assert base.encoder.stem[0][0].weight.grad.abs().sum() > 0

    dropped = net.run(x, perturb=QPM(0.5, generator=torch.Generator().manual_seed(0)), dropout=0.5)
    assert dropped.logits.shape == (2, 2, 4, 8, 8)
    channels = decoded[-1][2].flatten(2)
    assert ((channels == 0).all(dim=2)).any()  # whole 3D channels dropped
