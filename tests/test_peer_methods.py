"""Peer semi-supervised methods (Mean Teacher, UniMatch, BCP, CPS) built through the registry.

Each trains a tiny U-Net for a few SGD steps on one fixed batch of synthetic phantom slices: the
loss must fall, and each method's own mechanism (ramp-up, confidence gating, stage switch) is
checked on its logs and state.
"""

from __future__ import annotations

import pytest
import torch

from vqseg.config import load_config
from vqseg.data.phantom import make_cases
from vqseg.data.volumes import stack_slices
from vqseg.engine.trainer import build_run_method
from vqseg.methods.base import Batch, Method

STEPS = 20
TINY = [
    "data.dataset=phantom",
    "model.channels=[4,8,16,32,64]",
    "train.image_size=32",
    "train.batch_size=4",
    "train.unlabeled_batch_size=4",
    f"train.iterations={STEPS}",
]


# The cores are shared with other jobs; oversubscribed OpenMP threads can run 10x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch() -> Batch:
    labeled = stack_slices(make_cases(11, 1, "lab"), 32, keep_labels=True)
    unlabeled = stack_slices(make_cases(12, 1, "unl"), 32, keep_labels=False)
    return Batch(labeled.images[:4], labeled.labels[:4].long(), unlabeled.images[:4])


def build(name: str, *overrides: str) -> Method:
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY, f"method.name={name}", *overrides])
    return build_run_method(cfg, in_channels=1, num_classes=4).train()


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


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mean_teacher", []),
        # Confidence gating switches the unlabelled terms on as predictions sharpen, so the
        # loss is only comparable over time with every pixel kept.
        ("unimatch", ["method.conf_thresh=0"]),
        ("cps", []),
        ("bcp", ["method.pretrain_fraction=1"]),  # stage 1 throughout
        ("bcp", ["method.pretrain_fraction=0"]),  # stage 2 throughout
    ],
)
def test_loss_decreases_on_a_fixed_batch(name: str, overrides: list[str], batch: Batch) -> None:
    losses = train(build(name, *overrides), batch, range(STEPS))
    assert decreased(losses), losses


def test_decrease_check_fails_without_learning(batch: Batch) -> None:
    assert not decreased(train(build("mean_teacher"), batch, range(10), lr=0.0))


def test_mean_teacher_ramp_up() -> None:
    method = build("mean_teacher", "method.consistency_rampup=0.4", "train.iterations=100")
    assert method.consistency_weight(0) == pytest.approx(0.1 * torch.e**-5) and method.consistency_weight(0) < 1e-3
    assert method.consistency_weight(20) == pytest.approx(0.1 * torch.e**-1.25)
    assert method.consistency_weight(40) == pytest.approx(0.1)
    assert method.consistency_weight(100) == pytest.approx(0.1)


def test_mean_teacher_logs_the_ramped_weight(batch: Batch) -> None:
    out = build("mean_teacher").training_step(batch, 0)
    assert float(out.logs["consistency_weight"]) < 1e-3


def test_unimatch_ignores_low_confidence_pixels(batch: Batch) -> None:
    out = build("unimatch", "method.conf_thresh=1.01").training_step(batch, 0)
    for key in ("loss_s1", "loss_s2", "loss_fp", "mask_ratio"):
        assert out.logs[key] == 0, key
    assert torch.allclose(out.loss, out.logs["loss_x"] / 2)


def test_unimatch_keeps_every_pixel_at_threshold_zero(batch: Batch) -> None:
    out = build("unimatch", "method.conf_thresh=0").training_step(batch, 0)
    assert out.logs["mask_ratio"] == 1 and out.logs["loss_fp"] > 0


def test_bcp_stage_switch(batch: Batch) -> None:
    method = build("bcp", "train.iterations=4", "method.pretrain_fraction=0.5")
    assert method.pretrain_steps == 2
    # Pre-training must not read unlabelled images: NaNs there would poison the loss.
    poisoned = Batch(batch.labeled, batch.labels, torch.full_like(batch.unlabeled, float("nan")))
    losses = train(method, poisoned, range(2))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    student = {k: v.clone() for k, v in method.student.state_dict().items()}
    teacher = method.teacher.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)

    # The switch step copies the student before its own forward pass moves the batch-norm statistics.
    out = method.training_step(batch, 2)
    assert "loss_mix_unl" in out.logs
    teacher = method.teacher.state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)

    optimizer = sgd(method)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    method.after_step(2)
    student, teacher = method.student.state_dict(), method.teacher.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)


def test_bcp_largest_component() -> None:
    from vqseg.methods.bcp import largest_components

    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :3, :3] = 1  # 9 pixels
    labels[0, 6:, 6:] = 1  # 4 pixels, dropped
    labels[0, 4, 4] = 2  # the only component of class 2, kept
    labels[0, 3, 3] = 1  # touches the first block diagonally: 8-connected, kept
    expected = labels.clone()
    expected[0, 6:, 6:] = 0
    assert torch.equal(largest_components(labels, 4), expected)


@pytest.mark.parametrize("name", ["mean_teacher", "unimatch", "bcp", "cps"])
def test_pdcr_on_labelled_pixels(name: str, batch: Batch) -> None:
    method = build(name, "pdcr.layers=[{name: encoder.downs.0, num_samples: 8}]")
    out = method.training_step(batch, 0)
    assert "pdcr/total" in out.logs and torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["mean_teacher", "unimatch", "cps"])
def test_pdcr_on_unlabelled_rows_uses_confident_pseudo_labels(name, monkeypatch, batch: Batch):
    from vqseg.methods.base import Method

    seen = {}
    original = Method.pdcr_term

    def spy(self, labels, ignore=None):
        seen["ignored_unlabeled"] = ignore[labels.shape[0] // 2 :].float().mean().item()
        return original(self, labels, ignore)

    monkeypatch.setattr(Method, "pdcr_term", spy)
    layers = "pdcr.layers=[{name: encoder.downs.3, num_samples: 8, weight: 0.1}]"
    for unlabeled, expected in (("false", 1.0), ("true", 0.0)):
        method = build(name, layers, f"pdcr.unlabeled={unlabeled}", "pdcr.unlabeled_threshold=0.0")
        method.training_step(batch, 0)
        assert seen["ignored_unlabeled"] == expected, (name, unlabeled)
