"""BCP, Bidirectional Copy-Paste (Bai, Chen, Li, Zhang, Wang, CVPR 2023).

Source: DeepMed-Lab-ECNU/BCP, ``code/ACDC_BCP_train.py`` (pre_iterations 10000, max_iterations
30000, lr 0.01, u_weight 0.5, EMA 0.99, ``generate_mask``, ``mix_loss``, ``get_ACDC_masks`` with
nms=1, i.e. largest connected component per class).

A zero-centred mask M is 0 inside one random box of 2/3 the image side (shared by the batch) and 1
outside; with the box B = 1 - M, a batch's labelled (x_a, x_b) and unlabelled (u_a, u_b) halves:

- Stage 1, pre-training, the first ``pretrain_iterations`` of ``train.iterations``, labelled only:
  x = x_a M + x_b B, y = y_a M + y_b B, L = mix_loss(f(x), y; 1, 1). Validation runs as usual and
  :meth:`BCP.after_validation` keeps the student with the best validation Dice (part of the state,
  so a resumed run picks the same one).
- Stage 2, self-training: student and EMA teacher both restart from that best pre-trained student
  (BCP's ``load_net_opt`` / ``load_net`` of ``unet_best_model.pth``), then

      x_unl = u_a M + x_a B    (labelled patch pasted into an unlabelled image)
      x_lab = x_b M + u_b B    (unlabelled patch pasted into a labelled image)
      L = mix_loss(f(x_unl), p_a M + y_a B; w_M = alpha, w_B = 1)
        + mix_loss(f(x_lab), y_b M + p_b B; w_M = 1, w_B = alpha)

  with p = argmax f_t(u) (largest connected component per class, optional) and alpha = u_weight.
  mix_loss(.; w_M, w_B) = w_M (CE + Dice)/2 over the pixels outside the box + w_B (CE + Dice)/2
  over the pixels inside it, each term normalised over its own pixels as BCP's ``mix_loss``;
  seen per pixel, ground-truth pixels weigh 1 and pseudo-labelled pixels alpha.

Schedule. ``pretrain_iterations`` counts inside ``train.iterations`` (unset: a quarter of it, BCP's
10k of 10k + 30k); BCP's own recipe is ``train.iterations=40000 method.pretrain_iterations=10000
train.val_every=200 train.poly_power=0``. BCP keeps lr 0.01 constant in both stages and its
self-training optimiser resumes the best checkpoint's state. Here the engine's one optimiser and
lr schedule run across the switch (poly unless ``train.poly_power=0``, the same schedule as every
other method of a benchmark); only the SGD momentum buffer differs from BCP's at the switch (the
last pre-training step's instead of the best checkpoint's), a difference that decays by 0.9 per
step. The released script's ``pre_train`` loops to ``max_iterations`` although it defines
``pre_iterations=10000``; the 10k of the paper is followed.

Other differences from the BCP code: the two mixed batches share one student pass, so batch norm
sees both together; the teacher predicts in eval mode (BCP calls ``ema_model.train()``) with
batch-norm running statistics averaged like the weights (as BCP's ``update_model_ema``, which
averages every state entry). ``best.pt`` is chosen over every validation, pre-training included;
evaluation uses the student, as BCP. With unequal labelled and unlabelled batches, images past the
smaller batch's even size are unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage
from torch import Tensor

from vqseg.config import ConfigError, MethodConfig, check_range
from vqseg.data.augment import mix
from vqseg.methods.base import Batch, Method, StepOutput, seg_loss
from vqseg.modules.ema import ema_update, make_teacher
from vqseg.registry import METHODS


@dataclass
class BCPConfig(MethodConfig):
    name: str = "bcp"
    pretrain_iterations: int | None = None  # labelled-only steps within train.iterations; unset: a quarter
    u_weight: float = 0.5
    ema_decay: float = 0.99
    box_fraction: float = 2 / 3  # side of the pasted box relative to the image side
    largest_component: bool = True  # BCP's get_ACDC_2DLargestCC on the teacher's pseudo-labels

    def __post_init__(self) -> None:
        if self.pretrain_iterations is not None:
            check_range("method.pretrain_iterations", self.pretrain_iterations, 0)
        check_range("method.u_weight", self.u_weight, 0)
        check_range("method.ema_decay", self.ema_decay, 0, 1)
        check_range("method.box_fraction", self.box_fraction, 0, 1, low_open=True, high_open=True)


def paste_box(n: int, size: tuple[int, ...], fraction: float, device: torch.device) -> Tensor:
    """BCP's ``generate_mask`` (2D) and ``context_mask`` (3D) as an n x *size boolean box: one random
    position for the whole batch, each side ``fraction`` of the image's."""
    sides = [int(s * fraction) for s in size]
    starts = [int(torch.randint(0, max(s - b, 1), ())) for s, b in zip(size, sides)]
    box = torch.zeros(size, dtype=torch.bool, device=device)
    box[tuple(slice(a, a + b) for a, b in zip(starts, sides))] = True
    return box.expand(n, *size)


def largest_components(labels: Tensor, num_classes: int) -> Tensor:
    """Keep only the largest 8-connected (26 in 3D) component of each foreground class per image; the
    rest is background."""
    structure = ndimage.generate_binary_structure(labels.ndim - 1, labels.ndim - 1)
    maps = labels.cpu().numpy()
    kept = np.zeros_like(maps)
    for label_map, out in zip(maps, kept):
        for c in range(1, num_classes):
            components, count = ndimage.label(label_map == c, structure)
            if count:
                largest = np.bincount(components.ravel())[1:].argmax() + 1
                out[components == largest] = c
    return torch.from_numpy(kept).to(labels.device)


def mix_loss(logits: Tensor, target: Tensor, box: Tensor, w_outside: float, w_inside: float, classes: int) -> Tensor:
    """BCP's ``mix_loss``: (CE + Dice)/2 outside and inside the box, each over its own pixels."""
    outside = seg_loss(logits, target, classes, ignore=box)
    inside = seg_loss(logits, target, classes, ignore=~box)
    return w_outside * outside + w_inside * inside


@METHODS.register("bcp", config=BCPConfig)
class BCP(Method):
    def __init__(self, cfg, model_factory, num_classes: int) -> None:
        super().__init__(cfg, model_factory, num_classes)
        self.params: BCPConfig = cfg.method
        t = cfg.train
        if min(t.batch_size, t.unlabeled_batch_size) < 2:
            raise ConfigError("bcp pastes between batch halves: train.batch_size and unlabeled_batch_size must be >= 2")
        given = self.params.pretrain_iterations
        self.pretrain_steps = t.iterations // 4 if given is None else given
        if self.pretrain_steps >= t.iterations:
            raise ConfigError(
                f"method.pretrain_iterations={self.pretrain_steps} leaves no self-training within "
                f"train.iterations={t.iterations}"
            )
        if 0 < self.pretrain_steps < t.val_every:
            raise ConfigError(
                f"bcp self-trains from the pre-trained student with the best validation Dice, but "
                f"train.val_every={t.val_every} > method.pretrain_iterations={self.pretrain_steps}: "
                "pre-training would never be validated"
            )
        self.teacher = make_teacher(self.student)
        self.pretrained = make_teacher(self.student)  # the best pre-training student on validation
        self.register_buffer("pretrained_dice", torch.tensor(-1.0, dtype=torch.float64))

    def _box(self, n: int, like: Tensor) -> Tensor:
        return paste_box(n, tuple(like.shape[2:]), self.params.box_fraction, like.device)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        x_l, y_l, _ = self.augment.geometric(batch.labeled, batch.labels)
        if step < self.pretrain_steps:
            return self._pretrain_step(x_l, y_l)
        if step == self.pretrain_steps and step > 0:
            self._start_self_training()
        return self._self_train_step(x_l, y_l, batch.unlabeled)

    def after_validation(self, step: int, score: float) -> None:
        """Keep the pre-training student with the best validation Dice (``step`` steps done)."""
        if step <= self.pretrain_steps and score > self.pretrained_dice:
            self.pretrained.load_state_dict(self.student.state_dict())
            self.pretrained_dice.fill_(score)

    def _start_self_training(self) -> None:
        """Student and teacher restart from the chosen pre-trained student, as BCP's self_train."""
        if dist.is_available() and dist.is_initialized():  # only rank 0 validates and chooses
            for tensor in [*self.pretrained.parameters(), *self.pretrained.buffers(), self.pretrained_dice]:
                dist.broadcast(tensor, src=0)
        if self.pretrained_dice < 0:
            raise RuntimeError("bcp reached self-training without a validated pre-training student")
        state = self.pretrained.state_dict()
        self.student.load_state_dict(state)
        self.teacher.load_state_dict(state)

    def _pretrain_step(self, x_l: Tensor, y_l: Tensor) -> StepOutput:
        h = x_l.shape[0] // 2
        box = self._box(h, x_l)
        x = mix(box, x_l[h : 2 * h], x_l[:h])
        y = mix(box, y_l[h : 2 * h], y_l[:h])
        with self.pdcr_capture():
            logits = self.student(x)
        loss = mix_loss(logits, y, box, 1.0, 1.0, self.num_classes)
        loss_pdcr, logs = self.pdcr_term(y)
        logs["loss_pretrain"] = loss.detach()
        return StepOutput(loss + loss_pdcr, logs)

    def _self_train_step(self, x_l: Tensor, y_l: Tensor, unlabeled: Tensor) -> StepOutput:
        p = self.params
        u, _, _ = self.augment.geometric(unlabeled)
        h = min(x_l.shape[0], u.shape[0]) // 2
        x_a, x_b, y_a, y_b = x_l[:h], x_l[h : 2 * h], y_l[:h], y_l[h : 2 * h]
        u_a, u_b = u[:h], u[h : 2 * h]
        with torch.no_grad():
            pseudo = self.teacher(u[: 2 * h]).argmax(dim=1)
        if p.largest_component:
            pseudo = largest_components(pseudo, self.num_classes)
        p_a, p_b = pseudo[:h], pseudo[h:]
        box = self._box(h, x_l)

        with self.pdcr_capture():
            logits = self.student(torch.cat([mix(box, x_a, u_a), mix(box, u_b, x_b)]))
        logits_unl, logits_lab = logits.split([h, h])
        target_unl, target_lab = mix(box, y_a, p_a), mix(box, p_b, y_b)
        loss_unl = mix_loss(logits_unl, target_unl, box, p.u_weight, 1.0, self.num_classes)
        loss_lab = mix_loss(logits_lab, target_lab, box, 1.0, p.u_weight, self.num_classes)
        loss_pdcr, logs = self.pdcr_term(torch.cat([target_unl, target_lab]), torch.cat([~box, box]))
        logs.update({"loss_mix_unl": loss_unl.detach(), "loss_mix_lab": loss_lab.detach()})
        return StepOutput(loss_unl + loss_lab + loss_pdcr, logs)

    def after_step(self, step: int) -> None:
        if step >= self.pretrain_steps:
            ema_update(self.teacher, self.student, self.params.ema_decay, step)
