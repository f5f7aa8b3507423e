"""VQ-Seg as a method: every ablation switch changes what it claims, perturbation modes act on
the student's unlabelled pass only, and the EMA teacher is what validation uses."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from vqseg.config import ConfigError
from vqseg.data.phantom import make_cases
from vqseg.data.volumes import SegmentationData, stack_slices
from vqseg.engine.trainer import build_run_method
from vqseg.methods.base import Batch


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
    method.after_step(10)
    for old, new, s in zip(before, method.teacher.parameters(), method.student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s.detach())


def test_foundation_features_are_computed_once_and_cached(data, monkeypatch, tmp_path):
    import vqseg.modules.foundation as foundation

    encoder = FakeFoundation()
    monkeypatch.setattr(foundation, "build_foundation", lambda *a, **k: encoder)
    cfg = vqseg_config(**{"method.foundation_cache": str(tmp_path)})
    build_run_method(cfg, 1, 4).prepare(data)
    calls = encoder.calls
    build_run_method(cfg, 1, 4).prepare(data)
    assert calls > 0 and encoder.calls == calls  # the second run reads the disk cache


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
