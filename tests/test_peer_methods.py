"""Peer methods (supervised, Mean Teacher, UniMatch, BCP, CPS): each recipe, pinned line by line.

Every network call is recorded by forward hooks on the encoder and decoder of each network
(input, output, train/eval mode, grad mode) and every augmentation draw by a spy, so a test can
state which view each network sees, rebuild each loss from the recorded outputs with the
method's formula, and check which statistics each pass updates. A recipe change (a swapped
target, a missing perturbation, an ignored threshold or ramp-up) changes an input or the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import Tensor
from torch.nn import functional as F

from vqseg.config import ConfigError, load_config
from vqseg.data.phantom import make_cases
from vqseg.data.volumes import stack_slices
from vqseg.methods import base as base_module
from vqseg.methods import bcp as bcp_module
from vqseg.methods import unimatch as unimatch_module
from vqseg.methods.base import Batch, Method, dice_loss, seg_loss
from vqseg.methods.bcp import largest_components
from vqseg.run import build_run_method

STEPS = 20
CLASSES = 4

# The cores are shared with other jobs; oversubscribed OpenMP threads can run 10x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch() -> Batch:
    labeled = stack_slices(make_cases(11, 1, "lab"), 32, keep_labels=True)
    unlabeled = stack_slices(make_cases(12, 1, "unl"), 32, keep_labels=False)
    return Batch(labeled.images[:4], labeled.labels[:4].long(), unlabeled.images[:4])


def build(name: str, **overrides: object) -> Method:
    """A method on the tiny U-Net (tiny_config), seeded; ``a__b=v`` overrides ``a.b``."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"method.name": name, **{k.replace("__", "."): v for k, v in overrides.items()}})
    return build_run_method(cfg, in_channels=1, num_classes=CLASSES).train()


def sgd(method: Method, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr, momentum=0.9)


def train(method: Method, batch: Batch, steps: range, lr: float = 0.05) -> list[float]:
    """The engine's step order: method step, backward, optimiser step, after_step."""
    optimizer = sgd(method, lr)
    losses = []
    for step in steps:
        out = method.training_step(batch, step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        method.after_step(step)
        for key, value in out.logs.items():
            assert value.dim() == 0 and not value.requires_grad, key
        losses.append(out.loss.item())
    return losses


def decreased(losses: list[float]) -> bool:
    return sum(losses[-5:]) < 0.8 * sum(losses[:5])


def state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Spies
# ---------------------------------------------------------------------------------------------


def _detached(x: object) -> object:
    return [t.detach().clone() for t in x] if isinstance(x, (list, tuple)) else x.detach().clone()


@dataclass
class Call:
    input: object  # the encoder's image batch, or the decoder's list of feature maps
    output: object
    training: bool
    grad: bool


class Recorder:
    """Every encoder and decoder call of the method's networks (student, teacher, peer), in order:
    the encoder's images and levels, and ``decode``'s levels and logits (decoder and head)."""

    def __init__(self, method: Method) -> None:
        self.calls: dict[tuple[str, str], list[Call]] = {}
        for name in ("student", "teacher", "peer"):
            net = getattr(method, name, None)
            if isinstance(net, torch.nn.Module):
                self.calls[name, "encoder"], self.calls[name, "decoder"] = [], []
                net.encoder.register_forward_hook(self._encoder_hook(name))
                net.decode = self._decode_spy(name, net)  # the instance's decode: forward calls it too

    def _encoder_hook(self, name: str):
        def hook(module, inputs, output) -> None:
            call = Call(_detached(inputs[0]), _detached(output.levels), module.training, torch.is_grad_enabled())
            self.calls[name, "encoder"].append(call)

        return hook

    def _decode_spy(self, name: str, net: torch.nn.Module):
        decode = net.decode

        def spy(features):
            logits = decode(features)
            call = Call(_detached(features.levels), _detached(logits), net.decoder.training, torch.is_grad_enabled())
            self.calls[name, "decoder"].append(call)
            return logits

        return spy

    def __call__(self, net: str, part: str) -> list[Call]:
        return self.calls.get((net, part), [])


class AugSpy:
    """Records what the method's augmenter returned: geometric (image, labels, theta), intensity."""

    def __init__(self, method: Method) -> None:
        aug = method.augment
        self.geometric_inputs: list[tuple[Tensor, Tensor | None]] = []
        self.geometric: list[tuple[Tensor, Tensor | None, Tensor]] = []
        self.intensity: list[tuple[Tensor, Tensor]] = []
        geometric, intensity = aug.geometric, aug.intensity

        def spy_geometric(images, labels=None):
            out = geometric(images, labels)
            self.geometric_inputs.append((images, labels))
            self.geometric.append(out)
            return out

        def spy_intensity(images):
            out = intensity(images)
            self.intensity.append((images, out))
            return out

        aug.geometric, aug.intensity = spy_geometric, spy_intensity


def ramp(step: int, iterations: int, length: float) -> float:
    """The sigmoid ramp-up, written out: exp(-5 (1 - min(t / length, 1))^2)."""
    return math.exp(-5 * (1 - min(step / iterations / length, 1.0)) ** 2)


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The shared losses
# ---------------------------------------------------------------------------------------------


def test_seg_loss_is_half_ce_plus_half_soft_dice() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 6), torch.randint(0, 3, (2, 5, 6))
    probs, onehot = logits.softmax(1), F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    dice = [
        (2 * (probs[:, c] * onehot[:, c]).sum() + 1e-5) / ((probs[:, c] ** 2).sum() + onehot[:, c].sum() + 1e-5)
        for c in range(3)
    ]
    expected = 0.5 * (F.cross_entropy(logits, target) + 1 - torch.stack(dice).mean())
    close(seg_loss(logits, target, 3), expected)
    ignore = torch.zeros_like(target, dtype=torch.bool)
    ignore[:, :2] = True
    close(seg_loss(logits, target, 3, ignore), seg_loss(logits[..., 2:, :], target[..., 2:, :], 3))
    close(dice_loss(logits, target, 3, ignore), dice_loss(logits[..., 2:, :], target[..., 2:, :], 3))


# ---------------------------------------------------------------------------------------------
# Supervised
# ---------------------------------------------------------------------------------------------


def test_supervised_recipe(batch: Batch) -> None:
    method = build("supervised")
    calls, aug = Recorder(method), AugSpy(method)
    out = method.training_step(batch, 0)
    (images, labels), = aug.geometric_inputs
    (x_l, y_l, _), = aug.geometric
    assert images is batch.labeled and labels is batch.labels
    (enc,), (dec,) = calls("student", "encoder"), calls("student", "decoder")
    assert torch.equal(enc.input, x_l) and enc.training and enc.grad
    close(out.loss, seg_loss(dec.output, y_l, CLASSES))


# ---------------------------------------------------------------------------------------------
# Mean Teacher
# ---------------------------------------------------------------------------------------------


def test_mean_teacher_recipe(batch: Batch) -> None:
    """Student: labelled + weak unlabelled in one pass; teacher (eval, no grad): the weak view plus
    clipped Gaussian noise; L = L_sup + w(t) MSE(softmax student, softmax teacher)."""
    method = build("mean_teacher", method__consistency=10.0, method__consistency_rampup=0.5, train__iterations=100)
    calls, aug = Recorder(method), AugSpy(method)
    teacher_before = state(method.teacher)
    step = 30
    out = method.training_step(batch, step)

    assert [x for x, _ in aug.geometric_inputs] == [batch.labeled, batch.unlabeled]
    assert aug.geometric_inputs[0][1] is batch.labels and aug.geometric_inputs[1][1] is None
    (x_l, y_l, _), (u, _, _) = aug.geometric
    (s_enc,), (s_dec,) = calls("student", "encoder"), calls("student", "decoder")
    (t_enc,), (t_dec,) = calls("teacher", "encoder"), calls("teacher", "decoder")
    assert torch.equal(s_enc.input, torch.cat([x_l, u])) and s_enc.training and s_enc.grad
    assert not t_enc.training and not t_enc.grad
    noise = t_enc.input - u
    assert noise.abs().max() <= 0.2 + 1e-6 and 0.05 < noise.std() < 0.12 and abs(noise.mean()) < 0.01
    assert same_state(teacher_before, state(method.teacher))  # an eval-mode teacher keeps its statistics

    n_l = x_l.shape[0]
    weight = 10.0 * ramp(step, 100, 0.5)
    consistency = F.mse_loss(s_dec.output[n_l:].softmax(1), t_dec.output.softmax(1))
    close(out.logs["consistency_weight"], torch.tensor(weight))
    close(out.loss, seg_loss(s_dec.output[:n_l], y_l, CLASSES) + weight * consistency)


def test_mean_teacher_student_noise_is_its_own_draw(batch: Batch) -> None:
    method = build("mean_teacher", method__student_noise=True)
    calls, aug = Recorder(method), AugSpy(method)
    method.training_step(batch, 0)
    (x_l, _, _), (u, _, _) = aug.geometric
    student_u = calls("student", "encoder")[0].input[x_l.shape[0] :]
    teacher_u = calls("teacher", "encoder")[0].input
    assert 0 < (student_u - u).abs().max() <= 0.2 + 1e-6
    assert not torch.equal(student_u, teacher_u)


def test_mean_teacher_ramp_up() -> None:
    method = build("mean_teacher", method__consistency_rampup=0.4, train__iterations=100)
    assert method.consistency_weight(0) == pytest.approx(0.1 * math.e**-5) and method.consistency_weight(0) < 1e-3
    assert method.consistency_weight(20) == pytest.approx(0.1 * math.e**-1.25)
    assert method.consistency_weight(40) == pytest.approx(0.1)
    assert method.consistency_weight(100) == pytest.approx(0.1)


@pytest.mark.parametrize("step", [3, 200])  # warm-up a = 1 - 1/(step+1), then the decay 0.99
@pytest.mark.parametrize("name, overrides", [("mean_teacher", {}), ("bcp", {"method.pretrain_iterations": 0})])
def test_teacher_is_the_ema_of_the_student(name: str, overrides: dict, step: int, batch: Batch) -> None:
    """After the optimiser step, theta_t <- a theta_t + (1 - a) theta_s, batch-norm statistics included."""
    check_ema_step(build(name, **overrides), batch, step)


def check_ema_step(method: Method, batch: Batch, step: int) -> dict[str, Tensor]:
    """One training step, then the EMA update: every float tensor of the teacher must become
    a theta_t + (1 - a) theta_s with a = min(1 - 1 / (step + 1), 0.99), integer buffers the
    student's. Returns the student's state the teacher averaged in."""
    optimizer = sgd(method)
    out = method.training_step(batch, step)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    teacher, student = state(method.teacher), state(method.student)
    method.after_step(step)
    alpha = min(1 - 1 / (step + 1), 0.99)
    updated = state(method.teacher)
    assert not same_state(teacher, updated)
    for key, value in updated.items():
        if value.is_floating_point():
            close(value, alpha * teacher[key] + (1 - alpha) * student[key])
        else:
            assert torch.equal(value, student[key]), key
    return student


# ---------------------------------------------------------------------------------------------
# UniMatch
# ---------------------------------------------------------------------------------------------


def _unimatch_run(batch: Batch, monkeypatch: pytest.MonkeyPatch, threshold: float):
    method = build("unimatch", aug__cutmix_prob=1.0)
    method.params.conf_thresh = threshold
    calls, aug = Recorder(method), AugSpy(method)
    views = []
    for name in ("make_unlabeled_views", "strong_view"):
        original = getattr(unimatch_module, name)

        def spy(*args, original=original, **kwargs):
            views.append(original(*args, **kwargs))
            return views[-1]

        monkeypatch.setattr(unimatch_module, name, spy)
    torch.manual_seed(1)
    out = method.training_step(batch, 0)
    return method, out, calls, aug, views


def test_unimatch_recipe(batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """One weak pass (labelled + weak) gives thresholded pseudo-labels; two strong views (own
    intensity + CutMix each) learn them mixed by their box; the weak view's encoder features with
    Dropout2d(0.5) learn them unmixed; L = (L_x + 0.25 (L_s1 + L_s2) + 0.5 L_fp) / 2."""
    _, _, probe, _, _ = _unimatch_run(batch, monkeypatch, 0.95)
    n_l = batch.labeled.shape[0]
    threshold = probe("student", "decoder")[0].output[n_l:].softmax(1).amax(1).median().item()
    method, out, calls, aug, views = _unimatch_run(batch, monkeypatch, threshold)
    v1, v2 = views
    (x_l, y_l, _), (u, _, _) = aug.geometric
    assert torch.equal(v1.weak, u) and v2.weak is v1.weak and v1.box.flatten(1).any(1).all()
    for view, (source, intensity) in zip(views, aug.intensity, strict=True):  # each view its own draw
        assert source is v1.weak
        assert torch.equal(view.strong, torch.where(view.box[:, None], intensity[view.perm], intensity))
    assert not torch.equal(v1.strong, v2.strong)
    assert any(not torch.equal(v.perm, torch.arange(n_l)) for v in views)  # pastes from another image

    encs, decs = calls("student", "encoder"), calls("student", "decoder")
    assert len(encs) == 2 and len(decs) == 3
    assert all(c.training and c.grad for c in encs + decs)  # every pass updates batch-norm statistics
    clean, strong = encs
    assert torch.equal(clean.input, torch.cat([x_l, v1.weak]))
    assert torch.equal(strong.input, torch.cat([v1.strong, v2.strong]))
    assert all(torch.equal(a, b) for a, b in zip(decs[0].input, clean.output))

    # Feature perturbation: the weak rows' encoder features, each channel dropped or scaled by 2.
    dropped = []
    for fp, feature in zip(decs[1].input, clean.output):
        weak = feature[n_l:]
        kept = fp.flatten(2).abs().sum(-1) > 0
        close(fp, 2 * weak * kept[..., None, None])
        dropped.append(1 - kept.float().mean())
    assert 0.35 < torch.stack(dropped).mean() < 0.65

    logits_x, logits_w = decs[0].output.split([n_l, n_l])
    confidence, pseudo = logits_w.softmax(1).max(1)
    ignore = confidence < threshold
    assert 0.2 < ignore.float().mean() < 0.8
    logits_s1, logits_s2 = decs[2].output.chunk(2)

    def mixed(view, target: Tensor) -> Tensor:  # the view's CutMix: the partner's target in the box
        return torch.where(view.box, target[view.perm], target)

    loss_s1 = dice_loss(logits_s1, mixed(v1, pseudo), CLASSES, mixed(v1, ignore))
    loss_s2 = dice_loss(logits_s2, mixed(v2, pseudo), CLASSES, mixed(v2, ignore))
    loss_fp = dice_loss(decs[1].output, pseudo, CLASSES, ignore)
    expected = (seg_loss(logits_x, y_l, CLASSES) + 0.25 * (loss_s1 + loss_s2) + 0.5 * loss_fp) / 2
    close(out.loss, expected)
    close(out.logs["mask_ratio"], (~ignore).float().mean())


def test_unimatch_ignores_low_confidence_pixels(batch: Batch) -> None:
    out = build("unimatch", method__conf_thresh=1.0).training_step(batch, 0)
    for key in ("loss_s1", "loss_s2", "loss_fp", "mask_ratio"):
        assert out.logs[key] == 0, key
    close(out.loss, out.logs["loss_x"] / 2)


# ---------------------------------------------------------------------------------------------
# BCP
# ---------------------------------------------------------------------------------------------


def _record_boxes(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    boxes = []
    original = bcp_module.paste_box

    def spy(*args, **kwargs):
        boxes.append(original(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(bcp_module, "paste_box", spy)
    return boxes


def region_loss(logits: Tensor, target: Tensor, box: Tensor, w_outside: float, w_inside: float) -> Tensor:
    """(CE + Dice)/2 over the pixels outside the box and over those inside, each weighted."""
    return w_outside * seg_loss(logits, target, CLASSES, box) + w_inside * seg_loss(logits, target, CLASSES, ~box)


def test_bcp_pretraining_recipe(batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """x = x_a outside the box, x_b inside; targets likewise; both regions weigh 1; no teacher."""
    method = build("bcp", method__pretrain_iterations=3)
    boxes, calls, aug = _record_boxes(monkeypatch), Recorder(method), AugSpy(method)
    out = method.training_step(batch, 0)
    (box,), ((x_l, y_l, _),) = boxes, aug.geometric
    assert box.float().mean() == pytest.approx((21 / 32) ** 2)  # int(32 * 2 / 3) = 21
    (enc,), (dec,) = calls("student", "encoder"), calls("student", "decoder")
    assert torch.equal(enc.input, torch.where(box[:, None], x_l[2:], x_l[:2]))
    assert not calls("teacher", "encoder")
    close(out.loss, region_loss(dec.output, torch.where(box, y_l[2:], y_l[:2]), box, 1.0, 1.0))


def test_bcp_self_training_recipe(batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher (eval, no grad) labels the weak unlabelled halves (largest component per class);
    x_unl = u_a outside + x_a inside, x_lab = x_b outside + u_b inside; pseudo-labelled pixels
    weigh u_weight, ground-truth pixels 1."""
    method = build("bcp", method__pretrain_iterations=0, method__u_weight=0.3)
    blocks = torch.randn(4, CLASSES, 8, 8, generator=torch.Generator().manual_seed(3))
    # Teacher logits of random 4 x 4 blocks: every class in several components, so that the
    # largest-component filter changes many pseudo-labels (an untrained teacher says background).
    method.teacher.decoder.register_forward_hook(lambda m, i, o: F.interpolate(blocks, size=o.shape[-2:]))
    boxes, calls, aug = _record_boxes(monkeypatch), Recorder(method), AugSpy(method)
    teacher_before = state(method.teacher)
    out = method.training_step(batch, 0)
    (box,), ((x_l, y_l, _), (u, _, _)) = boxes, aug.geometric
    assert aug.geometric_inputs[1][0] is batch.unlabeled
    (t_enc,), (t_dec,) = calls("teacher", "encoder"), calls("teacher", "decoder")
    assert torch.equal(t_enc.input, u) and not t_enc.training and not t_enc.grad
    assert same_state(teacher_before, state(method.teacher))
    raw = t_dec.output.argmax(1)
    pseudo = largest_components(raw, CLASSES)
    assert (pseudo != raw).float().mean() > 0.2

    (enc,), (dec,) = calls("student", "encoder"), calls("student", "decoder")
    assert enc.training and enc.grad
    b = box[:, None]
    assert torch.equal(enc.input, torch.cat([torch.where(b, x_l[:2], u[:2]), torch.where(b, u[2:], x_l[2:])]))
    logits_unl, logits_lab = dec.output.chunk(2)
    expected = region_loss(logits_unl, torch.where(box, y_l[:2], pseudo[:2]), box, 0.3, 1.0) + region_loss(
        logits_lab, torch.where(box, pseudo[2:], y_l[2:]), box, 1.0, 0.3
    )
    close(out.loss, expected)


def test_bcp_self_trains_from_the_best_validated_pretraining_student(batch: Batch) -> None:
    method = build("bcp", method__pretrain_iterations=2, train__val_every=1)
    # Pre-training must not read unlabelled images: NaNs there would poison the loss.
    poisoned = Batch(batch.labeled, batch.labels, torch.full_like(batch.unlabeled, float("nan")))
    teacher_at_start = state(method.teacher)
    train(method, poisoned, range(1))
    method.after_validation(1, 0.6)
    best = state(method.student)
    train(method, poisoned, range(1, 2))
    assert same_state(teacher_at_start, state(method.teacher))  # no EMA while pre-training
    method.after_validation(2, 0.4)  # worse: not kept
    last = state(method.student)
    assert not same_state(best, last)

    # The switch step restarts student and teacher from the best pre-trained student, before its
    # own forward pass moves the student's batch-norm statistics.
    out = method.training_step(batch, 2)
    assert "loss_mix_unl" in out.logs
    assert same_state(state(method.teacher), best)
    student = state(method.student)
    assert all(torch.equal(student[k], best[k]) for k in best if "running" not in k and "num_batches" not in k)
    method.after_validation(3, 0.9)  # self-training validations do not replace the choice
    assert same_state(state(method.pretrained), best) and float(method.pretrained_dice) == 0.6


def test_bcp_refuses_a_switch_without_a_validated_student(batch: Batch) -> None:
    method = build("bcp", method__pretrain_iterations=1, train__val_every=1)
    with pytest.raises(RuntimeError, match="validated"):
        method.training_step(batch, 1)


def test_bcp_largest_component() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :3, :3] = 1  # 9 pixels
    labels[0, 6:, 6:] = 1  # 4 pixels, dropped
    labels[0, 4, 4] = 2  # the only component of class 2, kept
    labels[0, 3, 3] = 1  # touches the first block diagonally: 8-connected, kept
    expected = labels.clone()
    expected[0, 6:, 6:] = 0
    assert torch.equal(largest_components(labels, 4), expected)


def test_bcp_resume_is_exact_across_the_phase_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the switch step, resumed from the step-3 checkpoint (the switch itself):
    bit-identical to an uninterrupted run, the chosen pre-trained student included."""
    from test_engine import _interrupt_then_resume, assert_same_run

    from vqseg.engine.trainer import train as train_run
    from vqseg.io import load_checkpoint
    from vqseg.methods.bcp import BCP

    def cfg(name: str):
        overrides = {"output_dir": str(tmp_path / name), "method.name": "bcp", "method.pretrain_iterations": 3}
        return tiny_config(**overrides)

    run_a = train_run(cfg("a"))
    run_b = _interrupt_then_resume(cfg("b"), BCP, monkeypatch)
    state_b = load_checkpoint(run_b / "last.pt")["method"]
    assert any(k.startswith("pretrained.") for k in state_b) and float(state_b["pretrained_dice"]) >= 0
    assert_same_run(run_a, run_b)


# ---------------------------------------------------------------------------------------------
# CPS
# ---------------------------------------------------------------------------------------------


def test_cps_recipe(batch: Batch) -> None:
    """Both networks see the same weak batch; each learns the labels and the other's argmax."""
    method = build("cps", method__consistency=10.0, method__consistency_rampup=0.5, train__iterations=100)
    calls, aug = Recorder(method), AugSpy(method)
    step = 30
    out = method.training_step(batch, step)
    (x_l, y_l, _), (u, _, _) = aug.geometric
    (enc_1,), (dec_1,) = calls("student", "encoder"), calls("student", "decoder")
    (enc_2,), (dec_2,) = calls("peer", "encoder"), calls("peer", "decoder")
    for enc in (enc_1, enc_2):
        assert torch.equal(enc.input, torch.cat([x_l, u])) and enc.training and enc.grad
    n_l = x_l.shape[0]
    u_1, u_2 = dec_1.output[n_l:], dec_2.output[n_l:]
    weight = 10.0 * ramp(step, 100, 0.5)
    expected = (
        seg_loss(dec_1.output[:n_l], y_l, CLASSES)
        + seg_loss(dec_2.output[:n_l], y_l, CLASSES)
        + weight * (F.cross_entropy(u_1, u_2.argmax(1)) + F.cross_entropy(u_2, u_1.argmax(1)))
    )
    close(out.loss, expected)


def test_cps_initialises_network_1_kaiming_and_network_2_xavier() -> None:
    method = build("cps", model__channels=[16, 32, 64, 128, 256])
    kaiming, xavier = (lambda i, o: math.sqrt(2 / i)), (lambda i, o: math.sqrt(2 / (i + o)))
    for net, expected_std in ((method.student, kaiming), (method.peer, xavier)):
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() > 20000):
            fan_in, fan_out = conv.weight[0].numel(), conv.weight[:, 0].numel()
            assert conv.weight.std().item() == pytest.approx(expected_std(fan_in, fan_out), rel=0.1)


# ---------------------------------------------------------------------------------------------
# Every peer learns, and PDCR reads the pass the method names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mean_teacher", {}),
        # Confidence gating switches the unlabelled terms on as predictions sharpen, so the
        # loss is only comparable over time with every pixel kept.
        ("unimatch", {"method.conf_thresh": 0.0}),
        ("cps", {}),
        ("bcp", {"method.pretrain_iterations": STEPS + 1, "train.iterations": STEPS + 2}),  # stage 1
        ("bcp", {"method.pretrain_iterations": 0}),  # stage 2 throughout
    ],
)
def test_loss_decreases_on_a_fixed_batch(name: str, overrides: dict, batch: Batch) -> None:
    losses = train(build(name, **{"train.iterations": STEPS, **overrides}), batch, range(STEPS))
    assert decreased(losses), losses


def test_decrease_check_fails_without_learning(batch: Batch) -> None:
    assert not decreased(train(build("mean_teacher"), batch, range(10), lr=0.0))


PDCR_LAYER = "encoder.downs.0"


@pytest.mark.parametrize(
    "name, overrides, layer, passes",
    [
        ("supervised", {}, PDCR_LAYER, 1),
        ("mean_teacher", {}, PDCR_LAYER, 1),
        ("unimatch", {}, PDCR_LAYER, 2),  # clean pass, not the strong views after it
        ("unimatch", {}, "decoder.ups.0", 3),  # clean decode, not the perturbed or strong ones
        ("bcp", {"method.pretrain_iterations": 3}, PDCR_LAYER, 1),
        ("bcp", {"method.pretrain_iterations": 0}, PDCR_LAYER, 1),
        ("cps", {}, PDCR_LAYER, 1),
    ],
)
def test_pdcr_reads_the_first_student_pass(name, overrides, layer, passes, batch, monkeypatch) -> None:
    """Every peer captures its first student pass (the labelled one) for PDCR, whatever runs later."""
    method = build(name, **{"pdcr.layers": [{"name": layer, "num_samples": 8}], **overrides})
    outputs, seen = [], []
    method.student.get_submodule(layer).register_forward_hook(lambda m, i, o: outputs.append(o))
    original = base_module.pdcr_total_loss

    def spy(tap, labels, *args, **kwargs):
        seen.append((tap[layer], labels))
        return original(tap, labels, *args, **kwargs)

    monkeypatch.setattr(base_module, "pdcr_total_loss", spy)
    out = method.training_step(batch, 0)
    assert len(outputs) == passes
    (features, labels), = seen
    assert features is outputs[0] and features.shape[0] == labels.shape[0]
    assert "pdcr/total" in out.logs and torch.isfinite(out.loss)


def test_pdcr_ignores_a_later_pass_with_gradients(batch: Batch) -> None:
    method = build("supervised", **{"pdcr.layers": [{"name": PDCR_LAYER, "num_samples": 8}]})
    method.eval()
    with method.pdcr_capture():
        method.student(batch.labeled)
    method.student(batch.unlabeled)  # a second grad pass after the chosen one
    after_second_pass = method.pdcr_term(batch.labels)[0]
    with method.pdcr_capture():
        method.student(batch.labeled)
    close(after_second_pass, method.pdcr_term(batch.labels)[0])
    with pytest.raises(KeyError, match="capture"):
        method.pdcr_term(batch.labels)  # consumed: a new capture is needed


@pytest.mark.parametrize("name", ["mean_teacher", "unimatch", "cps"])
def test_pdcr_on_unlabelled_rows_uses_confident_pseudo_labels(name, monkeypatch, batch: Batch):
    seen = {}
    original = Method.pdcr_term

    def spy(self, labels, ignore=None):
        seen["ignored_unlabeled"] = ignore[labels.shape[0] // 2 :].float().mean().item()
        return original(self, labels, ignore)

    monkeypatch.setattr(Method, "pdcr_term", spy)
    layers = [{"name": "encoder.downs.3", "num_samples": 8, "weight": 0.1}]
    for unlabeled, expected in ((False, 1.0), (True, 0.0)):
        method = build(name, **{"pdcr.layers": layers, "pdcr.unlabeled": unlabeled, "pdcr.unlabeled_threshold": 0.0})
        method.training_step(batch, 0)
        assert seen["ignored_unlabeled"] == expected, (name, unlabeled)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("mean_teacher", "ema_decay", 1.5),
        ("mean_teacher", "consistency", -0.1),
        ("mean_teacher", "consistency_rampup", -1.0),
        ("mean_teacher", "noise_std", -0.1),
        ("mean_teacher", "noise_clip", -0.1),
        ("unimatch", "conf_thresh", 1.2),
        ("unimatch", "fp_dropout", 1.0),
        ("unimatch", "weight_strong", -0.25),
        ("unimatch", "weight_fp", -0.5),
        ("bcp", "pretrain_iterations", -1),
        ("bcp", "u_weight", -0.5),
        ("bcp", "ema_decay", -0.1),
        ("bcp", "box_fraction", 1.0),
        ("bcp", "box_fraction", 0.0),
        ("cps", "consistency", -0.1),
        ("cps", "consistency_rampup", -1.0),
    ],
)
def test_out_of_range_setting_is_refused(name: str, key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"method.{key}"):
        load_config(None, [f"method.name={name}", f"method.{key}={value}"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method.pretrain_iterations": 6}, "leaves no self-training"),
        ({"method.pretrain_iterations": 2, "train.val_every": 3}, "val_every"),
        ({"train.batch_size": 1}, "batch halves"),
        ({"train.unlabeled_batch_size": 1}, "batch halves"),
    ],
)
def test_bcp_schedule_is_checked_at_start(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("bcp", **overrides)


@pytest.mark.parametrize("iterations", [40, 43])
def test_bcp_default_pretraining_is_a_quarter_of_the_run(iterations: int) -> None:
    assert build("bcp", train__iterations=iterations, train__val_every=5).pretrain_steps == 10  # iterations // 4
