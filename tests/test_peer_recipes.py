"""Peer methods, the recipe lines test_peer_methods.py leaves open: the documented defaults, the
exact input noise of Mean Teacher, where each loss's gradient flows (CPS's two directions, the
UniMatch feature-perturbation stream), which predictions label PDCR's rows, BCP's paste box, its
largest-component filter, its choice of the pre-trained student and the start of its EMA, and
CPS's two initialisations around a pretrained backbone.

Helpers come from test_peer_methods.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from test_peer_methods import (
    CLASSES,
    AugSpy,
    Recorder,
    _record_boxes,
    batch,  # noqa: F401  (module-scoped fixture, 4 labelled + 4 unlabelled 32 x 32 slices)
    build,
    close,
    same_state,
    sgd,
    state,
    train,
)
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.config import load_config
from vqseg.data.provenance import PROVENANCE_CHANNELS
from vqseg.methods import unimatch as unimatch_module
from vqseg.methods.base import Batch, Method, seg_loss
from vqseg.methods.bcp import largest_components, paste_box
from vqseg.methods.cps import init_conv_weights
from vqseg.run import build_network, build_run_method

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The published recipes' settings
# ---------------------------------------------------------------------------------------------

RECIPES = {
    # SSL4MIS train_mean_teacher_2D.py; the ramp spans the whole run (iter // 150 over 200)
    "mean_teacher": {"ema_decay": 0.99, "consistency": 0.1, "consistency_rampup": 1.0, "noise_std": 0.1,
                     "noise_clip": 0.2, "student_noise": False},
    # UniMatch configs/acdc.yaml and model/unet.py
    "unimatch": {"conf_thresh": 0.95, "fp_dropout": 0.5, "weight_strong": 0.25, "weight_fp": 0.5},
    # SSL4MIS train_cross_pseudo_supervision_2D.py
    "cps": {"consistency": 0.1, "consistency_rampup": 1.0},
    # BCP ACDC_BCP_train.py (pre-training: a quarter of the run, resolved by the method)
    "bcp": {"pretrain_iterations": None, "u_weight": 0.5, "ema_decay": 0.99, "box_fraction": 2 / 3,
            "largest_component": True},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_defaults_are_the_published_recipe(name: str) -> None:
    params = load_config(None, [f"method.name={name}"]).method
    assert {key: getattr(params, key) for key in RECIPES[name]} == RECIPES[name]


@pytest.mark.parametrize("name", ["mean_teacher", "cps"])
def test_default_consistency_weight_ramps_over_the_whole_run(name: str, batch: Batch) -> None:
    """w(t) = 0.1 exp(-5 (1 - t / iterations)^2): lambda 0.1, ramp length = the whole run."""
    method = build(name, train__iterations=100)
    for step in (0, 25, 50, 100):
        weight = method.training_step(batch, step).logs["consistency_weight"]
        assert weight.item() == pytest.approx(0.1 * math.exp(-5 * (1 - step / 100) ** 2)), step
    flat = build(name, method__consistency_rampup=0.0, train__iterations=100)  # no ramp: lambda at once
    assert flat.training_step(batch, 0).logs["consistency_weight"].item() == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Mean Teacher: eta = clamp(0.1 n, -0.2, 0.2) on the teacher's input (and the student's own draw)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_noise", [False, True])
def test_mean_teacher_input_noise_is_clipped_gaussian(student_noise: bool, batch: Batch, monkeypatch) -> None:
    """Every Gaussian draw is replaced by a known one (3 n, so the clip matters): the teacher sees
    u + clamp(0.1 z, -0.2, 0.2); the student sees the weak view exactly, or its own draw."""
    method = build("mean_teacher", method__student_noise=student_noise)
    calls, aug = Recorder(method), AugSpy(method)
    generator, draws = torch.Generator().manual_seed(5), []

    def fake_randn_like(x: Tensor) -> Tensor:
        draws.append(3 * torch.randn(x.shape, generator=generator, dtype=x.dtype))
        return draws[-1]

    monkeypatch.setattr(torch, "randn_like", fake_randn_like)
    method.training_step(batch, 0)
    (x_l, _, _), (u, _, _) = aug.geometric

    def noisy(z: Tensor) -> Tensor:
        return u + (0.1 * z).clamp(-0.2, 0.2)

    student_u = calls("student", "encoder")[0].input[x_l.shape[0] :]
    teacher_u = calls("teacher", "encoder")[0].input
    assert len(draws) == 1 + student_noise
    close(teacher_u, noisy(draws[-1]))
    close(student_u, noisy(draws[0]) if student_noise else u)
    assert (draws[-1].abs() > 2).float().mean() > 0.3  # the clip is exercised

    # Provenance channels (frozen-encoder inputs) carry positions, not intensities: never noised.
    x = torch.rand(2, 1 + PROVENANCE_CHANNELS, 8, 8)
    out = method._noisy(x)
    assert torch.equal(out[:, 1:], x[:, 1:])
    close(out[:, :1], x[:, :1] + (0.1 * draws[-1]).clamp(-0.2, 0.2))


# ---------------------------------------------------------------------------------------------
# Gradients: what each loss trains
# ---------------------------------------------------------------------------------------------


def keep_outputs(module: nn.Module) -> list[Tensor]:
    """The module's outputs, graph attached (not detached like the Recorder's)."""
    outputs: list[Tensor] = []
    module.register_forward_hook(lambda m, i, o: outputs.append(o))
    return outputs


def test_cps_each_network_learns_from_the_other(batch: Batch) -> None:
    """d L / d logits of both networks equals that of sum_k L_sup(f_k) + w [CE(f_1(u), argmax f_2(u))
    + CE(f_2(u), argmax f_1(u))] with the argmax targets constants: both directions train."""
    method = build("cps", method__consistency=10.0, train__iterations=100)
    aug = AugSpy(method)
    outputs_1, outputs_2 = keep_outputs(method.student.head), keep_outputs(method.peer.head)
    out = method.training_step(batch, 50)
    (out_1,), (out_2,) = outputs_1, outputs_2
    (x_l, y_l, _), _ = aug.geometric
    n_l = x_l.shape[0]
    grads = torch.autograd.grad(out.loss, [out_1, out_2])

    l_1, l_2 = (o.detach().clone().requires_grad_() for o in (out_1, out_2))
    weight = 10.0 * math.exp(-5 * 0.5**2)
    u_1, u_2 = l_1[n_l:], l_2[n_l:]
    expected = (
        seg_loss(l_1[:n_l], y_l, CLASSES)
        + seg_loss(l_2[:n_l], y_l, CLASSES)
        + weight * (F.cross_entropy(u_1, u_2.detach().argmax(1)) + F.cross_entropy(u_2, u_1.detach().argmax(1)))
    )
    close(out.loss, expected)
    for grad, want in zip(grads, torch.autograd.grad(expected, [l_1, l_2]), strict=True):
        close(grad, want)
        assert want[n_l:].abs().sum() > 0


def test_unimatch_every_unlabelled_stream_trains_the_encoder(batch: Batch, monkeypatch) -> None:
    """L_s1, L_s2 and L_fp (the decoder on the weak rows' dropped-out encoder features) each reach
    the encoder's weights: the perturbed features are not detached."""
    method = build("unimatch", method__conf_thresh=0.0)
    decoded = keep_outputs(method.student.head)
    losses = []
    original = unimatch_module.dice_loss

    def spy(logits, *args, **kwargs):
        losses.append((logits, original(logits, *args, **kwargs)))
        return losses[-1][1]

    monkeypatch.setattr(unimatch_module, "dice_loss", spy)
    method.training_step(batch, 0)
    clean, fp, strong = decoded
    assert [logits is fp for logits, _ in losses].count(True) == 1
    assert [logits is strong or logits._base is strong for logits, _ in losses].count(True) == 2
    encoder = [p for p in method.student.encoder.parameters() if p.requires_grad]
    for logits, loss in losses:
        grads = torch.autograd.grad(loss, encoder, retain_graph=True, allow_unused=True)
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_unimatch_feature_perturbation_rate_and_scale(batch: Batch) -> None:
    """Dropout2d(fp_dropout): whole channels of the weak rows' features zeroed at that rate, the
    rest scaled by 1 / (1 - fp_dropout)."""
    method = build("unimatch", method__fp_dropout=0.2)
    calls = Recorder(method)
    torch.manual_seed(2)
    method.training_step(batch, 0)
    clean, fp = calls("student", "encoder")[0], calls("student", "decoder")[1]
    n_l, dropped = batch.labeled.shape[0], []
    for perturbed, feature in zip(fp.input, clean.output, strict=True):
        kept = perturbed.flatten(2).abs().sum(-1) > 0
        close(perturbed, feature[n_l:] * kept[..., None, None] / 0.8)
        dropped.append(1 - kept.float())
    assert 0.12 < torch.cat([d.flatten() for d in dropped]).mean() < 0.28


def test_unimatch_cutmix_partner_is_a_random_permutation(batch: Batch) -> None:
    method = build("unimatch")
    perms = set()
    for seed in range(12):
        torch.manual_seed(seed)
        view = unimatch_module.make_unlabeled_views(method.augment, batch.unlabeled)
        assert sorted(view.perm.tolist()) == list(range(4))
        perms.add(tuple(view.perm.tolist()))
    assert len(perms) > 3


# ---------------------------------------------------------------------------------------------
# PDCR labels: ground truth on labelled rows, the named network's confident argmax elsewhere
# ---------------------------------------------------------------------------------------------


def _pdcr_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Tensor, Tensor | None]]:
    seen = []

    def spy(self, labels, ignore=None):
        seen.append((labels, ignore))
        return labels.new_zeros((), dtype=torch.float32), {}

    monkeypatch.setattr(Method, "pdcr_term", spy)
    return seen


@pytest.mark.parametrize("name, net, row", [
    ("mean_teacher", "teacher", 0),  # the EMA teacher on the noisy weak view
    ("cps", "peer", 4),  # network 2 on the unlabelled rows of its pass
    ("unimatch", "student", 4),  # the weak view's logits of the clean pass
])
def test_pdcr_pseudo_labels_come_from_the_named_prediction(name, net, row, batch: Batch, monkeypatch) -> None:
    """Labelled rows: the labels, nothing ignored; unlabelled rows: the named network's argmax,
    ignored where its max softmax is below pdcr.unlabeled_threshold (here its median)."""
    method = build(name, pdcr__unlabeled=True)
    if name == "mean_teacher":  # make the teacher disagree with the student
        with torch.no_grad():
            for p in method.teacher.parameters():
                p.add_(0.1 * torch.randn_like(p))
    seen, calls, aug = _pdcr_spy(monkeypatch), Recorder(method), AugSpy(method)
    method.training_step(batch, 0)
    threshold = calls(net, "decoder")[0].output[row:].softmax(1).amax(1).median().item()
    method.cfg.pdcr.unlabeled_threshold = threshold
    first_call, first_draw = len(calls(net, "decoder")), len(aug.geometric)
    method.training_step(batch, 1)
    (_, y_l, _) = aug.geometric[first_draw]
    n_l = y_l.shape[0]
    labels, ignore = seen[-1]
    confidence, argmax = calls(net, "decoder")[first_call].output[row:].softmax(1).max(1)
    assert torch.equal(labels, torch.cat([y_l, argmax]))
    assert torch.equal(ignore, torch.cat([torch.zeros_like(y_l, dtype=torch.bool), confidence < threshold]))
    assert 0.1 < ignore[n_l:].float().mean() < 0.9


def test_bcp_pdcr_ignores_the_pseudo_labelled_pixels(batch: Batch, monkeypatch) -> None:
    """Pre-training: the mixed ground truth, nothing ignored. Self-training: the two mixed targets,
    ignoring u_a's pixels outside the box and u_b's inside it."""
    method = build("bcp", method__pretrain_iterations=1, train__val_every=1)
    seen, boxes, aug = _pdcr_spy(monkeypatch), _record_boxes(monkeypatch), AugSpy(method)
    method.training_step(batch, 0)
    method.after_validation(1, 0.5)
    method.training_step(batch, 1)
    (pre_box, box), (pre, self_training) = boxes, seen
    (x0, y0, _), (x1, y1, _), (u, _, _) = aug.geometric
    assert torch.equal(pre[0], torch.where(pre_box, y0[2:], y0[:2])) and pre[1] is None
    with torch.no_grad():
        pseudo = largest_components(method.teacher(u).argmax(1), CLASSES)
    labels, ignore = self_training
    assert torch.equal(labels, torch.cat([torch.where(box, y1[:2], pseudo[:2]), torch.where(box, pseudo[2:], y1[2:])]))
    assert torch.equal(ignore, torch.cat([~box, box]))


# ---------------------------------------------------------------------------------------------
# BCP: paste box, largest component, the pre-trained student, the EMA from the switch on
# ---------------------------------------------------------------------------------------------


def test_bcp_paste_box_is_one_shared_box_of_two_thirds_the_sides() -> None:
    """BCP's generate_mask: a box of int(2/3 H) x int(2/3 W) at y0 ~ U{0 .. H - h - 1}, x0 ~ U{0 .. W - w - 1},
    the same for every image of the batch."""
    starts = set()
    for seed in range(200):
        torch.manual_seed(seed)
        box = paste_box(3, (24, 36), 2 / 3, torch.device("cpu"))
        assert box.shape == (3, 24, 36) and box.dtype == torch.bool
        assert torch.equal(box[1], box[0]) and torch.equal(box[2], box[0])
        rows, cols = box[0].any(1).nonzero().flatten(), box[0].any(0).nonzero().flatten()
        assert len(rows) == 16 and len(cols) == 24 and int(box[0].sum()) == 16 * 24
        starts.add((int(rows[0]), int(cols[0])))
    assert {y for y, _ in starts} == set(range(8)) and {x for _, x in starts} == set(range(12))


def test_bcp_largest_component_of_every_foreground_class() -> None:
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :2, :3] = 3  # the last class: 6 pixels, kept
    labels[0, 6:, 6:] = 3  # 4 pixels, dropped
    labels[0, 4, :2] = 1  # 2 pixels, kept (its only component)
    labels[1, 0, 0] = 2  # 1 pixel, dropped
    labels[1, 3:6, 3:6] = 2  # 9 pixels, kept
    expected = labels.clone()
    expected[0, 6:, 6:] = 0
    expected[1, 0, 0] = 0
    assert torch.equal(largest_components(labels, 4), expected)


def test_bcp_keeps_the_best_pretraining_student_up_to_the_switch(batch: Batch) -> None:
    """Strictly better validations up to step == pretrain_steps (validation after the last
    pre-training step) replace the choice; ties and self-training validations do not."""
    method = build("bcp", method__pretrain_iterations=2, train__val_every=1)
    train(method, batch, range(1))
    method.after_validation(1, 0.5)
    first = state(method.student)
    train(method, batch, range(1, 2))
    method.after_validation(2, 0.5)  # a tie keeps the earlier student
    assert same_state(state(method.pretrained), first)
    method.after_validation(2, 0.7)  # the last pre-training step's student, better: kept
    last = state(method.student)
    assert same_state(state(method.pretrained), last) and not same_state(first, last)
    assert float(method.pretrained_dice) == 0.7


def test_bcp_ema_starts_at_the_switch_step(batch: Batch) -> None:
    """No EMA while pre-training; the first self-training step (step == pretrain_steps) already
    averages: teacher = a best + (1 - a) student with a = min(1 - 1/(step + 1), 0.99)."""
    method = build("bcp", method__pretrain_iterations=2, train__val_every=1)
    teacher_at_start = state(method.teacher)
    train(method, batch, range(2))
    assert same_state(state(method.teacher), teacher_at_start)
    method.after_validation(2, 0.5)
    best = state(method.student)
    optimizer = sgd(method)
    out = method.training_step(batch, 2)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    student = state(method.student)
    method.after_step(2)
    teacher = state(method.teacher)
    alpha = 2 / 3
    for key, value in teacher.items():
        if value.is_floating_point():
            close(value, alpha * best[key] + (1 - alpha) * student[key])
        else:
            assert torch.equal(value, student[key]), key
    # Later steps average on without restarting from the pre-trained student.
    train(method, batch, range(3, 4))
    assert not same_state(state(method.teacher), teacher)


# ---------------------------------------------------------------------------------------------
# CPS: two initialisations, a pretrained backbone kept by both
# ---------------------------------------------------------------------------------------------


def _pretrained_cfg(**overrides: object):
    return tiny_config(**{"model.name": "litemedsam", "model.tiny": True, "model.encoder_mode": "finetune",
                          "model.decoder_features": 16, "model.stem_channels": 4, "method.name": "cps",
                          **overrides})


def test_cps_initialisation_resets_all_but_the_pretrained_backbone() -> None:
    """init on every Conv2d weight, batch norm to the identity, the pretrained backbone untouched."""
    torch.manual_seed(0)
    model = build_network(_pretrained_cfg(), 1, CLASSES)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(2.0)
                m.bias.fill_(0.3)
    backbone = model.encoder.backbone
    before = state(backbone)
    init_conv_weights(model, lambda w: nn.init.constant_(w, 0.25))
    assert same_state(state(backbone), before)
    inside = {id(m) for m in backbone.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    convs = [m for m in outside if isinstance(m, nn.Conv2d)]
    norms = [m for m in outside if isinstance(m, nn.BatchNorm2d)]
    assert convs and norms
    assert any(isinstance(m, nn.Conv2d) for m in backbone.modules())  # so the exclusion matters
    assert all(bool((m.weight == 0.25).all()) for m in convs)
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)

    method = build_run_method(_pretrained_cfg(), 1, CLASSES)
    fresh = state(build_network(_pretrained_cfg(), 1, CLASSES).encoder.backbone)
    assert same_state(state(method.student.encoder.backbone), fresh)
    assert same_state(state(method.peer.encoder.backbone), fresh)
