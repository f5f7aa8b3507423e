"""VQ-Seg's recipe, pinned where `test_vqseg_method.py` leaves it open: the documented defaults and
presets, every setting reaching the part it configures, the PFA targets of each row (split, slice
index and affine), the reconstruction target with provenance channels, which pass PDCR reads, how
gradients reach each branch, the EMA warm-up, and the building blocks' laws (the quantized network's
levels and dropout, QPM's hook and statistics, the cosine quantizer, the patch InfoNCE) computed
from first principles on tiny inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from test_vqseg_method import RECIPE, FakeFoundation, StepRecorder
from torch import nn
from torch.nn import functional as F

from vqseg.data.phantom import make_cases
from vqseg.data.provenance import add_provenance
from vqseg.data.volumes import SegmentationData, stack_slices
from vqseg.methods.base import Batch
from vqseg.methods.vqseg import ABLATIONS, VQSeg
from vqseg.models.vq_net import VQForward, VQSegNet
from vqseg.modules.qpm import DEFAULT_TEMPERATURE, NEAR_FRACTION, QPM, jump_stats
from vqseg.modules.vq import VectorQuantizer, VQOutput
from vqseg.run import build_network, build_run_method

pytestmark = pytest.mark.usefixtures("one_thread")

CENTRES = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 4, 1, 1)


def banded_teacher(module, inputs, output):
    """The teacher's argmax follows the image channel's intensity (provenance channels ignored),
    unconfident between the bands, so that CutMix and the threshold both change the targets."""
    return output + (-30 * (inputs[0][:, :1] - CENTRES) ** 2)


class VariedFoundation(FakeFoundation):
    """A frozen 'foundation model' whose 8 channels respond differently to intensity, so that its
    feature directions vary over locations (the repeated channels of `FakeFoundation` all point one
    way, which leaves the InfoNCE flat and its gradients at rounding level)."""

    name = "varied"

    def cache_key(self) -> str:
        return "varied"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images, self.grid)
        return torch.cat([torch.sin(6 * pooled + k) for k in range(self.dim)], dim=1)


@pytest.fixture
def recipe_data() -> SegmentationData:
    """12 labelled and 12 unlabelled slices from different phantoms, so their caches differ."""
    cases = make_cases(0, 2, "t")
    unlabeled = stack_slices(make_cases(1, 2, "u"), 32, keep_labels=False)
    return SegmentationData(stack_slices(cases, 32, keep_labels=True), unlabeled, cases, 4, ["RV", "Myo", "LV"], 1)


def build(data, monkeypatch, tmp_path, in_channels: int = 1, **overrides) -> VQSeg:
    import vqseg.modules.foundation as foundation

    monkeypatch.setattr(foundation, "build_foundation", lambda *a, **k: VariedFoundation())
    cfg = tiny_config(**{"method.name": "vqseg", "method.codebook_size": 64, "method.foundation_cache": str(tmp_path),
                         **overrides})
    method = build_run_method(cfg, in_channels, 4)
    method.prepare(data)
    return method.train()


LABELED_INDEX, UNLABELED_INDEX = torch.tensor([3, 0, 5, 1]), torch.tensor([6, 2, 7, 11])


def step(data, monkeypatch, tmp_path, at: int = 1, provenance: bool = False, setup=None, **overrides):
    """One recorded training step on labelled slices 3, 0, 5, 1 and unlabelled slices 6, 2, 7, 11;
    ``setup(method)`` runs before it."""
    torch.manual_seed(0)
    method = build(data, monkeypatch, tmp_path, 5 if provenance else 1, **{**RECIPE, **overrides})
    if setup is not None:
        setup(method)
    method.teacher.register_forward_hook(banded_teacher)
    rec = StepRecorder(method, monkeypatch)
    li, ui = LABELED_INDEX, UNLABELED_INDEX
    x_l, x_u = data.labeled.images[li], data.unlabeled.images[ui]
    if provenance:  # as the trainer sends them for a frozen encoder: bank rows after the image channel
        x_l, x_u = add_provenance(x_l, li), add_provenance(x_u, ui + len(data.labeled.images))
    b = Batch(x_l, data.labeled.labels[li].long(), x_u, li, ui)
    return method, rec, b, method.training_step(b, at)


def ramp(at: int, iterations: int = 6, length: float = 0.5) -> float:
    """Laine & Aila's sigmoid ramp-up exp(-5 (1 - t)^2), t = progress / length."""
    return math.exp(-5 * (1 - min(at / iterations / length, 1.0)) ** 2)


def pseudo_labels(teacher_out, views, threshold):
    """The teacher's confident argmax, CutMixed like the strong view (box from partner perm[i])."""
    confidence, labels = teacher_out.softmax(dim=1).max(dim=1)
    ignore = confidence < threshold
    return tuple(torch.where(views.box, t[views.perm], t) for t in (labels, ignore))


def warp(features, theta):
    grid = F.affine_grid(theta, list(features.shape), align_corners=False)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------------------------
# Defaults, presets, and every setting reaching its part
# --------------------------------------------------------------------------------------------

DEFAULTS = dict(
    ablation="", perturbation="qpm", eps=0.7, temperature=0.2, dropout=0.5, codebook_size=16384, vq_levels=[-1],
    beta=0.25, cosine=True, code_dim=32, vq_center=False, backbone_dropout=False, dual_branch=True, pfa=True,
    foundation="litemedsam", foundation_weights="", foundation_input=0, foundation_cache="", pfa_tau=0.1,
    pfa_samples=256, ema_decay=0.99, threshold=0.95, dist_align=False, dist_align_momentum=0.99, cutmix=True,
    u_loss="ce", u_normalise="valid", lambda_u=1.0, u_rampup=0.2, lambda_rec=1.0, lambda_align=1.0, lambda_vq=1.0,
    eval_teacher=False,
)


def test_defaults_and_presets_state_the_recipe():
    method = tiny_config(**{"method.name": "vqseg"}).method
    assert {key: getattr(method, key) for key in DEFAULTS} == DEFAULTS
    assert ABLATIONS == {
        "base": {"perturbation": "none", "dual_branch": False, "pfa": False},
        "qpm": {"perturbation": "qpm", "dual_branch": False, "pfa": False},
        "qpm_db": {"perturbation": "qpm", "dual_branch": True, "pfa": False},
        "qpm_pfa": {"perturbation": "qpm", "dual_branch": False, "pfa": True},
        "all": {"perturbation": "qpm", "dual_branch": True, "pfa": True},
    }
    for name, switches in ABLATIONS.items():
        preset = tiny_config(**{"method.name": "vqseg", "method.ablation": name}).method
        assert {key: getattr(preset, key) for key in switches} == switches
    assert not tiny_config(**{"method.name": "vqseg", "method.foundation": "none"}).method.pfa
    # the building blocks' own defaults: QPM eps 0.7 at T = 0.2 nearest-neighbour units, 1 % "near"
    assert (DEFAULT_TEMPERATURE, NEAR_FRACTION) == (0.2, 0.01)
    assert QPM() == QPM(eps=0.7, temperature=0.2, mode="jump", generator=None)
    vq = VectorQuantizer(8, 32)
    assert (vq.beta, vq.cosine) == (0.25, False)
    # SimVQ: a frozen N(0, dim^-1/2) table regenerated from seed 0, times a learnable map
    table = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 8**-0.5
    assert torch.equal(vq.frozen_codebook, table)
    torch.testing.assert_close(vq.codebook, vq.mapping(table))


@pytest.mark.parametrize("custom", [False, True])
def test_every_setting_reaches_its_part(recipe_data, monkeypatch, tmp_path, custom):
    overrides = {"method.pfa": False}
    if custom:
        overrides.update({"method.beta": 0.5, "method.cosine": False, "method.code_dim": 0, "method.vq_center": True,
                          "method.eps": 0.3, "method.temperature": 0.05, "method.perturbation": "shuffle",
                          "method.dist_align": True, "method.dist_align_momentum": 0.8, "method.vq_levels": [2, -1],
                          "method.codebook_size": 48, "method.ema_decay": 0.5})
    method = build(recipe_data, monkeypatch, tmp_path, **overrides)
    net = method.student
    assert net.levels == ([2, 4] if custom else [4])
    channels = method.student.base.feature_channels
    for level in net.levels:
        q = net.quantizers[str(level)]
        assert (q.vq.beta, q.vq.cosine, q.vq.codebook_size) == ((0.5, False, 48) if custom else (0.25, True, 64))
        assert q.vq.dim == (channels[level] if custom else 32)
        assert isinstance(q.center, nn.BatchNorm2d if custom else nn.Identity)
    assert method.perturb == (QPM(0.3, 0.05, "shuffle") if custom else QPM(0.7, 0.2, "jump"))
    assert (method.align.momentum == 0.8) if custom else method.align is None
    assert method.params.ema_decay == (0.5 if custom else 0.99)


def test_pfa_is_off_only_on_the_foundation_models_own_backbone(recipe_data):
    """The backbone's name decides, not the preset: litemedsam aligned to litemedsam is degenerate."""
    cfg = tiny_config(**{"method.name": "vqseg", "method.codebook_size": 16})
    unet = tiny_config()
    factory = lambda: build_network(unet, 1, 4)  # noqa: E731 (a U-Net whatever cfg.model.name says below)
    assert VQSeg(cfg, factory, 4).use_pfa  # unet backbone, litemedsam foundation
    cfg.model.name = "litemedsam"
    assert not VQSeg(cfg, factory, 4).use_pfa
    cfg.method.foundation = "dinov2"
    assert VQSeg(cfg, factory, 4).use_pfa
    cfg.method.pfa = False
    assert not VQSeg(cfg, factory, 4).use_pfa


# --------------------------------------------------------------------------------------------
# One training step: targets, passes, weights, gradients
# --------------------------------------------------------------------------------------------


def test_pfa_targets_are_each_rows_cached_features_warped_with_its_view(recipe_data, monkeypatch, tmp_path):
    method, rec, b, out = step(recipe_data, monkeypatch, tmp_path)
    (_, _, _, _, theta_l), = rec.labeled
    views, = rec.views
    (features, target, args, kwargs, loss_align), = rec.align
    encoder = VariedFoundation()  # features of the raw slices, stored in float16 by the cache
    labeled = encoder(recipe_data.labeled.images[LABELED_INDEX]).half().float()
    unlabeled = encoder(recipe_data.unlabeled.images[UNLABELED_INDEX]).half().float()
    assert not torch.allclose(labeled, unlabeled) and not torch.allclose(theta_l, views.theta)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, torch.cat([warp(labeled, theta_l), warp(unlabeled, views.theta)]))
    assert list(args) == [0.2, 5] and list(kwargs) == ["valid"]
    assert close(out.logs["loss_align"], loss_align)
    # the warp's zero padding is not a target: valid exactly where every bilinear tap is inside the slice
    valid = kwargs["valid"]
    inside = warp(torch.ones(len(target), 1, *target.shape[2:]), torch.cat([theta_l, views.theta]))[:, 0]
    padded = (target == 0).all(dim=1)
    assert padded.any() and torch.equal(valid, inside > 0.999) and not (valid & padded).any()


def test_reconstruction_targets_the_image_channels_of_the_clean_input(recipe_data, monkeypatch, tmp_path):
    """With provenance channels after the image (frozen encoders), L1 reconstructs the image only."""
    method, rec, b, out = step(recipe_data, monkeypatch, tmp_path, provenance=True, **{"method.ablation": "qpm_db"})
    (_, _, x_l, _, _), = rec.labeled
    views, = rec.views
    clean, perturbed = rec.runs
    assert clean.x.shape[1] == 5 and torch.equal(clean.x, torch.cat([x_l, views.weak]))
    assert clean.out.recon.shape == (8, 1, 32, 32) and perturbed.out.recon is None
    expected = (clean.out.recon - clean.x[:, :1]).abs().mean()
    assert close(out.logs["loss_rec"], expected)


def close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=1e-6)


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def assert_weighted(total: list, part: list, weight: float) -> None:
    """total == weight * part, relative to the largest entry (a conv bias before batch norm gets
    only rounding noise)."""
    scale = max(g.abs().max() for g in part)
    assert scale > 0
    for t, p in zip(total, part):
        torch.testing.assert_close(t / scale, weight * p / scale, atol=1e-3, rtol=1e-3)


def test_each_branch_trains_what_it_should(recipe_data, monkeypatch, tmp_path):
    """The adapter and the reconstruction decoder learn from their own loss at its weight, and both
    losses reach the encoder through the straight-through post-VQ map."""
    import torch.nn.functional as functional

    l1_calls = []
    real_l1 = functional.l1_loss

    def spy_l1(input, target, *args, **kwargs):
        loss = real_l1(input, target, *args, **kwargs)
        l1_calls.append(loss)
        return loss

    monkeypatch.setattr(functional, "l1_loss", spy_l1)
    method, rec, b, out = step(recipe_data, monkeypatch, tmp_path)
    (_, _, _, _, loss_align), = rec.align
    loss_rec, = l1_calls
    adapter = list(method.adapter.parameters())
    decoder = list(method.student.recon_decoder.parameters())
    encoder = list(method.student.base.encoder.downs[3].parameters())
    assert_weighted(grads(out.loss, adapter), grads(loss_align, adapter), 0.4)
    assert_weighted(grads(out.loss, decoder), grads(loss_rec, decoder), 0.3)
    assert any(g.abs().sum() > 0 for g in grads(loss_align, adapter))
    assert any(g.abs().sum() > 0 for g in grads(loss_rec, decoder))
    assert any(g.abs().sum() > 0 for g in grads(loss_align, encoder))
    assert any(g.abs().sum() > 0 for g in grads(loss_rec, encoder))
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


@pytest.mark.parametrize("unlabeled", [False, True])
def test_pdcr_reads_the_clean_pass_and_on_request_the_perturbed_one(recipe_data, monkeypatch, tmp_path, unlabeled):
    """PDCR on the clean pass with the unlabelled rows ignored; with ``pdcr.unlabeled`` also on the
    perturbed pass against the pseudo-labels (unconfident pixels ignored), weighted like L_u."""
    import vqseg.methods.base as base_module

    calls = []
    real = base_module.pdcr_total_loss

    def spy(tap, labels, num_classes, cfg, ignore_index=None, generator=None, cross_proj=None):
        loss, parts = real(tap, labels, num_classes, cfg, ignore_index, generator, cross_proj)
        calls.append(SimpleNamespace(features=list(tap.features.values()), labels=labels.clone(), loss=loss))
        return loss, parts

    monkeypatch.setattr(base_module, "pdcr_total_loss", spy)
    layer_outputs = []
    pdcr = {"pdcr.layers": [{"name": "encoder.downs.1", "num_samples": 8, "weight": 0.5}], "pdcr.unlabeled": unlabeled,
            "pdcr.patch_sizes": [3]}
    def hook(method):
        method.student.base.encoder.downs[1].register_forward_hook(lambda m, i, o: layer_outputs.append(o))

    method, rec, b, out = step(recipe_data, monkeypatch, tmp_path, setup=hook, **pdcr)
    (_, _, _, y_l, _), = rec.labeled
    views, = rec.views
    (_, teacher_out), = rec.teacher
    clean_features, perturbed_features = layer_outputs
    assert clean_features.shape[0] == 8 and perturbed_features.shape[0] == 4
    assert len(calls) == (2 if unlabeled else 1)
    (features,), labels = calls[0].features, calls[0].labels
    assert features is clean_features
    assert torch.equal(labels, torch.cat([y_l, torch.full_like(y_l, 255)]))
    extra = 0.0
    if unlabeled:
        pseudo, ignore = pseudo_labels(teacher_out, views, 0.6)
        (features,), labels = calls[1].features, calls[1].labels
        assert features is perturbed_features
        assert 0 < ignore.float().mean() < 1 and torch.equal(labels, pseudo.masked_fill(ignore, 255))
        extra = 0.7 * ramp(1) * calls[1].loss
    assert not method._tap.features  # nothing captured is left behind (no stray capture of the perturbed pass)
    logs = out.logs
    total = (logs["loss_sup"] + 0.7 * ramp(1) * logs["loss_u"] + 0.6 * logs["loss_vq"] + 0.3 * logs["loss_rec"]
             + 0.4 * logs["loss_align"] + calls[0].loss + extra)
    assert close(out.loss, total)


def test_ema_update_warms_up_then_uses_the_decay(recipe_data, monkeypatch, tmp_path):
    """a = min(1 - 1 / (step + 1), ema_decay): a copy at step 0, the mean at step 1, the decay later;
    what the student does not train (the VQ code table) is left as it is."""
    method = build(recipe_data, monkeypatch, tmp_path, **{"method.pfa": False, "method.ema_decay": 0.9})
    generator = torch.Generator().manual_seed(0)
    for at, alpha in ((0, 0.0), (1, 0.5), (3, 0.75), (100, 0.9)):
        with torch.no_grad():
            for p in method.student.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
        before = [t.detach().clone() for t in method.teacher.parameters()]
        method.after_step(at)
        for old, new, s in zip(before, method.teacher.parameters(), method.student.parameters()):
            torch.testing.assert_close(new, alpha * old + (1 - alpha) * s.detach() if s.requires_grad else old)


def test_distribution_alignment_uses_the_augmented_labels_and_its_momentum(recipe_data, monkeypatch, tmp_path):
    method, rec, b, out = step(recipe_data, monkeypatch, tmp_path, **{"method.dist_align": True,
                                                                    "method.dist_align_momentum": 0.5})
    (_, _, _, y_l, _), = rec.labeled
    (_, teacher_out), = rec.teacher

    def frequencies(labels):
        return torch.bincount(labels.flatten(), minlength=4).float() / labels.numel()

    assert not torch.allclose(frequencies(y_l), frequencies(b.labels))  # the warp moves the prior here
    torch.testing.assert_close(method.align.labeled_sum, 0.5 * frequencies(y_l))
    torch.testing.assert_close(method.align.unlabeled_sum, 0.5 * teacher_out.softmax(dim=1).mean(dim=(0, 2, 3)))


# --------------------------------------------------------------------------------------------
# The quantized network
# --------------------------------------------------------------------------------------------


def tiny_net(levels=(2, -1), reconstruct=True) -> VQSegNet:
    torch.manual_seed(0)
    base = build_network(tiny_config(), 1, 4)
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return VQSegNet(base, 1, list(levels), 32, 0.25, reconstruct, True, 8).train()


def spy_decoders(net, monkeypatch):
    seen = SimpleNamespace(decode=[], recon=[])
    decode = net.base.decode

    def spy(features):
        seen.decode.append(list(features.levels))
        return decode(features)

    monkeypatch.setattr(net.base, "decode", spy)
    net.recon_decoder.register_forward_hook(lambda m, inputs, o: seen.recon.append(inputs[0]))
    return seen


def test_vq_net_quantizes_each_level_and_decodes_the_quantized_maps(monkeypatch):
    net = tiny_net()
    seen = spy_decoders(net, monkeypatch)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    features = net.base.encode(x).levels
    q2, q4 = net.quantizers["2"](features[2]), net.quantizers["4"](features[4])
    fwd = net.run(x, reconstruct=True)
    decoded, = seen.decode
    for level, expected in enumerate([features[0], features[1], q2.quantized, features[3], q4.quantized]):
        torch.testing.assert_close(decoded[level], expected)
    assert not torch.allclose(q4.quantized, features[4])
    torch.testing.assert_close(fwd.vq_loss, q2.loss + q4.loss)
    torch.testing.assert_close(fwd.perplexity, (q2.perplexity + q4.perplexity) / 2)
    torch.testing.assert_close(fwd.post_vq, q4.quantized)  # the deepest quantized map, not the encoder's
    codes = net.quantizers["4"].vq.codebook.detach()[q4.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(fwd.post_vq, net.quantizers["4"].up(codes))
    recon_input, = seen.recon  # the reconstruction decodes the quantized bottleneck
    torch.testing.assert_close(recon_input, q4.quantized)
    assert fwd.recon.shape == x.shape
    assert net.run(x).recon is None  # only when asked


def test_vq_net_dropout_drops_whole_quantized_channels_in_any_mode(monkeypatch):
    """The paper's comparison perturbation: channel dropout (rate p, survivors scaled 1 / (1 - p)) of
    every quantized map, applied even in eval mode; the plain forward never drops."""
    net = tiny_net().eval()
    seen = spy_decoders(net, monkeypatch)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    features = net.base.encode(x).levels
    torch.manual_seed(2)
    fwd = net.run(x, dropout=0.5)
    decoded, = seen.decode
    for level in (2, 4):
        quantized = net.quantizers[str(level)](features[level]).quantized
        got = decoded[level].flatten(2)
        dropped = (got == 0).all(dim=2)
        assert dropped.any() and not dropped.all()
        torch.testing.assert_close(got[~dropped], 2 * quantized.flatten(2)[~dropped])
    torch.testing.assert_close(decoded[3], features[3])
    torch.testing.assert_close(fwd.post_vq, net.quantizers["4"](features[4]).quantized)  # PFA's map is undropped
    assert torch.equal(net(x), net.run(x).logits)


def test_vq_net_code_usage_is_reset_and_jump_stats_rank_the_targets_from_their_sources():
    net = tiny_net(levels=(-1,))
    net.run(torch.rand(2, 1, 32, 32))
    assert net.code_usage()["vq4_fraction_used"] > 0
    assert net.code_usage() == {"vq4_fraction_used": 0.0, "vq4_perplexity": 1.0}

    codebook = net.quantizers["4"].vq.codebook.detach()
    dist = torch.cdist(codebook.double(), codebook.double()).fill_diagonal_(float("inf"))
    order = dist.argsort(dim=1)  # order[i, r - 1]: the r-th nearest code of i
    source = torch.arange(16)
    target = torch.cat([order[:12, 2], source[12:]])  # 12 tokens jump to their 3rd nearest code, 4 stay
    reverse = (dist[target[:12]] < dist[target[:12], source[:12]][:, None]).sum(dim=1) + 1
    assert not (reverse == 3).all()  # ranks are not symmetric: the direction matters
    codes = {"4": VQOutput(None, source.view(1, 4, 4), target.view(1, 4, 4), None, None)}
    stats = net.jump_stats(VQForward(None, None, None, None, None, codes))
    assert stats == {"vq4_jump_moved": 0.75, "vq4_jump_near_share": 0.0, "vq4_jump_rank_mean": 3.0,
                     "vq4_jump_rank_median": 3.0}


# --------------------------------------------------------------------------------------------
# QPM's hook and statistics
# --------------------------------------------------------------------------------------------


def line_codes(size: int) -> torch.Tensor:
    """Codes on a line at 0, 1, 2, ...: from code 0, code k is the k-th nearest."""
    return torch.stack([torch.arange(size, dtype=torch.float32), torch.zeros(size)], dim=1)


def test_jump_stats_near_share_and_rank_sampling_by_hand():
    # K = 251: the 1 % nearest of the 250 other codes is round(2.5) = 2 codes, rank 2 included
    codebook = line_codes(251)
    stats = jump_stats(torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 0]), codebook)
    assert stats == {"moved": 0.75, "near_share": pytest.approx(2 / 3), "rank_mean": 2.0, "rank_median": 2.0}
    # max_tokens evenly spaced moved tokens are ranked: of ranks 1, 5, 2, 7, 9 the 1st, 3rd and 5th
    stats = jump_stats(torch.zeros(6, dtype=torch.long), torch.tensor([1, 5, 0, 2, 7, 9]), codebook, max_tokens=3)
    assert (stats["rank_mean"], stats["rank_median"]) == (4.0, 2.0)


def test_qpm_hook_uses_its_own_eps_and_temperature():
    codebook = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    nearest = torch.cdist(codebook, codebook).fill_diagonal_(float("inf")).argmin(dim=1)
    indices = torch.arange(64).repeat(40)
    cold = QPM(eps=1.0, temperature=1e-3, generator=torch.Generator().manual_seed(1))(indices, codebook)
    hot = QPM(eps=1.0, temperature=100.0, generator=torch.Generator().manual_seed(1))(indices, codebook)
    assert (cold == nearest[indices]).float().mean() > 0.97  # near-ties aside, the nearest code
    assert (hot != nearest[indices]).float().mean() > 0.5 and (hot != indices).all()
    kept = QPM(eps=0.25, generator=torch.Generator().manual_seed(1))(indices, codebook) == indices
    assert abs(kept.float().mean().item() - 0.75) < 0.05


# --------------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------------


def test_codebook_learns_from_the_codebook_term_and_the_encoder_from_beta_commitment():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 16, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    tokens = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    weight = vq.mapping.weight.detach().clone().requires_grad_(True)
    codes = (vq.frozen_codebook @ weight.T)[out.indices.flatten()]
    (expected,) = torch.autograd.grad(F.mse_loss(codes, tokens), weight)  # the codebook term only, beta-free
    torch.testing.assert_close(vq.mapping.weight.grad, expected)
    commitment = 2 * 0.25 * (tokens - codes.detach()) / tokens.numel()
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 4), commitment)


def test_cosine_lookup_by_hand():
    """Cosine: tokens and codes L2-normalised; the loss and the straight-through gradient are those
    of the normalised tokens."""
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 16, beta=0.25, cosine=True)
    z = (torch.randn(2, 4, 3, 3) * 5).requires_grad_(True)
    out = vq(z)
    raw_codes = vq.mapping(vq.frozen_codebook).detach()
    tokens = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    unit = tokens / tokens.norm(dim=1, keepdim=True)
    cosine = unit @ (raw_codes / raw_codes.norm(dim=1, keepdim=True)).T
    assert torch.equal(out.indices.flatten(), cosine.argmax(dim=1))
    chosen = raw_codes[out.indices.flatten()]
    chosen = chosen / chosen.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1).reshape(-1, 4), chosen)
    torch.testing.assert_close(out.loss, 1.25 * (unit - chosen).pow(2).mean())
    upstream = torch.randn_like(z)
    out.quantized.backward(upstream)
    g = upstream.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = (g - unit * (unit * g).sum(dim=1, keepdim=True)) / tokens.norm(dim=1, keepdim=True)
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 4), expected)


def test_usage_counts_the_true_codes_of_a_perturbed_pass():
    vq = VectorQuantizer(dim=2, codebook_size=4)
    vq.frozen_codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    with torch.no_grad():
        vq.mapping.weight.copy_(torch.eye(2))
    z = torch.tensor([[0.1, 0.1], [0.1, 0.1], [1.1, 0.1], [1.1, 0.1]]).T.reshape(1, 2, 1, 4)
    out = vq(z, perturb=lambda indices, codebook: torch.full_like(indices, 3))
    assert out.used_indices.flatten().tolist() == [3, 3, 3, 3]
    torch.testing.assert_close(out.perplexity, torch.tensor(2.0))
    assert vq.code_counts.tolist() == [2, 2, 0, 0]


# --------------------------------------------------------------------------------------------
# PFA
# --------------------------------------------------------------------------------------------


def test_patch_infonce_by_hand():
    """Per image and student location i: -log softmax_j(cos(s_i, t_j) / tau) at j = i, averaged."""
    from vqseg.modules.pfa import patch_infonce

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 2, 3, generator=generator), torch.randn(2, 3, 2, 3, generator=generator)
    tau, terms = 0.5, []
    for b in range(2):
        s, t = student[b].flatten(1).T, teacher[b].flatten(1).T  # locations x channels
        for i in range(6):
            sims = torch.stack([F.cosine_similarity(s[i], t[j], dim=0) for j in range(6)]) / tau
            terms.append(-(sims[i] - torch.logsumexp(sims, dim=0)))
    torch.testing.assert_close(patch_infonce(student, teacher, tau, num_samples=None), torch.stack(terms).mean())


def test_adapter_is_a_bilinear_resize_and_a_1x1_projection():
    from vqseg.modules.pfa import PostVQAdapter

    torch.manual_seed(0)
    adapter = PostVQAdapter(3, 5, (6, 4))
    assert adapter.proj.kernel_size == (1, 1)
    x = torch.randn(2, 3, 3, 2)
    resized = F.interpolate(x, size=(6, 4), mode="bilinear", align_corners=False)
    expected = torch.einsum("oc,bchw->bohw", adapter.proj.weight[:, :, 0, 0], resized)
    torch.testing.assert_close(adapter(x), expected + adapter.proj.bias.view(1, 5, 1, 1))
