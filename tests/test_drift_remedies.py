"""VQ-Seg's switches against the drift to background on a frozen encoder (issue 26; not in the
paper): class-wise self-adaptive thresholds, class-balanced unlabelled CE, labelled anchoring.
Each is pinned the way `test_vqseg_recipe.py` pins the paper's recipe: the unlabelled loss of one
recorded training step is rebuilt by hand from the recorded teacher output, views and passes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_vqseg_recipe import recipe_data, step  # noqa: F401  (recipe_data: fixture)
from torch.nn import functional as F

from vqseg.methods.base import ClassThresholds, class_balance_weights, confident_labels, masked_ce

pytestmark = pytest.mark.usefixtures("one_thread")

MOMENTUM = 0.9


def ce_valid(logits, target, weights):
    """Masked CE summed over the pixels with their weights, divided by every pixel (u_normalise valid)."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weights).sum() / weights.numel()


def mixed(views, tensor):
    return torch.where(views.box, tensor[views.perm], tensor)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def test_class_thresholds_follow_each_class_confidence_relative_to_the_best():
    thresholds = ClassThresholds(3, threshold=0.9, momentum=MOMENTUM)
    assert torch.equal(thresholds.confidence, torch.full((3,), 1 / 3))
    confidence = torch.tensor([[0.99, 0.97, 0.6, 0.8]])
    labels = torch.tensor([[0, 0, 1, 1]])  # class 2 absent: its running mean stays
    got = thresholds(confidence, labels)
    conf = torch.tensor([MOMENTUM / 3 + (1 - MOMENTUM) * 0.98, MOMENTUM / 3 + (1 - MOMENTUM) * 0.7, 1 / 3])
    torch.testing.assert_close(thresholds.confidence, conf)
    per_class = 0.9 * conf / conf.max()
    torch.testing.assert_close(got, per_class[labels])
    assert "confidence" in thresholds.state_dict()  # resumes with the run
    # once background is learned, a class the teacher is less sure of passes at a lower threshold
    for _ in range(200):
        thresholds(confidence, labels)
    assert thresholds(confidence, labels)[0, 3] == pytest.approx(0.9 * 0.7 / 0.98, rel=1e-3)
    kept = ~confident_labels(torch.log(torch.tensor([[[[0.1]], [[0.8]], [[0.1]]]])), 0.9, None, thresholds)[1]
    assert kept.all()  # 0.8 on class 1: under the fixed 0.9, over class 1's 0.64


def test_class_balance_weights_give_every_present_class_the_same_total():
    target = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 2, 2]])
    kept = torch.tensor([[True] * 8 + [False, True]])
    weights = class_balance_weights(target, kept, 4)
    assert weights[~kept].eq(0).all()
    totals = [weights[(target == c) & kept].sum().item() for c in range(3)]
    assert totals == pytest.approx([kept.sum().item() / 3] * 3)
    assert weights[kept].mean().item() == pytest.approx(1.0)
    logits = torch.randn(1, 4, 10)
    plain = masked_ce(logits, target, ~kept, "confident")
    assert masked_ce(logits, target, ~kept, "confident", kept.float()) == pytest.approx(plain.item())


# --------------------------------------------------------------------------------------------
# The switches inside one VQ-Seg step
# --------------------------------------------------------------------------------------------

SETTINGS = {"method.threshold": 0.6}


def test_class_thresholds_set_the_pseudo_labels(recipe_data, monkeypatch, tmp_path):  # noqa: F811
    method, rec, b, out = step(recipe_data, monkeypatch, tmp_path, **{
        **SETTINGS, "method.class_thresholds": True, "method.class_threshold_momentum": MOMENTUM})
    (_, teacher_out), views = rec.teacher[0], rec.views[0]
    confidence, labels = teacher_out.float().softmax(dim=1).max(dim=1)
    counts = torch.bincount(labels.flatten(), minlength=4).float()
    sums = torch.zeros(4).index_add_(0, labels.flatten(), confidence.flatten())
    batch = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full((4,), 0.25))
    conf = MOMENTUM * 0.25 + (1 - MOMENTUM) * batch
    ignore = confidence < (0.6 * conf / conf.max())[labels]
    assert not torch.equal(ignore, confidence < 0.6)  # the test can tell the two rules apart
    perturbed = next(r for r in rec.runs if r.perturb is not None)
    expected = ce_valid(perturbed.out.logits, mixed(views, labels), (~mixed(views, ignore)).float())
    torch.testing.assert_close(out.logs["loss_u"], expected)
    torch.testing.assert_close(method.class_thresholds.confidence, conf)


def test_class_balance_weighs_the_unlabelled_ce(recipe_data, monkeypatch, tmp_path):  # noqa: F811
    _, rec, _, out = step(recipe_data, monkeypatch, tmp_path, **{**SETTINGS, "method.u_class_balance": True})
    (_, teacher_out), views = rec.teacher[0], rec.views[0]
    confidence, labels = teacher_out.float().softmax(dim=1).max(dim=1)
    pseudo, kept = mixed(views, labels), ~mixed(views, confidence < 0.6)
    counts = torch.bincount(pseudo[kept], minlength=4).float()
    assert (counts > 0).sum() > 1 and counts[counts > 0].min() < counts.max()  # unequal classes to balance
    per_class = torch.where(counts > 0, kept.sum() / ((counts > 0).sum() * counts.clamp_min(1)), counts)
    perturbed = next(r for r in rec.runs if r.perturb is not None)
    expected = ce_valid(perturbed.out.logits, pseudo, per_class[pseudo] * kept)
    torch.testing.assert_close(out.logs["loss_u"], expected)


def test_labelled_anchor_pastes_ground_truth_into_the_strong_view(recipe_data, monkeypatch, tmp_path):  # noqa: F811,E501
    boxes, intensities = [], []

    def spy(method):
        cutmix, intensity = method.augment.cutmix_mask, method.augment.intensity

        def spy_cutmix(*args, **kwargs):
            boxes.append(cutmix(*args, **kwargs))
            return boxes[-1]

        def spy_intensity(images):
            intensities.append((images, intensity(images)))
            return intensities[-1][1]

        monkeypatch.setattr(method.augment, "cutmix_mask", spy_cutmix)
        monkeypatch.setattr(method.augment, "intensity", spy_intensity)

    _, rec, _, out = step(recipe_data, monkeypatch, tmp_path, setup=spy,
                          **{**SETTINGS, "method.anchor_labeled": True})
    (_, teacher_out), views = rec.teacher[0], rec.views[0]
    _, _, x_l, y_l, _ = rec.labeled[0]
    assert len(boxes) == 2 and torch.equal(boxes[0], views.box)  # the view's own CutMix, then the anchor's
    box = boxes[1]
    (source, pasted) = intensities[1]
    assert torch.equal(source, x_l)  # the augmented labelled views, with their own intensity draw
    perturbed = next(r for r in rec.runs if r.perturb is not None)
    confidence, labels = teacher_out.float().softmax(dim=1).max(dim=1)
    pseudo, ignore = mixed(views, labels), mixed(views, confidence < 0.6)
    assert box.any(dim=(1, 2)).all()
    for i in range(box.shape[0]):
        inside = box[i]
        partner = [j for j in range(len(x_l)) if torch.equal(perturbed.x[i][:, inside], pasted[j][:, inside])]
        assert partner, i  # a labelled view's pixels inside the box, the strong view's outside
        assert torch.equal(perturbed.x[i][:, ~inside], views.strong[i][:, ~inside])
        pseudo[i][inside] = y_l[partner[0]][inside]
        ignore[i][inside] = False  # ground truth is never ignored
    expected = ce_valid(perturbed.out.logits, pseudo, (~ignore).float())
    torch.testing.assert_close(out.logs["loss_u"], expected)


def test_the_switches_are_off_by_default_and_checked():
    method = tiny_config(**{"method.name": "vqseg"}).method
    assert not (method.class_thresholds or method.u_class_balance or method.anchor_labeled)
    assert method.class_threshold_momentum == 0.99
    from vqseg.config import ConfigError

    with pytest.raises(ConfigError, match="method.class_threshold_momentum"):
        tiny_config(**{"method.name": "vqseg", "method.class_threshold_momentum": 1.0})


# --------------------------------------------------------------------------------------------
# The codebook on a pooled grid (method.vq_pool)
# --------------------------------------------------------------------------------------------


def test_vq_pool_quantizes_block_means_and_keeps_the_detail(monkeypatch):
    """vq_pool=2: the quantizer sees the level's 2x2 block means; the decoder gets the quantized
    coarse map (nearest-upsampled) plus the level minus its upsampled block means."""
    from test_vqseg_recipe import spy_decoders

    from vqseg.config import ConfigError
    from vqseg.models.vq_net import VQSegNet
    from vqseg.run import build_network

    torch.manual_seed(0)
    base = build_network(tiny_config(**{"model.dropout": [0.0] * 5}), 1, 4)
    net = VQSegNet(base, 1, [2], 32, 0.25, True, True, 8, pool=2).train()
    seen = spy_decoders(net, monkeypatch)
    inputs = []
    net.quantizers["2"].register_forward_hook(lambda m, i, o: inputs.append((i[0], o)))
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    z = net.base.encode(x).levels[2]
    net.run(x)
    (coarse, out), = inputs
    torch.testing.assert_close(coarse, F.avg_pool2d(z, 2))
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    torch.testing.assert_close(seen.decode[0][2], up(out.quantized) + z - up(F.avg_pool2d(z, 2)))
    assert out.indices.shape == (2, 4, 4)  # 8 x 8 level, codes on its 4 x 4 block grid
    assert tiny_config(**{"method.name": "vqseg"}).method.vq_pool == 1  # the paper: the level itself
    odd = VQSegNet(build_network(tiny_config(), 1, 4), 1, [2], 32, 0.25, False, True, 8, pool=3)
    with pytest.raises(ConfigError, match="method.vq_pool=3 does not divide level 2"):
        odd.run(x)
