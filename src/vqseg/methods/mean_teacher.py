"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) as the ACDC baseline of SSL4MIS.

Source: HiLab-git/SSL4MIS, ``code/train_mean_teacher_2D.py`` (ema_decay 0.99, consistency 0.1,
consistency_rampup 200, consistency_type mse, noise clamp(randn * 0.1, -0.2, 0.2)).

    L = L_sup(f_s(x_l), y_l) + w(t) * mean_{n,c,h,w} (softmax f_s(u) - softmax f_t(u + eta))^2
    w(t) = lambda * exp(-5 (1 - min(t / T, 1))^2),   theta_t <- a theta_t + (1 - a) theta_s

- L_sup: (CE + Dice)/2 on weakly (geometrically) augmented labelled slices; the student sees the
  labelled and unlabelled slices in one pass, as SSL4MIS does.
- Consistency: MSE between the softmax outputs of the student on the weak unlabelled view and of
  the EMA teacher on the same view plus Gaussian noise eta = clamp(0.1 n, -0.2, 0.2).
  SSL4MIS adds noise to the teacher's input only; ``student_noise`` also gives the student its
  own independent draw, as in the paper's two noisy views.
- Ramp-up: SSL4MIS evaluates the sigmoid ramp at ``iter // 150`` with length 200, i.e. it reaches
  lambda at iteration 30000 = the whole run, so ``consistency_rampup`` (a fraction of
  ``train.iterations``) defaults to 1.0. SSL4MIS also zeroes the consistency term for the first
  1000 iterations, where the ramp is below 1e-3 of lambda anyway; that step is not reproduced.

Deviation forced by the engine: the teacher predicts in eval mode (SSL4MIS leaves it in train
mode, so its batch norm uses batch statistics and its dropout is active), with batch-norm running
statistics that are an exponential moving average of the student's, updated with the weights
(``engine.ema.ema_update``; SSL4MIS averages parameters only). Evaluation uses the student, as
SSL4MIS does. PDCR, when configured, reads the student's pass over labelled + unlabelled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from vqseg.config import MethodConfig, check_range
from vqseg.data.provenance import on_image
from vqseg.methods.base import Batch, Method, StepOutput, labeled_pdcr, seg_loss, sigmoid_rampup
from vqseg.modules.ema import ema_update, make_teacher
from vqseg.registry import METHODS


@dataclass
class MeanTeacherConfig(MethodConfig):
    name: str = "mean_teacher"
    ema_decay: float = 0.99
    consistency: float = 0.1  # lambda
    consistency_rampup: float = 1.0  # T, as a fraction of train.iterations
    noise_std: float = 0.1
    noise_clip: float = 0.2
    student_noise: bool = False

    def __post_init__(self) -> None:
        check_range("method.ema_decay", self.ema_decay, 0, 1)
        for key in ("consistency", "consistency_rampup", "noise_std", "noise_clip"):
            check_range(f"method.{key}", getattr(self, key), 0)


@METHODS.register("mean_teacher", config=MeanTeacherConfig)
class MeanTeacher(Method):
    def __init__(self, cfg, model_factory, num_classes: int) -> None:
        super().__init__(cfg, model_factory, num_classes)
        self.params: MeanTeacherConfig = cfg.method
        self.teacher = make_teacher(self.student)

    def consistency_weight(self, step: int) -> float:
        p = self.params
        return p.consistency * sigmoid_rampup(self.progress(step), p.consistency_rampup)

    def _noisy(self, images: Tensor) -> Tensor:
        """Input noise on the image channels (provenance channels, if any, stay exact)."""
        p = self.params
        return on_image(
            images, self.cfg.data.in_channels,
            lambda x: x + (torch.randn_like(x) * p.noise_std).clamp(-p.noise_clip, p.noise_clip),
        )

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        x_l, y_l, _ = self.augment.geometric(batch.labeled, batch.labels)
        u, _, _ = self.augment.geometric(batch.unlabeled)
        n_l = x_l.shape[0]
        with self.pdcr_capture():
            logits = self.student(torch.cat([x_l, self._noisy(u) if self.params.student_noise else u]))
        loss_sup = seg_loss(logits[:n_l], y_l, self.num_classes)
        with torch.no_grad():
            teacher_logits = self.teacher(self._noisy(u))
        teacher_probs = teacher_logits.float().softmax(dim=1)
        loss_pdcr, logs = labeled_pdcr(self, y_l, u.shape[0], teacher_logits)
        loss_cons = F.mse_loss(logits[n_l:].float().softmax(dim=1), teacher_probs)
        weight = self.consistency_weight(step)
        logs.update({
            "loss_sup": loss_sup.detach(),
            "loss_cons": loss_cons.detach(),
            "consistency_weight": torch.tensor(weight),
        })
        return StepOutput(loss_sup + weight * loss_cons + loss_pdcr, logs)

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.params.ema_decay, step)
