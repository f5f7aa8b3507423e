"""Each method's recipe on 3D tensors (B x C x D x H x W, the patch mode of ``unet3d``).

The same spies as the 2D recipe tests (``test_peer_methods.Recorder`` / ``AugSpy``,
``test_vqseg_method.StepRecorder``) record one training step on 5D batches of phantom patches;
each loss is then rebuilt by hand from the recorded outputs with the method's formula. The
reference losses below flatten every voxel of the volume (``voxels``), so a loss computed over one
slice, a CutMix or BCP box that is constant along depth, Dropout2d on 5D maps, a 2D
largest-component filter or a 2D token grid all change a number these tests compare.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (the first optimiser imports it lazily, ~1.7 s: paid at collection, not by a test)
from conftest import tiny_config
from scipy import ndimage
from test_peer_methods import AugSpy, Recorder, _record_boxes, check_ema_step, close, ramp, same_state, state
from test_vqseg_method import StepRecorder
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.data.patches import PatchSampler
from vqseg.data.phantom import make_cases
from vqseg.methods import unimatch as unimatch_module
from vqseg.methods.base import Batch, Method
from vqseg.methods.bcp import largest_components
from vqseg.run import build_run_method

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4
PATCH = (4, 24, 24)  # D x H x W; unet3d [4, 8] with its default [2, 2, 2] pooling: a 2 x 12 x 12 bottleneck
BOTTLENECK = (2, 12, 12)
UNET3D = {"model.name": "unet3d", "model.channels": [4, 8], "model.dropout": [0, 0], "train.patch_size": list(PATCH)}


def phantom_patches(seed: int, prefix: str):
    """Four D x H x W patches of one phantom case, each centred on foreground (structure in every patch)."""
    volume = make_cases(seed, 1, prefix)[0]
    image = torch.from_numpy(volume.image).transpose(0, 1)  # D x C x H x W -> C x D x H x W
    return PatchSampler([image], [torch.from_numpy(volume.label)], PATCH, 4, seed, foreground_oversample=1.0).next()


@pytest.fixture(scope="module")
def batch() -> Batch:
    labeled, unlabeled = phantom_patches(11, "lab"), phantom_patches(12, "unl")
    assert labeled.images.shape == (4, 1, *PATCH)
    return Batch(labeled.images, labeled.labels.long(), unlabeled.images)


def build(name: str, **overrides: object) -> Method:
    """A method on the tiny unet3d, seeded; ``a__b=v`` overrides ``a.b``."""
    torch.manual_seed(0)
    values = {**UNET3D, "method.name": name, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return build_run_method(tiny_config(**values), in_channels=1, num_classes=CLASSES).train()


# ---------------------------------------------------------------------------------------------
# Reference losses over every voxel of the volume
# ---------------------------------------------------------------------------------------------


def voxels(logits: Tensor) -> Tensor:
    """N x K x D x H x W -> (N D H W) x K: one row per voxel of every volume."""
    assert logits.dim() == 5 and logits.shape[2:] == PATCH, logits.shape
    return logits.detach().float().movedim(1, -1).reshape(-1, logits.shape[1])


def ref_ce(logits: Tensor, target: Tensor, keep: Tensor | None = None, normalise: str = "confident") -> Tensor:
    ce = F.cross_entropy(voxels(logits), target.reshape(-1), reduction="none")
    if keep is None:
        return ce.mean()
    kept = keep.reshape(-1).float()
    return (ce * kept).sum() / (kept.sum().clamp(min=1) if normalise == "confident" else kept.numel())


def ref_dice(logits: Tensor, target: Tensor, keep: Tensor | None = None) -> Tensor:
    """SSL4MIS's soft Dice: sums over every voxel of the batch per class, squared denominators."""
    probs, onehot = voxels(logits).softmax(1), F.one_hot(target.reshape(-1), CLASSES).float()
    if keep is not None:
        probs, onehot = probs * keep.reshape(-1, 1), onehot * keep.reshape(-1, 1)
    inter, denom = (probs * onehot).sum(0), (probs**2).sum(0) + (onehot**2).sum(0)
    return 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


def ref_seg(logits: Tensor, target: Tensor, keep: Tensor | None = None) -> Tensor:
    """(CE + Dice) / 2 over the kept voxels."""
    return 0.5 * (ref_ce(logits, target, keep) + ref_dice(logits, target, keep))


def assert_3d_boxes(box: Tensor, expect_depth_varies: bool = True) -> None:
    """N x D x H x W boxes: each a cuboid (the outer product of its three contiguous projections), and
    some not spanning every slice (a 2D box repeated along depth always does)."""
    assert box.dtype == torch.bool and box.shape[1:] == PATCH, box.shape
    partial_depth = 0
    for b in box:
        if not b.any():
            continue
        extents = [b.any(dim=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
        for extent in extents:
            where = extent.nonzero().flatten()
            assert int(where[-1] - where[0]) + 1 == len(where)  # contiguous
        assert torch.equal(b, extents[0][:, None, None] & extents[1][None, :, None] & extents[2][None, None, :])
        partial_depth += not bool(extents[0].all())
    assert (partial_depth > 0) == expect_depth_varies


def largest_components_reference(labels: Tensor, connectivity: int) -> Tensor:
    """The largest ``connectivity``-connected (6, 18 or 26) component of each foreground class per volume."""
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    out = np.zeros_like(labels.numpy())
    for volume, kept in zip(labels.numpy(), out):
        for c in range(1, CLASSES):
            components, count = ndimage.label(volume == c, structure)
            if count:
                kept[components == np.bincount(components.ravel())[1:].argmax() + 1] = c
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Supervised
# ---------------------------------------------------------------------------------------------


def test_supervised_recipe_3d(batch: Batch) -> None:
    """The labelled volumes warped by one 3D affine each; (CE + Dice)/2 over every voxel."""
    method = build("supervised")
    calls, aug = Recorder(method), AugSpy(method)
    out = method.training_step(batch, 0)
    ((images, labels),), ((x_l, y_l, theta),) = aug.geometric_inputs, aug.geometric
    assert images is batch.labeled and labels is batch.labels
    assert theta.shape == (4, 3, 4) and y_l.shape == (4, *PATCH) and not torch.equal(y_l, batch.labels)
    (enc,), (dec,) = calls("student", "encoder"), calls("student", "decoder")
    assert torch.equal(enc.input, x_l) and enc.training and enc.grad
    assert [level.shape[2:] for level in enc.output] == [PATCH, BOTTLENECK]
    close(out.loss, ref_seg(dec.output, y_l))


# ---------------------------------------------------------------------------------------------
# Mean Teacher
# ---------------------------------------------------------------------------------------------


def test_mean_teacher_recipe_3d(batch: Batch) -> None:
    """Student: labelled + weak unlabelled volumes in one pass; teacher (eval, no grad): the weak
    volumes plus clipped Gaussian noise; L = L_sup + w(t) MSE over every voxel of the softmaxes."""
    method = build("mean_teacher", method__consistency=10.0, method__consistency_rampup=0.5, train__iterations=100)
    calls, aug = Recorder(method), AugSpy(method)
    teacher_before = state(method.teacher)
    step = 30
    out = method.training_step(batch, step)

    assert [x for x, _ in aug.geometric_inputs] == [batch.labeled, batch.unlabeled]
    (x_l, y_l, _), (u, _, theta_u) = aug.geometric
    assert theta_u.shape == (4, 3, 4)
    (s_enc,), (s_dec,) = calls("student", "encoder"), calls("student", "decoder")
    (t_enc,), (t_dec,) = calls("teacher", "encoder"), calls("teacher", "decoder")
    assert torch.equal(s_enc.input, torch.cat([x_l, u])) and s_enc.training and s_enc.grad
    assert not t_enc.training and not t_enc.grad
    noise = t_enc.input - u
    assert noise.shape == (4, 1, *PATCH) and noise.abs().max() <= 0.2 + 1e-6 and 0.05 < noise.std() < 0.12
    assert all(noise[:, :, d].std() > 0.05 for d in range(PATCH[0]))  # every slice its own draw
    assert same_state(teacher_before, state(method.teacher))

    weight = 10.0 * ramp(step, 100, 0.5)
    consistency = ((voxels(s_dec.output[4:]).softmax(1) - voxels(t_dec.output).softmax(1)) ** 2).mean()
    close(out.logs["consistency_weight"], torch.tensor(weight))
    close(out.loss, ref_seg(s_dec.output[:4], y_l) + weight * consistency)


@pytest.mark.parametrize("step", [3, 200])  # warm-up a = 1 - 1/(step+1), then the decay 0.99
@pytest.mark.parametrize(
    "name, overrides",
    [("mean_teacher", {}), ("bcp", {"method.pretrain_iterations": 0}),
     ("vqseg", {"method.foundation": "none", "method.codebook_size": 64})],
)
def test_teacher_is_the_ema_of_the_3d_student(name: str, overrides: dict, step: int, batch: Batch) -> None:
    """After the optimiser step, theta_t <- a theta_t + (1 - a) theta_s for every float tensor of the
    3D networks (Conv3d, instance norm, VQ); integer buffers are copied."""
    student = check_ema_step(build(name, **overrides), batch, step)
    assert any(v.dim() == 5 for v in student.values())  # Conv3d weights


# ---------------------------------------------------------------------------------------------
# UniMatch
# ---------------------------------------------------------------------------------------------


def _unimatch_run(batch: Batch, monkeypatch: pytest.MonkeyPatch, threshold: float):
    method = build("unimatch", aug__cutmix_prob=1.0)
    method.params.conf_thresh = threshold
    calls, aug = Recorder(method), AugSpy(method)
    views, dropout3d = [], []
    for name in ("make_unlabeled_views", "strong_view"):
        original = getattr(unimatch_module, name)

        def spy(*args, original=original, **kwargs):
            views.append(original(*args, **kwargs))
            return views[-1]

        monkeypatch.setattr(unimatch_module, name, spy)
    real_dropout3d = F.dropout3d
    monkeypatch.setattr(F, "dropout3d", lambda x, *a, **k: dropout3d.append(x.shape) or real_dropout3d(x, *a, **k))
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Dropout2d on a 5D map warns (and is deprecated)
        out = method.training_step(batch, 0)
    return method, out, calls, aug, views, dropout3d


def test_unimatch_recipe_3d(batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """One weak pass gives thresholded pseudo-labels; two strong views, each with its own intensity
    draw and a 3D CutMix box, learn them mixed by their box; the weak volumes' encoder levels with
    Dropout3d(0.5) (whole 3D channels) learn them unmixed; L = (L_x + 0.25 (L_s1 + L_s2) + 0.5 L_fp) / 2."""
    probe = _unimatch_run(batch, monkeypatch, 0.95)[2]
    threshold = voxels(probe("student", "decoder")[0].output[4:]).softmax(1).amax(1).median().item()
    monkeypatch.undo()
    method, out, calls, aug, views, dropout3d = _unimatch_run(batch, monkeypatch, threshold)
    v1, v2 = views
    (x_l, y_l, _), (u, _, _) = aug.geometric
    assert torch.equal(v1.weak, u) and v2.weak is v1.weak
    assert v1.box.flatten(1).any(1).all() and v2.box.flatten(1).any(1).all()  # cutmix_prob 1
    assert_3d_boxes(torch.cat([v1.box, v2.box]))
    for view, (source, intensity) in zip(views, aug.intensity, strict=True):
        assert source is v1.weak
        assert torch.equal(view.strong, torch.where(view.box[:, None], intensity[view.perm], intensity))

    encs, decs = calls("student", "encoder"), calls("student", "decoder")
    assert len(encs) == 2 and len(decs) == 3
    clean, strong = encs
    assert torch.equal(clean.input, torch.cat([x_l, v1.weak]))
    assert torch.equal(strong.input, torch.cat([v1.strong, v2.strong]))

    # Feature perturbation: every 3D channel of the weak rows' levels dropped whole or scaled by 2.
    assert dropout3d == [level[4:].shape for level in clean.output]
    dropped = []
    for fp, feature in zip(decs[1].input, clean.output):
        assert fp.dim() == 5
        kept = fp.flatten(2).abs().sum(-1) > 0
        close(fp, 2 * feature[4:] * kept[..., None, None, None])
        dropped.append(1 - kept.float().mean())
    assert 0.2 < torch.stack(dropped).mean() < 0.8

    logits_x, logits_w = decs[0].output.split([4, 4])
    confidence, pseudo = voxels(logits_w).softmax(1).max(1)
    pseudo, ignore = pseudo.view(4, *PATCH), (confidence < threshold).view(4, *PATCH)
    assert 0.2 < ignore.float().mean() < 0.8
    logits_s1, logits_s2 = decs[2].output.chunk(2)

    def mixed(view, target: Tensor) -> Tensor:  # the partner's target inside the view's 3D box
        return torch.where(view.box, target[view.perm], target)

    loss_s1 = ref_dice(logits_s1, mixed(v1, pseudo), ~mixed(v1, ignore))
    loss_s2 = ref_dice(logits_s2, mixed(v2, pseudo), ~mixed(v2, ignore))
    loss_fp = ref_dice(decs[1].output, pseudo, ~ignore)
    close(out.loss, (ref_seg(logits_x, y_l) + 0.25 * (loss_s1 + loss_s2) + 0.5 * loss_fp) / 2)
    close(out.logs["mask_ratio"], (~ignore).float().mean())


# ---------------------------------------------------------------------------------------------
# BCP
# ---------------------------------------------------------------------------------------------


def region_loss(logits: Tensor, target: Tensor, box: Tensor, w_outside: float, w_inside: float) -> Tensor:
    """BCP's mix_loss: (CE + Dice)/2 over the voxels outside the box and over those inside, each weighted."""
    return w_outside * ref_seg(logits, target, ~box) + w_inside * ref_seg(logits, target, box)


def assert_bcp_box(box: Tensor) -> None:
    """One 3D box for the whole batch, each side int(2/3 of the patch's): 2 of 4 slices, 16 of 24 rows
    and columns."""
    assert box.shape == (2, *PATCH) and torch.equal(box[0], box[1])
    assert_3d_boxes(box[:1])
    assert [int(box[0].any(dim=tuple(a for a in range(3) if a != axis)).sum()) for axis in range(3)] == [2, 16, 16]
    assert box.float().mean() == pytest.approx(2 / 4 * (16 / 24) ** 2)


def test_bcp_pretraining_recipe_3d(batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """x = x_a outside the 3D box, x_b inside; targets likewise; both regions weigh 1; no teacher."""
    method = build("bcp", method__pretrain_iterations=3)
    boxes, calls, aug = _record_boxes(monkeypatch), Recorder(method), AugSpy(method)
    out = method.training_step(batch, 0)
    (box,), ((x_l, y_l, _),) = boxes, aug.geometric
    assert_bcp_box(box)
    (enc,), (dec,) = calls("student", "encoder"), calls("student", "decoder")
    assert torch.equal(enc.input, torch.where(box[:, None], x_l[2:], x_l[:2]))
    assert not calls("teacher", "encoder")
    close(out.loss, region_loss(dec.output, torch.where(box, y_l[2:], y_l[:2]), box, 1.0, 1.0))


def test_bcp_self_training_recipe_3d(batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher (eval, no grad) labels the weak unlabelled volumes, largest 26-connected component per
    class; x_unl = u_a outside + x_a inside the 3D box, x_lab = x_b outside + u_b inside;
    pseudo-labelled voxels weigh u_weight, ground-truth voxels 1."""
    method = build("bcp", method__pretrain_iterations=0, method__u_weight=0.3)
    blocks = torch.randn(4, CLASSES, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    # Teacher logits of random 2 x 4 x 4 blocks: every class in several components, touching by
    # faces, edges and corners, so that the filter and its connectivity change many pseudo-labels.
    method.teacher.head.register_forward_hook(lambda m, i, o: F.interpolate(blocks, size=o.shape[-3:]))
    boxes, calls, aug = _record_boxes(monkeypatch), Recorder(method), AugSpy(method)
    teacher_before = state(method.teacher)
    out = method.training_step(batch, 0)
    (box,), ((x_l, y_l, _), (u, _, _)) = boxes, aug.geometric
    assert_bcp_box(box)
    (t_enc,), (t_dec,) = calls("teacher", "encoder"), calls("teacher", "decoder")
    assert torch.equal(t_enc.input, u) and not t_enc.training and not t_enc.grad
    assert same_state(teacher_before, state(method.teacher))
    raw = t_dec.output.argmax(1)
    pseudo = largest_components_reference(raw, 26)
    assert (pseudo != raw).float().mean() > 0.15
    assert (pseudo != largest_components_reference(raw, 6)).float().mean() > 0.3  # connectivity matters here

    (enc,), (dec,) = calls("student", "encoder"), calls("student", "decoder")
    assert enc.training and enc.grad
    b = box[:, None]
    assert torch.equal(enc.input, torch.cat([torch.where(b, x_l[:2], u[:2]), torch.where(b, u[2:], x_l[2:])]))
    logits_unl, logits_lab = dec.output.chunk(2)
    expected = region_loss(logits_unl, torch.where(box, y_l[:2], pseudo[:2]), box, 0.3, 1.0) + region_loss(
        logits_lab, torch.where(box, pseudo[2:], y_l[2:]), box, 1.0, 0.3
    )
    close(out.loss, expected)


def test_bcp_largest_component_is_26_connected_in_3d() -> None:
    """Class 1: a 4-voxel block in slice 0 continued by a chain of three voxels that touch only by
    corners (one per slice), against a 5-voxel bar in slice 4. 26-connected, block + chain (7) is the
    largest and the bar goes; 6- or 18-connected, or slice by slice, the bar would stay."""
    labels = torch.zeros(1, 5, 5, 5, dtype=torch.long)
    labels[0, 0, 0:2, 0:2] = 1
    for k in (1, 2, 3):
        labels[0, k, k + 1, k + 1] = 1  # (1, 2, 2), (2, 3, 3), (3, 4, 4): corner neighbours only
    labels[0, 4, 0, 0:5] = 1
    labels[0, 2, 0, 4] = 2  # class 2: two single voxels touching by an edge (18- and 26-connected)
    labels[0, 3, 1, 4] = 2
    labels[0, 4, 4, 0] = 2  # and a lone voxel far away, dropped
    expected = labels.clone()
    expected[0, 4, 0, 0:5] = 0
    expected[0, 4, 4, 0] = 0
    assert torch.equal(largest_components_reference(labels, 26), expected)
    assert not torch.equal(largest_components_reference(labels, 6), expected)
    assert not torch.equal(largest_components_reference(labels, 18), expected)
    assert torch.equal(largest_components(labels, CLASSES), expected)


# ---------------------------------------------------------------------------------------------
# CPS
# ---------------------------------------------------------------------------------------------


def test_cps_recipe_3d(batch: Batch) -> None:
    """Both networks see the same weak volumes; each learns the labels and the other's argmax, voxel by voxel."""
    method = build("cps", method__consistency=10.0, method__consistency_rampup=0.5, train__iterations=100)
    calls, aug = Recorder(method), AugSpy(method)
    step = 30
    out = method.training_step(batch, step)
    (x_l, y_l, _), (u, _, _) = aug.geometric
    (enc_1,), (dec_1,) = calls("student", "encoder"), calls("student", "decoder")
    (enc_2,), (dec_2,) = calls("peer", "encoder"), calls("peer", "decoder")
    for enc in (enc_1, enc_2):
        assert torch.equal(enc.input, torch.cat([x_l, u])) and enc.training and enc.grad
    u_1, u_2 = dec_1.output[4:], dec_2.output[4:]
    argmax_1, argmax_2 = voxels(u_1).argmax(1), voxels(u_2).argmax(1)
    assert not torch.equal(argmax_1, argmax_2)
    weight = 10.0 * ramp(step, 100, 0.5)
    cross = F.cross_entropy(voxels(u_1), argmax_2) + F.cross_entropy(voxels(u_2), argmax_1)
    close(out.loss, ref_seg(dec_1.output[:4], y_l) + ref_seg(dec_2.output[:4], y_l) + weight * cross)


def test_cps_initialises_the_3d_networks_kaiming_and_xavier() -> None:
    method = build("cps", model__channels=[8, 16], model__dropout=[0, 0])
    kaiming, xavier = (lambda i, o: math.sqrt(2 / i)), (lambda i, o: math.sqrt(2 / (i + o)))
    for net, expected_std in ((method.student, kaiming), (method.peer, xavier)):
        convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.weight.numel() > 1000]
        assert len(convs) >= 3
        for conv in convs:
            fan_in, fan_out = conv.weight[0].numel(), conv.weight[:, 0].numel()
            assert conv.weight.std().item() == pytest.approx(expected_std(fan_in, fan_out), rel=0.15)


# ---------------------------------------------------------------------------------------------
# VQ-Seg
# ---------------------------------------------------------------------------------------------

VQSEG = {"method.foundation": "none", "method.codebook_size": 64, "method.threshold": 0.6, "method.lambda_u": 0.7,
         "method.u_rampup": 0.5, "method.lambda_rec": 0.3, "method.lambda_vq": 0.6, "aug.cutmix_prob": 1.0}
CENTRES = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 4, 1, 1, 1)


def banded_teacher(module, inputs, output):
    """The teacher's argmax follows its input's intensity, unconfident between the bands, so that
    CutMix and the threshold both change the targets."""
    return output + (-30 * (inputs[0][:, :1] - CENTRES) ** 2)


def test_vqseg_recipe_3d(batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher (unperturbed) labels the weak volumes; targets CutMixed by 3D boxes and
    thresholded; the student's clean pass quantizes every token of its 2 x 12 x 12 bottleneck with
    the nearest code, the strong pass perturbs those codes with QPM; L = L_sup + lambda_u ramp L_u
    (CE over all voxels) + lambda_vq L_vq + lambda_rec L1(reconstruction of the clean volumes)."""
    method = build("vqseg", **VQSEG)
    method.teacher.register_forward_hook(banded_teacher)
    rec = StepRecorder(method, monkeypatch)
    bottlenecks = []
    method.student.base.encoder.register_forward_hook(lambda m, i, o: bottlenecks.append(o.levels[-1].detach()))
    out = method.training_step(batch, 1)

    (_, _, x_l, y_l, theta_l), = rec.labeled
    views, = rec.views
    (t_in, t_out), = rec.teacher
    clean, perturbed = rec.runs
    assert theta_l.shape == (4, 3, 4)
    assert_3d_boxes(views.box)
    assert torch.equal(t_in, views.weak)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher(views.weak), t_out)  # deterministic: no QPM in the teacher
    assert torch.equal(clean.x, torch.cat([x_l, views.weak])) and clean.perturb is None and clean.reconstruct
    assert torch.equal(perturbed.x, views.strong) and perturbed.perturb is method.perturb and not perturbed.reconstruct

    quantizer = method.student.quantizers["1"]
    codebook = quantizer.vq.codebook.detach()
    for run, bottleneck in zip((clean, perturbed), bottlenecks, strict=True):
        codes = run.out.codes["1"]
        assert bottleneck.shape[2:] == BOTTLENECK and codes.indices.shape == (len(run.x), *BOTTLENECK)
        with torch.no_grad():
            tokens = F.normalize(quantizer.down(bottleneck).movedim(1, -1).reshape(-1, codebook.shape[1]), dim=1)
        distances = torch.cdist(tokens, codebook)  # every token of the 3D grid takes its nearest code
        chosen = distances.gather(1, codes.indices.reshape(-1, 1)).squeeze(1)
        torch.testing.assert_close(chosen, distances.amin(1), atol=1e-5, rtol=0)
        expected_map = quantizer.up(F.embedding(codes.used_indices, codebook).movedim(-1, 1))
        torch.testing.assert_close(run.out.post_vq, expected_map, atol=1e-5, rtol=1e-5)
    assert torch.equal(clean.out.codes["1"].used_indices, clean.out.codes["1"].indices)
    moved = perturbed.out.codes["1"].used_indices != perturbed.out.codes["1"].indices
    assert 0.5 < moved.float().mean() < 0.9  # eps = 0.7, jumps never stay
    assert moved.any(dim=(0, 2, 3)).all()  # on every depth of the token grid

    confidence, labels = voxels(t_out).softmax(1).max(1)
    labels, ignore = labels.view(4, *PATCH), (confidence < 0.6).view(4, *PATCH)
    pseudo, ignore = (torch.where(views.box, t[views.perm], t) for t in (labels, ignore))
    assert 0 < ignore.float().mean() < 1 and len(pseudo.unique()) > 2
    assert clean.out.recon.shape == clean.x.shape
    loss_sup = ref_seg(clean.out.logits[:4], y_l)
    loss_u = ref_ce(perturbed.out.logits, pseudo, ~ignore, normalise="valid")
    loss_vq = 0.5 * (clean.out.vq_loss + perturbed.out.vq_loss)
    loss_rec = (clean.out.recon - clean.x).abs().mean()
    lambda_u = 0.7 * ramp(1, 6, 0.5)
    close(out.logs["loss_u"], loss_u)
    close(out.loss, loss_sup + lambda_u * loss_u + 0.6 * loss_vq + 0.3 * loss_rec)


@pytest.mark.parametrize(
    "overrides",
    [
        {"method.perturbation": "dropout"},
        {"method.perturbation": "shuffle"},
        {"method.class_thresholds": True, "method.u_class_balance": True, "method.anchor_labeled": True},
        {"method.dist_align": True},
    ],
)
def test_vqseg_options_train_on_3d_batches(overrides: dict, batch: Batch) -> None:
    """The other perturbations and the drift remedies take 5D batches: a finite loss whose
    gradient reaches the 3D encoder."""
    method = build("vqseg", **{**VQSEG, **overrides})
    out = method.training_step(batch, 1)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert method.student.base.encoder.stem[0][0].weight.grad.abs().sum() > 0
