"""Exponential moving average of a network: the teacher of Mean Teacher, BCP and VQ-Seg."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """theta_t <- a theta_t + (1 - a) theta_s with a = min(1 - 1/(step+1), decay) (Mean Teacher warm-up).

    Floating-point buffers (batch-norm running statistics) are averaged the same way, as BCP does:
    copying the student's statistics into a teacher with averaged weights pairs statistics with
    weights they were not measured on, which we found to wreck an eval-mode teacher early in
    training. Integer buffers (batch counters) are copied.
    """
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.mul_(alpha).add_(s, alpha=1.0 - alpha)
        else:
            t.copy_(s)
