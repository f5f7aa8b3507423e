"""``model.train_neck``: a frozen LiteMedSAM whose neck trains (issue 26, cause 4).

The cache keeps what enters the neck; the encoder runs a trainable copy of the pretrained neck on
it, so the method's losses (VQ-Seg's commitment and consistency included) reach the features.
Tiny random stand-ins, as in test_pretrained.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_pretrained import METHOD_OVERRIDES, run_steps
from torch.nn import functional as F

from vqseg.config import ConfigError
from vqseg.models import build_model
from vqseg.models.pretrained import PretrainedEncoder
from vqseg.modules.ema import ema_update, make_teacher
from vqseg.run import build_run_method


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("VQSEG_CACHE", str(folder))
    return folder


def neck_config(train_neck: bool = True, **overrides: object):
    return tiny_config(**{"model.name": "litemedsam", "model.tiny": True, "model.encoder_mode": "frozen",
                          "model.decoder_features": 16, "model.stem_channels": 4,
                          "model.train_neck": train_neck, **overrides})


def test_the_cache_keeps_the_neck_input_and_the_encoder_runs_the_pretrained_neck_on_it() -> None:
    """At initialisation the levels equal the frozen model's (the neck copied, not re-made); the
    cached last map is the 320-channel neck input on the neck's grid; the two cache keys differ."""
    torch.manual_seed(0)
    trained = build_model(neck_config().model, 1, 4)
    frozen = build_model(neck_config(False).model, 1, 4)
    x = torch.rand(2, 1, 32, 32)
    cached = trained.encoder.backbone(x)
    assert cached[-1].shape == (2, 320, 8, 8)
    assert trained.encoder.backbone.level_shapes()[-1] == (320, 8, 8)
    expected = F.adaptive_avg_pool2d(trained.encoder.neck(cached[-1]), 2)  # level stride 16 at 32 px
    with torch.no_grad():
        levels, reference = trained.encode(x).levels, frozen.encode(x).levels
    torch.testing.assert_close(levels[-1], expected.detach(), atol=2e-3, rtol=0)  # the cache is float16
    for got, want in zip(levels, reference):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert trained.encoder.backbone.identity() != frozen.encoder.backbone.identity()


def test_the_neck_keeps_the_cache_grid_when_the_level_stride_does() -> None:
    cfg = neck_config(**{"model.level_strides": [4, 8, 16, 4], "model.dpt_strides": [4, 8, 16, 4]})
    model = build_model(cfg.model, 1, 4)
    assert model.encode(torch.rand(1, 1, 32, 32)).levels[-1].shape == (1, 256, 8, 8)


def test_only_the_neck_trains_in_the_encoder_and_at_the_encoder_lr() -> None:
    cfg = neck_config(**{"train.optimizer": "adamw", "train.lr": 1e-3, "train.encoder_lr": 1e-4})
    method = build_run_method(cfg, 1, 4)
    encoder = method.student.encoder
    neck = {id(p) for p in encoder.neck.parameters()}
    assert neck and all(p.requires_grad for p in encoder.neck.parameters())
    assert not any(p.requires_grad for p in encoder.backbone.parameters())
    groups = method.parameter_groups()
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == neck
    method.student(torch.rand(2, 1, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.neck.parameters())
    assert all(p.grad is None for p in encoder.backbone.parameters())


def test_checkpoints_keep_the_neck_and_refuse_the_other_recipe() -> None:
    method = build_run_method(neck_config(), 1, 4)
    with torch.no_grad():
        for p in method.student.encoder.neck.parameters():
            p.add_(0.1)
    state = method.state_dict()
    assert any(".encoder.neck." in k for k in state) and not any(".backbone." in k for k in state)
    fresh = build_run_method(neck_config(), 1, 4)
    fresh.load_state_dict(state, strict=True)
    for a, b in zip(method.student.encoder.neck.parameters(), fresh.student.encoder.neck.parameters()):
        assert torch.equal(a, b)
    other = build_run_method(neck_config(False), 1, 4)
    with pytest.raises(ConfigError, match="neck-input"):
        other.load_state_dict(state, strict=False)


def test_the_ema_teacher_averages_the_neck() -> None:
    student = build_model(neck_config().model, 1, 4).train()
    teacher = make_teacher(student).eval()
    with torch.no_grad():
        for p in student.encoder.neck.parameters():
            p.add_(0.2)
    ema_update(teacher, student, 0.5, step=10)
    for t, s in zip(teacher.encoder.neck.parameters(), student.encoder.neck.parameters()):
        torch.testing.assert_close(t, s - 0.1)


def test_cps_keeps_the_pretrained_neck_in_both_networks() -> None:
    """CPS re-initialises its two networks' convolutions, but not pretrained weights."""
    method = build_run_method(neck_config(**{"method.name": "cps"}), 1, 4)
    encoders = [m for m in method.modules() if isinstance(m, PretrainedEncoder)]
    assert len(encoders) == 2
    for encoder in encoders:
        for a, b in zip(encoder.neck.parameters(), encoder.backbone.net.neck.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(METHOD_OVERRIDES))
def test_every_method_moves_the_neck(name: str) -> None:
    """Two steps of each method: the neck's weights change (VQ-Seg's through its quantized level),
    the frozen stages do not, and training still reads the bank only."""
    cfg = neck_config(**{"method.name": name, "train.encoder_lr": 1e-2, **METHOD_OVERRIDES[name]})
    torch.manual_seed(0)
    reference = next(m for m in build_run_method(cfg, 1, 4).modules() if isinstance(m, PretrainedEncoder))
    start = {k: v.clone() for k, v in reference.neck.state_dict().items()}
    method, _, backbone_calls = run_steps(cfg, 2)
    assert backbone_calls == 0
    encoder = next(m for m in method.modules() if isinstance(m, PretrainedEncoder))
    moved = [not torch.equal(start[k], v) for k, v in encoder.neck.state_dict().items()]
    assert any(moved)
    for a, b in zip(encoder.backbone.net.neck.parameters(), reference.backbone.net.neck.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("overrides", [{"model.name": "dinov2"}, {"model.encoder_mode": "finetune"},
                                       {"model.name": "unet"}])
def test_train_neck_is_refused_where_there_is_no_frozen_litemedsam_neck(overrides: dict) -> None:
    with pytest.raises(ConfigError, match="model.train_neck"):
        neck_config(**overrides)
