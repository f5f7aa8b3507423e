"""Exponential moving average of a network: the teacher of Mean Teacher, BCP and VQ-Seg."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _non_persistent(module: nn.Module) -> dict[str, nn.Module]:
    """Buffers kept out of the state dict (constants, or caches a module may hold in one mode only), by owner."""
    return {
        f"{prefix}.{name}" if prefix else name: sub
        for prefix, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
    }


def _pair_by_name(kind: str, teacher: dict[str, Tensor], student: dict[str, Tensor], optional: set[str]) -> list:
    """(teacher, student) tensors with the same name; a name on one side only is an error unless optional."""
    only_teacher = sorted(set(teacher) - set(student) - optional)
    only_student = sorted(set(student) - set(teacher) - optional)
    if only_teacher or only_student:
        raise ValueError(
            f"EMA teacher and student {kind} differ: only in the teacher {only_teacher or '-'}, "
            f"only in the student {only_student or '-'}"
        )
    return [(t, student[name]) for name, t in teacher.items() if name in student]


def _rebuild_caches(owners: Iterable[nn.Module]) -> None:
    """Recompute mode-dependent caches from the averaged weights by re-applying each owner's mode.

    TinyViT's attention builds its bias table ``ab`` in ``train(False)``: a teacher that stays in eval
    mode would otherwise keep the table of the weights it was copied with (and an average with the
    student's table, itself as old as the student's last mode switch). ``train`` recurses, so the
    owner's submodules get their own modes back afterwards; owners come outermost first, so a nested
    owner is rebuilt last, in its own mode.
    """
    for owner in owners:
        modes = [(m, m.training) for m in owner.modules()]
        owner.train(owner.training)
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """theta_t <- a theta_t + (1 - a) theta_s with a = min(1 - 1/(step+1), decay) (Mean Teacher warm-up).

    Tensors are paired by name, so registration order does not matter, and a teacher that does not
    have the student's parameters and persistent buffers is refused. Parameters the student does
    not train (``requires_grad`` False: a frozen pretrained backbone, VQ's fixed code table) are
    left alone: they equal the student's, and averaging them costs time and adds rounding.
    Floating-point buffers (batch-norm running statistics) are averaged the same way, as BCP does:
    copying the student's statistics into a teacher with averaged weights pairs statistics with
    weights they were not measured on, which we found to wreck an eval-mode teacher early in
    training. Integer buffers (batch counters) are copied. A non-persistent buffer may be a cache that exists in one mode only
    (the teacher predicts in eval mode, the student trains): one that only one side has is skipped,
    and the teacher's are then rebuilt from the new weights.
    """
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    params = _pair_by_name("parameters", dict(teacher.named_parameters()), dict(student.named_parameters()), set())
    t_extra, s_extra = _non_persistent(teacher), _non_persistent(student)
    t_buffers, s_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
    buffers = _pair_by_name("buffers", t_buffers, s_buffers, {*t_extra, *s_extra})
    for t, s in params:
        if s.requires_grad:
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in buffers:
        if t.is_floating_point():
            t.mul_(alpha).add_(s, alpha=1.0 - alpha)
        else:
            t.copy_(s)
    _rebuild_caches(dict.fromkeys(t_extra.values()))  # unique owners, in module order
