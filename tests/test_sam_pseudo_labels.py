"""``method.sam_refine`` inside a VQ-Seg step (issue 26, cause 5; an extension, not the paper).

The building blocks (boxes, the agreement rule, the decoder) are pinned in test_sam_refine.py;
here, which tensors the step hands to the refiner and where its answer goes: SAM reads the
teacher's neck embedding of the weak view and the teacher's argmax, and its ignore mask (CutMixed
like the pseudo-labels) replaces the confidence threshold's in the unlabelled loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import Tensor, nn

from vqseg.config import ConfigError
from vqseg.data import load_training_data
from vqseg.methods import vqseg as vqseg_module
from vqseg.methods.base import Batch
from vqseg.modules.sam_refine import SAMRefiner
from vqseg.run import build_run_method

pytestmark = pytest.mark.usefixtures("one_thread")

SAM = {"model.name": "litemedsam", "model.tiny": True, "model.encoder_mode": "frozen", "model.decoder_features": 16,
       "model.stem_channels": 4, "model.level_strides": [4, 8, 16, 4], "model.dpt_strides": [4, 8, 16, 4],
       "train.image_size": 256, "train.batch_size": 2, "train.unlabeled_batch_size": 2, "method.name": "vqseg",
       "method.codebook_size": 16, "method.foundation": "none", "method.vq_pool": 4, "method.sam_refine": True}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VQSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class StubRefiner(nn.Module):
    """Records what it is given and answers with a fixed random ignore mask."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor]] = []
        self.answer: Tensor | None = None

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self.calls.append((embeddings, labels))
        self.answer = torch.rand(labels.shape) < 0.5
        return self.answer, {"sam_boxes": torch.tensor(3.0)}


def one_step(monkeypatch: pytest.MonkeyPatch, **overrides: object):
    cfg = tiny_config(**{**SAM, **overrides})
    data = load_training_data(cfg)
    torch.manual_seed(0)
    method = build_run_method(cfg, data.in_channels, data.num_classes)
    method.prepare(data)
    method.train()
    views, losses, teacher_out = [], [], []
    make_views, loss = vqseg_module.make_unlabeled_views, vqseg_module.unlabeled_loss
    monkeypatch.setattr(vqseg_module, "make_unlabeled_views", lambda *a, **k: views.append(make_views(*a, **k)) or views[-1])
    monkeypatch.setattr(vqseg_module, "unlabeled_loss", lambda *a, **k: losses.append(a) or loss(*a, **k))
    method.teacher.register_forward_hook(lambda m, i, o: teacher_out.append(o))
    li, ui = torch.tensor([0, 1]), torch.tensor([2, 0])
    batch = Batch(method.training_inputs(data.labeled.images[li], li, "labeled"), data.labeled.labels[li].long(),
                  method.training_inputs(data.unlabeled.images[ui], ui, "unlabeled"), li, ui)
    out = method.training_step(batch, 3)
    return method, views[0], losses[0], teacher_out[0], out


def test_sam_reads_the_teachers_neck_and_argmax_and_its_mask_replaces_the_threshold(monkeypatch) -> None:
    stub = StubRefiner()
    monkeypatch.setattr(vqseg_module, "_sam_refiner", lambda cfg, num_classes: stub)
    method, views, (logits, pseudo, _, ignore, *_), teacher_out, out = one_step(monkeypatch)
    ((embeddings, labels),) = stub.calls
    with torch.no_grad():
        neck = method.teacher.base.encoder(views.weak).levels[-1]
    assert embeddings.shape == (2, 256, 64, 64)
    torch.testing.assert_close(embeddings, neck)  # the teacher's own neck, on the weak view
    confidence, argmax = teacher_out.float().softmax(dim=1).max(dim=1)
    assert torch.equal(labels, argmax)
    assert torch.equal(pseudo, views.mix(argmax))
    assert torch.equal(ignore, views.mix(stub.answer))  # SAM's answer, CutMixed with the pseudo-labels
    assert not torch.equal(ignore, views.mix(confidence < method.params.threshold))
    assert out.logs["sam_boxes"] == 3.0


def test_a_step_with_the_real_refiner_runs_and_adds_no_weights_to_the_checkpoint(monkeypatch) -> None:
    method, *_, out = one_step(monkeypatch)
    assert isinstance(method.sam, SAMRefiner) and torch.isfinite(out.loss)
    assert {"sam_boxes", "sam_kept", "sam_fg_kept"} <= set(out.logs)
    assert not any("sam" in key or "mask_decoder" in key for key in method.state_dict())
    assert not any(p.requires_grad for p in method.sam.parameters())


@pytest.mark.parametrize("overrides", [
    {"model.level_strides": [4, 8, 16, 16], "model.dpt_strides": [4, 8, 16, 32]},  # the neck pooled to 16 x 16
    {"train.image_size": 128},  # a 128 px encoder input: a 32 x 32 neck
    {"model.name": "unet", "model.level_strides": [4, 8, 16, 16], "model.dpt_strides": [4, 8, 16, 32]},
])
def test_sam_refine_needs_litemedsams_neck_at_64(overrides: dict) -> None:
    cfg = tiny_config(**{**SAM, **overrides})
    with pytest.raises(ConfigError, match="method.sam_refine"):
        build_run_method(cfg, 1, 4)
