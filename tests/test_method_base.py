"""The shared method pieces (``vqseg.methods.base``), each recipe line stated from first principles.

Losses are rebuilt pixel by pixel in float64 (Dice with squared terms and 1e-5 smoothing, mean over
all classes; CE normalised by the kept or by every pixel), pseudo-labels are checked at the exact
threshold, distribution alignment is replayed step by step with its momentum and bias correction,
and the PDCR plumbing of a method (which rows are ignored, which target and ignore label reach
``pdcr_total_loss``) is observed through a spy. No expectation calls the function under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_config
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.config import AugConfig
from vqseg.data.augment import Augmenter
from vqseg.methods import base as base_module
from vqseg.methods.base import (
    Batch,
    DistributionAlignment,
    Method,
    confident_labels,
    dice_loss,
    make_unlabeled_views,
    masked_ce,
    seg_loss,
    sigmoid_rampup,
    unlabeled_loss,
)
from vqseg.models import frozen_running_stats
from vqseg.modules.attach import PDCRConfig, PDCRLayer
from vqseg.run import build_run_method

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 4
IGNORE = 255


def close(actual: Tensor | float, expected: Tensor | float, atol: float = 1e-6) -> None:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------------------------
# Reference losses, written out pixel by pixel
# ---------------------------------------------------------------------------------------------


def reference_dice(logits: Tensor, target: Tensor, num_classes: int, ignore: Tensor | None = None) -> float:
    """SSL4MIS's soft Dice: 1 - mean_c (2 sum p y + 1e-5) / (sum p^2 + sum y^2 + 1e-5), kept pixels only."""
    probs = logits.double().softmax(1)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore is None else ~ignore
    scores = []
    for c in range(num_classes):
        p = probs[:, c][keep]
        y = (target[keep] == c).double()
        scores.append((2 * (p * y).sum() + 1e-5) / ((p * p).sum() + (y * y).sum() + 1e-5))
    return 1 - sum(scores).item() / num_classes


def reference_ce_sum(logits: Tensor, target: Tensor, ignore: Tensor | None = None) -> tuple[float, int]:
    """Sum of -log p_target over kept pixels, and the kept count."""
    log_probs = logits.double().log_softmax(1)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore is None else ~ignore
    safe = target.masked_fill(~keep, 0)
    nll = -log_probs.gather(1, safe[:, None])[:, 0]
    return nll[keep].sum().item(), int(keep.sum())


def loss_problem(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """2 x 4 x 6 x 5 logits, targets without class 3 (predicted ~never: smoothing decides its Dice),
    ignored pixels marked 255 in the target as a pseudo-label map would not be, but may be."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, CLASSES, 6, 5, generator=g) * 2
    logits[:, 3] = -40.0  # class 3: p ~ 1e-18, absent from the target
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    ignore = torch.rand(2, 6, 5, generator=g) < 0.3
    return logits, target, ignore


def test_dice_loss_is_the_smoothed_squared_soft_dice_over_all_classes() -> None:
    logits, target, ignore = loss_problem()
    close(dice_loss(logits, target, CLASSES), reference_dice(logits, target, CLASSES))
    # ignored pixels leave both the prediction and the one-hot sums, whatever label they carry
    with_255 = target.masked_fill(ignore, IGNORE)
    expected = reference_dice(logits, target, CLASSES, ignore)
    close(dice_loss(logits, with_255, CLASSES, ignore), expected)
    close(dice_loss(logits, target, CLASSES, ignore), expected)
    # the absent, never-predicted class scores (0 + 1e-5) / (~0 + 1e-5) = 1: a perfect class
    perfect = F.one_hot(target, CLASSES).permute(0, 3, 1, 2).double() * 80 - 40
    close(dice_loss(perfect, target, CLASSES), 0.0, atol=1e-6)


def test_masked_ce_normalisations() -> None:
    logits, target, ignore = loss_problem(1)
    total, _ = reference_ce_sum(logits, target)
    close(masked_ce(logits, target), total / target.numel())
    kept_sum, kept = reference_ce_sum(logits, target, ignore)
    assert 0 < kept < target.numel()
    close(masked_ce(logits, target, ignore), kept_sum / kept)  # "confident" is the default
    close(masked_ce(logits, target, ignore, "confident"), kept_sum / kept)
    close(masked_ce(logits, target, ignore, "valid"), kept_sum / target.numel())
    everything = torch.ones_like(ignore)
    for normalise in ("confident", "valid"):  # nothing kept: a zero loss, not 0 / 0
        assert masked_ce(logits, target, everything, normalise).item() == 0.0
    with pytest.raises(ValueError, match="normalisation"):
        masked_ce(logits, target, ignore, "mean")


def test_seg_loss_is_half_masked_ce_plus_half_masked_dice() -> None:
    logits, target, ignore = loss_problem(2)
    total, _ = reference_ce_sum(logits, target)
    close(seg_loss(logits, target, CLASSES), 0.5 * (total / target.numel() + reference_dice(logits, target, CLASSES)))
    kept_sum, kept = reference_ce_sum(logits, target, ignore)
    expected = 0.5 * (kept_sum / kept + reference_dice(logits, target, CLASSES, ignore))
    close(seg_loss(logits, target, CLASSES, ignore), expected)


@pytest.mark.parametrize("loss", [None, "ce", "ce_dice"])
@pytest.mark.parametrize("normalise", [None, "valid", "confident"])
def test_unlabeled_loss_recipe_and_defaults(loss: str | None, normalise: str | None) -> None:
    """Default: masked CE over every pixel ("ce", "valid", the released VQ-Seg code)."""
    logits, pseudo, ignore = loss_problem(3)
    kept_sum, kept = reference_ce_sum(logits, pseudo, ignore)
    ce = kept_sum / (kept if normalise == "confident" else pseudo.numel())
    expected = ce if loss in (None, "ce") else 0.5 * (ce + reference_dice(logits, pseudo, CLASSES, ignore))
    options = {k: v for k, v in (("loss", loss), ("normalise", normalise)) if v is not None}
    close(unlabeled_loss(logits, pseudo, CLASSES, ignore, **options), expected)


# ---------------------------------------------------------------------------------------------
# Pseudo-labels and distribution alignment
# ---------------------------------------------------------------------------------------------


def test_confident_labels_ignore_strictly_below_the_threshold() -> None:
    # pixel confidences: 0.5 exactly (a tie), 0.75 (class 1), 1/3 (a three-way tie), ~1 (class 2)
    logits = torch.tensor(
        [[[0.0, 0.0], [0.0, -99.0]], [[0.0, math.log(3.0)], [0.0, -99.0]], [[-99.0, -99.0], [0.0, 30.0]]]
    )[None]
    labels, ignore = confident_labels(logits.requires_grad_(True), 0.5)
    assert labels[0, 0, 1].item() == 1 and labels[0, 1, 1].item() == 2
    assert ignore.tolist() == [[[False, False], [True, False]]]  # p = 0.5 is kept at threshold 0.5
    assert not labels.requires_grad and not ignore.requires_grad
    assert confident_labels(logits, 0.7)[1].tolist() == [[[True, False], [True, False]]]
    assert confident_labels(logits, 0.0)[1].tolist() == [[[False, False], [False, False]]]


def test_confident_labels_threshold_the_aligned_probabilities() -> None:
    """Alignment comes before the max: both the label and its confidence are the aligned ones."""
    align = DistributionAlignment(2, momentum=0.9)
    align.observe_labels(torch.tensor([[[0, 0, 0, 1], [1, 1, 1, 1]]]))  # prior (3/8, 5/8)
    probs = torch.tensor([[0.6, 0.9], [0.4, 0.1]]).view(1, 2, 1, 2)  # unlabelled mean (3/4, 1/4)
    aligned = probs * torch.tensor([(3 / 8) / (3 / 4), (5 / 8) / (1 / 4)]).view(1, 2, 1, 1)
    aligned = aligned / aligned.sum(1, keepdim=True)  # (0.23, 0.77) and (0.64, 0.36)
    labels, ignore = confident_labels(probs.log(), 0.7, align)
    assert labels.tolist() == aligned.argmax(1).tolist() == [[[1, 0]]]
    assert ignore.tolist() == (aligned.amax(1) < 0.7).tolist() == [[[False, True]]]
    # unaligned, the same pixels give labels (0, 0) and ignore (True, False)
    assert confident_labels(probs.log(), 0.7)[1].tolist() == [[[True, False]]]


def test_distribution_alignment_replayed_step_by_step() -> None:
    """Bias-corrected EMAs (momentum m) of labelled class frequencies and unlabelled mean
    probabilities; observe_labels updates only the first, forward only the second;
    p <- normalise(p * prior / unlabelled mean)."""
    m = 0.8
    align = DistributionAlignment(3, momentum=m)
    y1 = torch.tensor([[[0, 0, 0, 1], [0, 2, 0, 0]]])  # frequencies (6/8, 1/8, 1/8)
    y2 = torch.tensor([[[1, 1, 2, 2], [0, 2, 2, 2]]])  # frequencies (1/8, 2/8, 5/8)
    f1, f2 = torch.tensor([6, 1, 1]) / 8, torch.tensor([1, 2, 5]) / 8
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 4, 4, generator=g).softmax(1) for _ in range(3)]
    u = [p.mean(dim=(0, 2, 3)) for p in batches]

    def expected_output(probs: Tensor, prior: Tensor, mean_u: Tensor) -> Tensor:
        out = probs * (prior / mean_u).view(1, 3, 1, 1)
        return out / out.sum(1, keepdim=True)

    align.observe_labels(y1)
    assert (align.labeled_steps.item(), align.unlabeled_steps.item()) == (1, 0)
    close(align.labeled_sum, (1 - m) * f1)
    assert not align.unlabeled_sum.any()
    close(align(batches[0]), expected_output(batches[0], f1, u[0]))
    assert (align.labeled_steps.item(), align.unlabeled_steps.item()) == (1, 1)
    close(align.labeled_sum, (1 - m) * f1)
    close(align.unlabeled_sum, (1 - m) * u[0])

    align.observe_labels(y2)
    prior = (m * f1 + f2) / (1 + m)  # ((1 - m)(m f1 + f2)) / (1 - m^2)
    close(align.labeled_sum, (1 - m) * (m * f1 + f2))
    close(align(batches[1]), expected_output(batches[1], prior, (m * u[0] + u[1]) / (1 + m)))
    # a third unlabelled batch, no new labels: the two running means have different step counts
    mean_u = (m * m * u[0] + m * u[1] + u[2]) / (1 + m + m * m)
    close(align(batches[2]), expected_output(batches[2], prior, mean_u))
    assert (align.labeled_steps.item(), align.unlabeled_steps.item()) == (2, 3)
    close(align.unlabeled_sum, (1 - m) * (m * m * u[0] + m * u[1] + u[2]))
    assert {name for name, _ in align.named_buffers()} == {
        "labeled_sum", "unlabeled_sum", "labeled_steps", "unlabeled_steps"
    }


def test_distribution_alignment_bias_correction_keeps_early_means_at_full_scale() -> None:
    """With momentum near 1 the raw running sums start ~(1 - m) times too small; the bias-corrected
    means are the batch frequencies themselves, so a rare class (mean 0.01) is not floored by the
    1e-6 guard and alignment still lifts it to the prior."""
    align = DistributionAlignment(2, momentum=0.999999)
    align.observe_labels(torch.tensor([[[0, 1]]]))  # prior (1/2, 1/2)
    probs = torch.tensor([[0.98, 0.99, 1.0, 0.99], [0.02, 0.01, 0.0, 0.01]]).view(1, 2, 2, 2)  # mean (0.99, 0.01)
    expected = probs * torch.tensor([0.5 / 0.99, 0.5 / 0.01]).view(1, 2, 1, 1)
    torch.testing.assert_close(align(probs), expected / expected.sum(1, keepdim=True), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "progress, length, expected",
    [
        (0.0, 0.5, math.exp(-5.0)),
        (0.1, 0.4, math.exp(-5.0 * 0.75**2)),
        (0.25, 0.5, math.exp(-1.25)),
        (0.5, 0.5, 1.0),
        (0.9, 0.5, 1.0),  # clipped at t = 1, not decreasing again
        (-0.2, 0.5, math.exp(-5.0)),
        (0.0, 0.0, 1.0),  # no ramp-up
        (0.3, -1.0, 1.0),
    ],
)
def test_sigmoid_rampup(progress: float, length: float, expected: float) -> None:
    assert sigmoid_rampup(progress, length) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Unlabelled views
# ---------------------------------------------------------------------------------------------


def test_strong_view_partner_is_a_random_permutation() -> None:
    """CutMix pastes a box from another image of the batch: perm is a non-trivial permutation,
    and every image that is mixed shows a different sample inside its box."""
    augment = Augmenter(AugConfig(cutmix_prob=1.0))
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 16, 16) / 8
    moved = 0
    for seed in range(3):
        torch.manual_seed(seed)
        views = make_unlabeled_views(augment, images)
        assert sorted(views.perm.tolist()) == list(range(8))
        moved += int((views.perm != torch.arange(8)).sum())
        ids = views.mix(torch.arange(8).view(8, 1, 1).expand(8, 16, 16))
        inside = ids[views.box]
        assert torch.equal(inside, views.perm.view(8, 1, 1).expand(8, 16, 16)[views.box])
        assert torch.equal(ids[~views.box], torch.arange(8).view(8, 1, 1).expand(8, 16, 16)[~views.box])
    assert moved >= 12  # a permutation that keeps most samples in place would mix nothing


# ---------------------------------------------------------------------------------------------
# Methods: train/eval modes, optimiser groups, the supervised step
# ---------------------------------------------------------------------------------------------


class WithTeacher(Method):
    uses_unlabeled = True

    def __init__(self, cfg, factory, num_classes) -> None:
        super().__init__(cfg, factory, num_classes)
        self.teacher = copy.deepcopy(self.student)
        self.helper = nn.BatchNorm2d(2)


def test_method_train_keeps_always_eval_submodules_in_eval_mode() -> None:
    cfg = tiny_config()
    base = build_run_method(cfg, 1, CLASSES)
    method = WithTeacher(cfg, lambda: copy.deepcopy(base.student), CLASSES)
    assert method.train() is method
    assert method.training and method.student.training and method.helper.training
    assert all(not m.training for m in method.teacher.modules())
    method.eval()
    assert not method.student.training and not method.teacher.training
    method.train(True)
    assert method.student.training and not method.teacher.training


def test_parameter_groups_put_pretrained_backbones_at_encoder_lr(monkeypatch: pytest.MonkeyPatch) -> None:
    import vqseg.models.pretrained as pretrained

    cfg = tiny_config(**{"train.lr": 0.03, "train.encoder_lr": 1e-4})
    method = build_run_method(cfg, 1, CLASSES)
    (only,) = method.parameter_groups()
    assert only["lr"] == 0.03 and len(only["params"]) == len(list(method.parameters()))
    encoder = method.student.encoder
    monkeypatch.setattr(pretrained, "pretrained_backbones", lambda module: [encoder])
    encoder.stem[0].weight.requires_grad_(False)  # frozen weights join no group
    rest, backbone = method.parameter_groups()
    assert (rest["lr"], backbone["lr"]) == (0.03, 1e-4)
    trainable_encoder = {id(p) for p in encoder.parameters() if p.requires_grad}
    assert {id(p) for p in backbone["params"]} == trainable_encoder
    head = [*method.student.decoder.parameters(), *method.student.head.parameters()]
    assert {id(p) for p in rest["params"]} == {id(p) for p in head}


def test_frozen_running_stats_restores_each_momentum_and_keeps_both_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.3), nn.BatchNorm1d(2, momentum=None), nn.Flatten())
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    model[0].running_mean.fill_(0.5)
    model[0].running_var.fill_(2.0)
    model[1].num_batches_tracked.fill_(4)
    with frozen_running_stats(model):
        y = model[0](x)
        model[1](torch.randn(6, 2))
    assert torch.equal(model[0].running_mean, torch.full((3,), 0.5))
    assert torch.equal(model[0].running_var, torch.full((3,), 2.0))
    assert model[0].num_batches_tracked == 0 and model[1].num_batches_tracked == 4  # a frozen pass is not counted
    assert torch.equal(model[1].running_mean, torch.zeros(2))
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)
    assert model[0].momentum == 0.3 and model[1].momentum is None
    with pytest.raises(RuntimeError, match="inside"):
        with frozen_running_stats(model):
            raise RuntimeError("a pass failed inside the block")
    assert model[0].momentum == 0.3 and model[1].momentum is None  # restored on errors too
    model[0](x)  # afterwards the running mean moves again, by the restored momentum
    torch.testing.assert_close(model[0].running_mean, 0.7 * 0.5 + 0.3 * x.mean(dim=(0, 2, 3)))


# ---------------------------------------------------------------------------------------------
# PDCR plumbing: which rows are ignored, what reaches pdcr_total_loss
# ---------------------------------------------------------------------------------------------

LAYER = "encoder.downs.0"


def pdcr_method(**overrides: object) -> Method:
    torch.manual_seed(0)
    cfg = tiny_config(**{"pdcr.layers": [{"name": LAYER, "num_samples": 8, "weight": 0.1}], **overrides})
    return build_run_method(cfg, 1, CLASSES).train()


@pytest.fixture
def pdcr_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Tensor, object]]:
    """Replaces pdcr_total_loss by a spy recording (target labels, ignore_index)."""
    calls: list[tuple[Tensor, object]] = []

    def spy(tap, labels, num_classes, cfg, ignore_index=None, generator=None, cross_proj=None):
        assert num_classes == CLASSES
        calls.append((labels.clone(), ignore_index))
        value = torch.tensor(float(len(calls)))
        return value, {"pdcr/total": value}

    monkeypatch.setattr(base_module, "pdcr_total_loss", spy)
    return calls


def unlabeled_logits() -> Tensor:
    """3 unlabelled rows of 4 x 4 pixels with known argmax and confidence in {0.9, 0.7, 0.5, 0.25}."""
    g = torch.Generator().manual_seed(5)
    classes = torch.randint(0, CLASSES, (3, 4, 4), generator=g)
    confidence = torch.tensor([0.9, 0.7, 0.5, 0.25])[torch.randint(0, 4, (3, 4, 4), generator=g)]
    rest = (1 - confidence) / (CLASSES - 1)
    probs = torch.where(F.one_hot(classes, CLASSES).permute(0, 3, 1, 2).bool(), confidence[:, None], rest[:, None])
    return probs.log()


@pytest.mark.parametrize(
    "unlabeled, threshold, give_logits",
    [(False, 0.6, True), (True, 0.6, True), (True, 0.8, True), (True, 0.6, False)],
)
def test_labeled_pdcr_targets(pdcr_calls, unlabeled: bool, threshold: float, give_logits: bool) -> None:
    """Labelled rows keep their labels; unlabelled rows are ignored (255) unless pdcr.unlabeled is
    set and predictions are given: then their labels are the argmax where the confidence reaches
    pdcr.unlabeled_threshold, 255 elsewhere."""
    method = pdcr_method(**{"pdcr.unlabeled": unlabeled, "pdcr.unlabeled_threshold": threshold})
    labels = torch.randint(0, CLASSES, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    logits = unlabeled_logits()
    loss, logs = base_module.labeled_pdcr(method, labels, 3, logits if give_logits else None)
    ((target, ignore_index),) = pdcr_calls
    assert ignore_index == IGNORE and loss.item() == 1.0 and "pdcr/total" in logs
    assert torch.equal(target[:2], labels)
    if unlabeled and give_logits:
        probs = logits.softmax(1)
        expected = probs.argmax(1).masked_fill(probs.amax(1) < threshold, IGNORE)
        assert 0 < int((expected == IGNORE).sum()) < expected.numel()
    else:
        expected = torch.full((3, 4, 4), IGNORE)
    assert torch.equal(target[2:], expected)


def test_pdcr_term_fills_ignored_pixels_and_pseudo_label_pdcr_follows_the_switch(pdcr_calls) -> None:
    labels = torch.randint(0, CLASSES, (2, 4, 4), generator=torch.Generator().manual_seed(2))
    ignore = torch.zeros_like(labels, dtype=torch.bool)
    ignore[1, :2] = True
    method = pdcr_method()
    method._tap.features["stale"] = torch.zeros(1)
    loss, parts = method.pdcr_term(labels)
    assert loss.item() == 1.0 and set(parts) == {"pdcr/total"} and not method._tap.features  # consumed
    method.pdcr_term(labels, ignore)
    assert [torch.equal(t, y) for (t, _), y in zip(pdcr_calls, (labels, labels.masked_fill(ignore, IGNORE)))] == [
        True, True
    ]
    assert [i for _, i in pdcr_calls] == [IGNORE, IGNORE]
    # pseudo-label PDCR only when pdcr.unlabeled asks for it, its logs prefixed
    loss, logs = method.pseudo_label_pdcr(labels, ignore)
    assert loss.item() == 0.0 and logs == {} and len(pdcr_calls) == 2
    on = pdcr_method(**{"pdcr.unlabeled": True})
    loss, logs = on.pseudo_label_pdcr(labels, ignore)
    assert torch.equal(pdcr_calls[-1][0], labels.masked_fill(ignore, IGNORE)) and pdcr_calls[-1][1] == IGNORE
    assert loss.item() == 3.0 and set(logs) == {"unlabeled_pdcr/total"}
    # without PDCR: a zero term, no call
    plain = build_run_method(tiny_config(), 1, CLASSES)
    assert plain.pdcr_term(labels)[0].item() == 0.0 and plain.pseudo_label_pdcr(labels, ignore)[0].item() == 0.0
    assert len(pdcr_calls) == 3


def test_pdcr_settings_reach_the_pdcr_config() -> None:
    method = pdcr_method(
        **{
            "pdcr.layers": [
                {"name": LAYER, "num_samples": 12, "weight": 0.3},
                {"name": "decoder.ups.2", "num_samples": 5},
            ],
            "pdcr.patch_sizes": [3, 5],
            "pdcr.tau": 0.3,
            "pdcr.sampling": "balanced",
            "pdcr.cross_layer": ["encoder.stem", LAYER],
            "pdcr.cross_weight": 0.2,
        }
    )
    assert method.pdcr == PDCRConfig(
        layers=[PDCRLayer(LAYER, 12, 0.3), PDCRLayer("decoder.ups.2", 5, 0.1)],
        patch_sizes=(3, 5),
        tau=0.3,
        sampling="balanced",
        cross_layer=("encoder.stem", LAYER),
        cross_weight=0.2,
    )
    # stem (4 channels) against downs.0 (8): a trainable 8 -> 4 projection of the second layer
    assert isinstance(method.pdcr_proj, nn.Linear)
    assert (method.pdcr_proj.in_features, method.pdcr_proj.out_features) == (8, 4)
    assert any(p is method.pdcr_proj.weight for p in method.parameters())
    same = pdcr_method(**{"pdcr.cross_layer": ["encoder.stem", "decoder.ups.3"]})
    assert same.pdcr_proj is None and same.pdcr.cross_layer == ("encoder.stem", "decoder.ups.3")
    receptive = pdcr_method(**{"pdcr.patch_sizes": []})
    assert receptive.pdcr.patch_sizes == "receptive"
    assert pdcr_method().pdcr == PDCRConfig(layers=[PDCRLayer(LAYER, 8, 0.1)])  # defaults: METHODS.md §2


def test_supervised_step_feeds_the_warped_pair_and_captures_that_pass(pdcr_calls, monkeypatch) -> None:
    method = pdcr_method()
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.rand(2, 1, 32, 32, generator=g), torch.randint(0, CLASSES, (2, 32, 32), generator=g))
    seen = {}
    original = method.augment.geometric

    def geometric(images, labels=None):
        seen["in"] = (images, labels)
        seen["out"] = original(images, labels)
        return seen["out"]

    monkeypatch.setattr(method.augment, "geometric", geometric)
    inputs = []
    method.student.register_forward_hook(lambda m, i, o: inputs.append((i[0], o)))
    out = method.training_step(batch, 0)
    x, y, _ = seen["out"]
    assert seen["in"][0] is batch.labeled and seen["in"][1] is batch.labels and not torch.equal(y, batch.labels)
    ((x_seen, logits),) = inputs
    assert torch.equal(x_seen, x)
    assert torch.equal(pdcr_calls[0][0], y)
    close(out.logs["loss_sup"], seg_loss(logits, y, CLASSES))
    close(out.loss, out.logs["loss_sup"] + 1.0)


def test_progress_and_capture_switch() -> None:
    """progress = steps done / train.iterations; pdcr_capture(False) records nothing, and a tap
    only ever records inside a capture (a pass outside it, e.g. a deep-copied teacher's, is never kept)."""
    method = pdcr_method(**{"train.iterations": 40})
    assert [method.progress(s) for s in (0, 10, 40)] == [0.0, 0.25, 1.0]
    x = torch.rand(2, 1, 32, 32)
    method.student(x)
    assert not method._tap.features
    with method.pdcr_capture(False):
        method.student(x)
    assert not method._tap.features
    with method.pdcr_capture():
        method.student(x)
    assert set(method._tap.features) == {LAYER}
    copy.deepcopy(method.student)(x)  # a teacher copied with the hooks does not overwrite them
    assert set(method._tap.features) == {LAYER}
