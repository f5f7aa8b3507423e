"""VQ-Seg as a method: every ablation switch changes what it claims, perturbation modes act on
the student's unlabelled pass only, each line of the training recipe is pinned (which view each
network sees, which targets each loss gets, which pass updates batch-norm statistics), and
validation uses the student unless ``eval_teacher`` asks for the EMA teacher."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from torch import nn

from vqseg.config import ConfigError
from vqseg.data.phantom import make_cases
from vqseg.data.volumes import SegmentationData, stack_slices
from vqseg.methods.base import Batch
from vqseg.run import build_run_method


class FakeFoundation(nn.Module):
    """A cheap frozen 'foundation model': average-pooled intensities repeated over 8 channels."""

    name, dim, input_size, grid = "fake", 8, 32, (8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def cache_key(self) -> str:
        return "fake"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return nn.functional.adaptive_avg_pool2d(images, self.grid).repeat(1, self.dim, 1, 1)


def vqseg_config(**overrides):
    defaults = {"method.name": "vqseg", "method.codebook_size": 64, "method.foundation_cache": "unused-cache"}
    defaults.update(overrides)
    return tiny_config(**defaults)


@pytest.fixture
def data() -> SegmentationData:
    cases = make_cases(0, 2, "t")
    slices = stack_slices(cases, 32, keep_labels=True)
    return SegmentationData(slices, stack_slices(cases, 32, keep_labels=False), cases, 4, ["RV", "Myo", "LV"], 1)


def batch(data: SegmentationData) -> Batch:
    index = torch.arange(4)
    return Batch(data.labeled.images[index], data.labeled.labels[index].long(), data.unlabeled.images[index], index, index)


def build(data, monkeypatch, tmp_path, **overrides):
    import vqseg.modules.foundation as foundation

    monkeypatch.setattr(foundation, "build_foundation", lambda *a, **k: FakeFoundation())
    cfg = vqseg_config(**{"method.foundation_cache": str(tmp_path), **overrides})
    method = build_run_method(cfg, 1, 4)
    method.prepare(data)
    return method.train()


@pytest.mark.parametrize(
    "ablation, perturbs, reconstructs, aligns",
    [("base", False, False, False), ("qpm", True, False, False), ("qpm_db", True, True, False),
     ("qpm_pfa", True, False, True), ("all", True, True, True)],
)
def test_ablation_rows_switch_their_parts(data, monkeypatch, tmp_path, ablation, perturbs, reconstructs, aligns):
    torch.manual_seed(0)
    method = build(data, monkeypatch, tmp_path, **{"method.ablation": ablation})
    assert (method.perturb is not None) == perturbs
    assert (method.student.recon_decoder is not None) == reconstructs
    assert (method.adapter is not None) == aligns
    out = method.training_step(batch(data), 0)
    assert ("loss_rec" in out.logs) == reconstructs
    assert ("loss_align" in out.logs) == aligns
    out.loss.backward()
    if aligns:
        assert method.adapter.proj.weight.grad is not None and method.adapter.proj.weight.grad.abs().sum() > 0
    if reconstructs:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.recon_decoder.parameters())


def test_perturbation_modes_change_only_the_perturbed_pass(data, monkeypatch, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64, 64)  # varied inputs, so the bottleneck holds several distinct codes
    outputs = {}
    for mode in ("none", "qpm", "shuffle", "dropout"):
        method = build(data, monkeypatch, tmp_path, **{"method.perturbation": mode, "method.eps": 1.0,
                                                        "method.dropout": 0.9, "method.pfa": False})
        net = method.student.train()  # batch statistics: an untrained net in eval mode maps all to one code
        torch.manual_seed(1)
        clean = net.run(x).logits
        dropout = method.params.dropout if mode == "dropout" else 0.0
        perturbed = net.run(x, perturb=method.perturb, dropout=dropout).logits
        outputs[mode] = (clean, perturbed)
    assert torch.equal(*outputs["none"])
    for mode in ("qpm", "shuffle", "dropout"):
        clean, perturbed = outputs[mode]
        assert not torch.allclose(clean, perturbed), mode


def test_teacher_is_an_ema_of_the_student_and_predicts(data, monkeypatch, tmp_path):
    torch.manual_seed(0)
    default = build(data, monkeypatch, tmp_path, **{"method.pfa": False})
    assert default.predictor() is default.student  # evaluated like UniMatch and BCP, unless asked
    method = build(data, monkeypatch, tmp_path, **{"method.pfa": False, "method.ema_decay": 0.9,
                                                    "method.eval_teacher": True})
    assert method.predictor() is method.teacher and not method.teacher.training
    before = [p.detach().clone() for p in method.teacher.parameters()]
    out = method.training_step(batch(data), 10)
    out.loss.backward()
    with torch.no_grad():
        for p in method.student.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    after_training_step = [p.detach().clone() for p in method.teacher.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after_training_step))  # only after_step moves it
    key = "base.encoder.stem.1.running_mean"  # batch-norm statistics are averaged too
    stats_before = dict(method.teacher.named_buffers())[key].clone()
    method.after_step(10)
    for old, new, s in zip(before, method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s.detach())
    student_stats = dict(method.student.named_buffers())[key]
    assert not torch.equal(student_stats, stats_before)
    torch.testing.assert_close(dict(method.teacher.named_buffers())[key], 0.9 * stats_before + 0.1 * student_stats)


def test_foundation_features_are_computed_once_and_cached(data, monkeypatch, tmp_path):
    import vqseg.modules.foundation as foundation

    encoder = FakeFoundation()
    monkeypatch.setattr(foundation, "build_foundation", lambda *a, **k: encoder)
    cfg = vqseg_config(**{"method.foundation_cache": str(tmp_path)})
    build_run_method(cfg, 1, 4).prepare(data)
    calls = encoder.calls
    build_run_method(cfg, 1, 4).prepare(data)
    assert calls > 0 and encoder.calls == calls  # the second run reads the disk cache


def test_foundation_cache_defaults_to_vqseg_cache(data, monkeypatch, tmp_path, capsys):
    """With no method.foundation_cache, PFA features go to the per-slice cache under $VQSEG_CACHE
    (one file per slice), and the folder is said."""
    import vqseg.modules.foundation as foundation

    monkeypatch.setattr(foundation, "build_foundation", lambda *a, **k: FakeFoundation())
    monkeypatch.setattr(foundation, "_NOTED", set())
    monkeypatch.setenv("VQSEG_CACHE", str(tmp_path / "cache"))
    build_run_method(vqseg_config(**{"method.foundation_cache": ""}), 1, 4).prepare(data)
    files = list((tmp_path / "cache").glob("pfa-fake-*/*.pt"))
    assert len(files) == len({bytes(x.numpy()) for x in (*data.labeled.images, *data.unlabeled.images)})
    assert str(tmp_path / "cache") in capsys.readouterr().err


def test_unknown_ablation_is_a_config_error():
    from vqseg.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="ablation"):
        vqseg_config(**{"method.ablation": "everything"})


def test_ablation_preset_that_contradicts_an_explicit_switch_is_an_error():
    with pytest.raises((ConfigError, ValueError), match="method.perturbation=dropout"):
        vqseg_config(**{"method.ablation": "all", "method.perturbation": "dropout"})
    agreeing = vqseg_config(**{"method.ablation": "qpm", "method.dual_branch": False}).method
    assert (agreeing.perturbation, agreeing.dual_branch, agreeing.pfa) == ("qpm", False, False)
    with pytest.raises((ConfigError, ValueError), match="method.perturbation=qpm"):  # explicit default too
        vqseg_config(**{"method.ablation": "base", "method.perturbation": "qpm"})
    with pytest.raises((ConfigError, ValueError), match="foundation=none"):
        vqseg_config(**{"method.ablation": "all", "method.foundation": "none"})
    full = vqseg_config().method
    assert (full.perturbation, full.dual_branch, full.pfa) == ("qpm", True, True)
    assert not vqseg_config(**{"method.foundation": "none"}).method.pfa


def test_saved_ablation_config_reloads(tmp_path):
    from vqseg.config import load_config, save_config

    cfg = vqseg_config(**{"method.ablation": "qpm_pfa"})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").method == cfg.method


def test_frozen_running_stats_normalises_with_batch_statistics_but_keeps_running_ones():
    from vqseg.models import frozen_running_stats

    bn = nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 5, 5) * 5 + 2
    with frozen_running_stats(bn):
        y = bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.momentum == 0.1
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    bn(x)
    assert not torch.equal(bn.running_mean, torch.zeros(3))


# --------------------------------------------------------------------------------------------
# The unlabelled loss (issue 13, item 2) and QPM monitoring (item 1)
# --------------------------------------------------------------------------------------------

# three pixels, two classes: pixel 0 predicts class 1 with p = 3/4 (target 1), pixel 1 is 50/50
# (target 0), pixel 2 is unconfident (ignored, whatever it predicts)
U_LOGITS = torch.tensor([[0.0, 0.0, 5.0], [math.log(3.0), 0.0, -5.0]]).view(1, 2, 1, 3)
U_TARGET = torch.tensor([[[1, 0, 1]]])
U_IGNORE = torch.tensor([[[False, False, True]]])
U_CE_SUM = math.log(4 / 3) + math.log(2)
# soft Dice over the two kept pixels: class 0 probs (1/4, 1/2) vs (0, 1), class 1 (3/4, 1/2) vs (1, 0)
U_DICE = 1 - 0.5 * ((1 + 1e-5) / (21 / 16 + 1e-5) + (1.5 + 1e-5) / (29 / 16 + 1e-5))


@pytest.mark.parametrize(
    "loss, normalise, expected",
    [("ce", "valid", U_CE_SUM / 3), ("ce", "confident", U_CE_SUM / 2),
     ("ce_dice", "valid", 0.5 * (U_CE_SUM / 3 + U_DICE)), ("ce_dice", "confident", 0.5 * (U_CE_SUM / 2 + U_DICE))],
)
def test_unlabeled_loss_normalisation_by_hand(loss, normalise, expected):
    from vqseg.methods.base import unlabeled_loss

    got = unlabeled_loss(U_LOGITS, U_TARGET, 2, U_IGNORE, loss, normalise)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_unlabeled_loss_defaults_follow_the_released_code():
    method = vqseg_config().method
    assert (method.u_loss, method.u_normalise) == ("ce", "valid")
    # the defaults that did not collapse (issue 13 item 3), not the paper's lambda_align 5 / no ramp-up
    assert (method.lambda_align, method.u_rampup) == (1.0, 0.2)
    with pytest.raises(ConfigError, match="method.u_loss"):
        vqseg_config(**{"method.u_loss": "dice"})
    with pytest.raises(ConfigError, match="method.u_normalise"):
        vqseg_config(**{"method.u_normalise": "all"})


@pytest.mark.parametrize(
    "key, bad",
    [("eps", 1.5), ("eps", -0.1), ("temperature", 0.0), ("dropout", 1.0), ("codebook_size", 1), ("beta", -1.0),
     ("code_dim", -1), ("foundation_input", -2), ("pfa_tau", 0.0), ("pfa_samples", 0), ("ema_decay", 1.1),
     ("threshold", 2.0), ("lambda_u", -1.0), ("u_rampup", 1.5), ("lambda_rec", -0.5), ("lambda_align", -1.0),
     ("lambda_vq", -1.0), ("vq_levels", []), ("dist_align_momentum", 1.0), ("dist_align_momentum", -0.1)],
)
def test_out_of_range_settings_are_refused(key, bad):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        vqseg_config(**{f"method.{key}": bad})


def test_jump_statistics_are_logged_at_logging_steps(data, monkeypatch, tmp_path, one_thread):
    torch.manual_seed(0)
    method = build(data, monkeypatch, tmp_path, **{"method.pfa": False, "train.log_every": 2})
    assert not any("jump" in key for key in method.training_step(batch(data), 0).logs)
    logs = method.training_step(batch(data), 1).logs
    assert 0 < logs["vq4_fraction_used"] <= 1 and logs["vq4_perplexity"] >= 1
    assert 0 < logs["vq4_jump_moved"] <= 1 and 0 <= logs["vq4_jump_near_share"] <= 1
    assert logs["vq4_jump_rank_median"] >= 1
    base = build(data, monkeypatch, tmp_path, **{"method.ablation": "base", "train.log_every": 1})
    assert not any("jump" in key for key in base.training_step(batch(data), 0).logs)


# --------------------------------------------------------------------------------------------
# The recipe, line by line (issue 13, item 8): spies record what each network sees and each
# loss gets during one training step, and the test recomputes every term from the recording.
# --------------------------------------------------------------------------------------------


class StepRecorder:
    """Spies on one VQ-Seg training step: the labelled augmentation, the unlabelled views, every
    student pass (inputs, switches, whether it moved the batch-norm running statistics, output),
    the teacher's inputs and outputs, and the PFA loss's arguments."""

    def __init__(self, method, monkeypatch) -> None:
        import vqseg.methods.vqseg as vqseg_module
        import vqseg.modules.pfa as pfa

        self.labeled, self.views, self.runs, self.teacher, self.align = [], [], [], [], []
        geometric, run, make_views, infonce = method.augment.geometric, method.student.run, None, pfa.patch_infonce
        make_views = vqseg_module.make_unlabeled_views
        stats = [b for name, b in method.student.named_buffers() if name.endswith(("running_mean", "running_var"))]

        def spy_geometric(images, labels=None):
            out = geometric(images, labels)
            if labels is not None:
                self.labeled.append((images, labels, *out))
            return out

        def spy_views(*args, **kwargs):
            self.views.append(make_views(*args, **kwargs))
            return self.views[-1]

        def spy_run(x, perturb=None, dropout=0.0, reconstruct=False):
            before = [b.clone() for b in stats]
            out = run(x, perturb=perturb, dropout=dropout, reconstruct=reconstruct)
            moved = any(not torch.equal(a, b) for a, b in zip(before, stats))
            self.runs.append(SimpleNamespace(x=x, perturb=perturb, dropout=dropout, reconstruct=reconstruct,
                                             moved_stats=moved, out=out))
            return out

        def spy_infonce(student, teacher, *args, **kwargs):
            loss = infonce(student, teacher, *args, **kwargs)
            self.align.append((student, teacher, args, kwargs, loss))
            return loss

        monkeypatch.setattr(method.augment, "geometric", spy_geometric)
        monkeypatch.setattr(vqseg_module, "make_unlabeled_views", spy_views)
        monkeypatch.setattr(method.student, "run", spy_run)
        monkeypatch.setattr(pfa, "patch_infonce", spy_infonce)
        method.teacher.register_forward_hook(lambda module, inputs, output: self.teacher.append((inputs[0], output)))


RECIPE = {"method.threshold": 0.6, "method.lambda_u": 0.7, "method.u_rampup": 0.5, "method.lambda_rec": 0.3,
          "method.lambda_align": 0.4, "method.lambda_vq": 0.6, "method.pfa_tau": 0.2, "method.pfa_samples": 5,
          "aug.cutmix_prob": 1.0}


def intensity_teacher(module, inputs, output):
    """Make the (untrained, near-constant) teacher's argmax follow the intensity of its input, with
    low confidence between the bands, so that CutMix and the threshold both change the targets."""
    centres = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 4, 1, 1)
    return output + (-30 * (inputs[0] - centres) ** 2)


@pytest.fixture
def recipe_data() -> SegmentationData:
    """Unlabelled slices from other phantoms than the labelled ones, so their caches differ."""
    cases = make_cases(0, 2, "t")
    unlabeled = stack_slices(make_cases(1, 2, "u"), 32, keep_labels=False)
    return SegmentationData(stack_slices(cases, 32, keep_labels=True), unlabeled, cases, 4, ["RV", "Myo", "LV"], 1)


def recorded_step(data, monkeypatch, tmp_path, step=1, **overrides):
    torch.manual_seed(0)
    method = build(data, monkeypatch, tmp_path, **{**RECIPE, **overrides})
    method.teacher.register_forward_hook(intensity_teacher)
    rec = StepRecorder(method, monkeypatch)
    b = batch(data)
    out = method.training_step(b, step)
    return method, rec, b, out


def close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=1e-6)


def test_recipe_each_network_sees_its_view(recipe_data, monkeypatch, tmp_path, one_thread):
    method, rec, b, out = recorded_step(recipe_data, monkeypatch, tmp_path)
    (images, labels, x_l, y_l, theta_l), = rec.labeled
    assert torch.equal(images, b.labeled) and torch.equal(labels, b.labels)
    views, = rec.views
    # the teacher labels the weak view, once, without gradients
    (teacher_in, teacher_out), = rec.teacher
    assert torch.equal(teacher_in, views.weak) and not teacher_out.requires_grad
    assert not torch.equal(views.weak, views.strong)
    clean, perturbed = rec.runs
    # the clean pass: labelled slices then weak views, unperturbed, reconstructing, updating batch-norm statistics
    assert torch.equal(clean.x, torch.cat([x_l, views.weak]))
    assert (clean.perturb, clean.dropout, clean.reconstruct, clean.moved_stats) == (None, 0.0, True, True)
    # the perturbed pass: the strong view through QPM, without touching the running statistics
    assert torch.equal(perturbed.x, views.strong)
    assert perturbed.perturb is method.perturb and method.perturb.mode == "jump"
    assert (perturbed.dropout, perturbed.reconstruct, perturbed.moved_stats) == (0.0, False, False)
    assert not torch.equal(perturbed.out.codes["4"].used_indices, perturbed.out.codes["4"].indices)
    assert torch.equal(clean.out.codes["4"].used_indices, clean.out.codes["4"].indices)
    assert torch.equal(out.logs["perplexity"], clean.out.perplexity)  # code usage is the clean pass's


def test_recipe_each_loss_gets_its_targets_and_weight(recipe_data, monkeypatch, tmp_path, one_thread):
    from vqseg.data.augment import Augmenter
    from vqseg.methods.base import confident_labels, seg_loss, sigmoid_rampup, unlabeled_loss

    step = 1
    method, rec, b, out = recorded_step(recipe_data, monkeypatch, tmp_path, step)
    (_, _, x_l, y_l, theta_l), = rec.labeled
    views, = rec.views
    (_, teacher_out), = rec.teacher
    clean, perturbed = rec.runs
    n_l = x_l.shape[0]

    # pseudo-labels: the teacher's confident argmax on the weak view, CutMixed like the image
    raw_pseudo, raw_ignore = confident_labels(teacher_out, 0.6)
    pseudo, ignore = views.mix(raw_pseudo), views.mix(raw_ignore)
    assert not torch.equal(pseudo, raw_pseudo)  # the mixing matters in this draw
    assert 0 < ignore.float().mean() < 1  # and so does the threshold
    assert close(out.logs["pseudo_kept"], (~ignore).float().mean())
    assert close(out.logs["loss_u"], unlabeled_loss(perturbed.out.logits, pseudo, 4, ignore, "ce", "valid"))
    assert close(out.logs["loss_sup"], seg_loss(clean.out.logits[:n_l], y_l, 4))
    assert close(out.logs["loss_vq"], 0.5 * (clean.out.vq_loss + perturbed.out.vq_loss))
    assert close(out.logs["loss_rec"], nn.functional.l1_loss(clean.out.recon, clean.x))

    # PFA: the adapter on the clean post-VQ map against the cached features warped like each view,
    # sampled only where the warp did not pad; each cache holds its own slices' features
    for which, images in (("labeled", recipe_data.labeled.images), ("unlabeled", recipe_data.unlabeled.images)):
        assert torch.equal(method._cache[which], FakeFoundation()(images).half())
    (features, target, args, kwargs, loss_align), = rec.align
    torch.testing.assert_close(features, method.adapter(clean.out.post_vq))
    expected_target = torch.cat([
        Augmenter.warp(method._cache["labeled"][b.labeled_index].float(), theta_l),
        Augmenter.warp(method._cache["unlabeled"][b.unlabeled_index].float(), views.theta),
    ])
    torch.testing.assert_close(target, expected_target)
    inside = Augmenter.warp(torch.ones(len(target), 1, *target.shape[2:]), torch.cat([theta_l, views.theta]))[:, 0]
    assert list(args) == [0.2, 5] and list(kwargs) == ["valid"] and torch.equal(kwargs["valid"], inside > 0.999)
    assert close(out.logs["loss_align"], loss_align)

    ramp = sigmoid_rampup(step / method.cfg.train.iterations, 0.5)
    assert 0.05 < ramp < 0.95
    total = (out.logs["loss_sup"] + 0.7 * ramp * out.logs["loss_u"] + 0.6 * out.logs["loss_vq"]
             + 0.3 * out.logs["loss_rec"] + 0.4 * out.logs["loss_align"])
    assert close(out.loss, total)


@pytest.mark.parametrize("u_loss, u_normalise", [("ce_dice", "valid"), ("ce", "confident")])
def test_recipe_unlabeled_loss_switches(recipe_data, monkeypatch, tmp_path, one_thread, u_loss, u_normalise):
    from vqseg.methods.base import confident_labels, unlabeled_loss

    _, rec, _, out = recorded_step(recipe_data, monkeypatch, tmp_path, **{"method.u_loss": u_loss,
                                                                     "method.u_normalise": u_normalise})
    views, = rec.views
    (_, teacher_out), = rec.teacher
    pseudo, ignore = (views.mix(t) for t in confident_labels(teacher_out, 0.6))
    assert close(out.logs["loss_u"], unlabeled_loss(rec.runs[1].out.logits, pseudo, 4, ignore, u_loss, u_normalise))


def test_recipe_distribution_alignment_sets_the_pseudo_labels(recipe_data, monkeypatch, tmp_path, one_thread):
    """With ``dist_align`` the pseudo-labels come from the teacher's probabilities rescaled by the
    labelled batch's class frequencies over the teacher's mean; the threshold applies after."""
    from vqseg.methods.base import DistributionAlignment, confident_labels, unlabeled_loss

    method, rec, _, out = recorded_step(recipe_data, monkeypatch, tmp_path, **{"method.dist_align": True})
    (_, _, _, y_l, _), = rec.labeled
    views, = rec.views
    (_, teacher_out), = rec.teacher
    reference = DistributionAlignment(4, 0.99)
    reference.observe_labels(y_l)  # the prior is the augmented labelled batch's
    pseudo, ignore = (views.mix(t) for t in confident_labels(teacher_out, 0.6, reference))
    plain, plain_ignore = (views.mix(t) for t in confident_labels(teacher_out, 0.6))
    assert not (torch.equal(pseudo, plain) and torch.equal(ignore, plain_ignore))  # alignment matters here
    assert close(out.logs["loss_u"], unlabeled_loss(rec.runs[1].out.logits, pseudo, 4, ignore, "ce", "valid"))
    assert close(out.logs["pseudo_kept"], (~ignore).float().mean())
    state = method.state_dict()  # the running means travel with checkpoints, so a resumed run continues
    assert torch.equal(state["align.labeled_sum"], reference.labeled_sum)
    assert torch.equal(state["align.unlabeled_sum"], reference.unlabeled_sum)
    assert build(recipe_data, monkeypatch, tmp_path, **RECIPE).align is None  # off by default


def test_distribution_alignment_moves_the_mean_to_the_labelled_prior():
    from vqseg.methods.base import DistributionAlignment

    align = DistributionAlignment(2, momentum=0.5)
    with pytest.raises(RuntimeError, match="labelled batch first"):
        align(torch.full((1, 2, 1, 1), 0.5))
    align.observe_labels(torch.tensor([[[0, 1]]]))  # prior 1/2, 1/2 (bias-corrected: the first batch itself)
    probs = torch.tensor([[0.9, 0.6], [0.1, 0.4]]).reshape(1, 2, 1, 2)  # mean 0.75 / 0.25: class 1 under-predicted
    aligned = align(probs)
    expected = probs * torch.tensor([0.5 / 0.75, 0.5 / 0.25]).view(1, 2, 1, 1)
    torch.testing.assert_close(aligned, expected / expected.sum(dim=1, keepdim=True))
    assert aligned.argmax(dim=1).tolist() == [[[0, 1]]]  # the second pixel flips to the rarer class
    align.observe_labels(torch.tensor([[[0, 0]]]))  # the newer batch weighs 0.5 / 0.75, the older 0.25 / 0.75
    torch.testing.assert_close(align.labeled_sum / (1 - 0.5**2), torch.tensor([5 / 6, 1 / 6]))


@pytest.mark.parametrize("mode", ["dropout", "shuffle", "none"])
def test_recipe_perturbation_modes(recipe_data, monkeypatch, tmp_path, one_thread, mode):
    overrides = {"method.perturbation": mode, "method.dropout": 0.4}
    method, rec, _, _ = recorded_step(recipe_data, monkeypatch, tmp_path, **overrides)
    clean, perturbed = rec.runs
    assert (clean.perturb, clean.dropout) == (None, 0.0)
    if mode == "dropout":  # dropout replaces QPM: no code jumps
        assert (perturbed.perturb, perturbed.dropout, method.perturb) == (None, 0.4, None)
    elif mode == "shuffle":
        assert perturbed.perturb is method.perturb and method.perturb.mode == "shuffle" and perturbed.dropout == 0.0
    else:
        assert (perturbed.perturb, perturbed.dropout, method.perturb) == (None, 0.0, None)
    assert not perturbed.moved_stats and clean.moved_stats


def test_recipe_qpm_takes_its_settings(recipe_data, monkeypatch, tmp_path):
    overrides = {"method.eps": 0.3, "method.temperature": 0.05, "method.pfa": False}
    method = build(recipe_data, monkeypatch, tmp_path, **overrides)
    assert (method.perturb.eps, method.perturb.temperature, method.perturb.mode) == (0.3, 0.05, "jump")


@pytest.mark.parametrize("ablation, reconstructs, aligns", [("qpm", False, False), ("qpm_db", True, False),
                                                             ("qpm_pfa", False, True)])
def test_recipe_clean_pass_takes_the_weak_views_when_a_branch_needs_them(
    recipe_data, monkeypatch, tmp_path, one_thread, ablation, reconstructs, aligns
):
    _, rec, _, out = recorded_step(recipe_data, monkeypatch, tmp_path, **{"method.ablation": ablation})
    (_, _, x_l, _, _), = rec.labeled
    views, = rec.views
    clean, perturbed = rec.runs
    expected = torch.cat([x_l, views.weak]) if reconstructs or aligns else x_l
    assert torch.equal(clean.x, expected) and clean.reconstruct == reconstructs
    assert ("loss_rec" in out.logs) == reconstructs and (len(rec.align) == 1) == aligns
    assert perturbed.perturb is not None and not perturbed.reconstruct


def test_recipe_backbone_dropout_is_off_unless_asked(recipe_data, monkeypatch, tmp_path):
    def rates(method):
        return [m.p for m in method.student.modules() if isinstance(m, nn.Dropout)]

    off = build(recipe_data, monkeypatch, tmp_path, **{"method.pfa": False})
    on = build(recipe_data, monkeypatch, tmp_path, **{"method.pfa": False, "method.backbone_dropout": True})
    assert rates(off) and all(p == 0.0 for p in rates(off))
    assert any(p > 0 for p in rates(on))


def test_recipe_cutmix_switch(recipe_data, monkeypatch, tmp_path, one_thread):
    _, rec, _, _ = recorded_step(recipe_data, monkeypatch, tmp_path, **{"method.cutmix": False})
    views, = rec.views
    assert not views.box.any()
    _, rec, _, _ = recorded_step(recipe_data, monkeypatch, tmp_path)
    assert rec.views[0].box.any()


def test_vq_level_outside_the_backbone_is_refused(data, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="method.vq_levels"):
        build(data, monkeypatch, tmp_path, **{"method.pfa": False, "method.vq_levels": [5]})
    with pytest.raises(ConfigError, match="method.vq_levels"):
        build(data, monkeypatch, tmp_path, **{"method.pfa": False, "method.vq_levels": [-6]})
    assert build(data, monkeypatch, tmp_path, **{"method.pfa": False, "method.vq_levels": [-5, 4]}).student.levels == [0, 4]
