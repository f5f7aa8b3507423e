"""Cross Pseudo Supervision (Chen, Yuan, Zeng, Wang, CVPR 2021) as the ACDC baseline of SSL4MIS.

Source: HiLab-git/SSL4MIS, ``code/train_cross_pseudo_supervision_2D.py`` (consistency 0.1,
consistency_rampup 200 at ``iter // 150``, i.e. the whole 30000-iteration run; network 1
Kaiming-normal and network 2 Xavier-normal initialised).

    L = sum_{k=1,2} L_sup(f_k(x_l), y_l) + w(t) * [CE(f_1(u), argmax f_2(u)) + CE(f_2(u), argmax f_1(u))]

with L_sup = (CE + Dice)/2 and w(t) the sigmoid ramp-up of Mean Teacher. Both networks see the
same weakly augmented batch (labelled and unlabelled slices in one pass each) and are optimised
together. Evaluation uses network 1 (``student``); SSL4MIS validates both and keeps both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.config import MethodConfig, check_range
from vqseg.methods.base import Batch, Method, StepOutput, labeled_pdcr, seg_loss, sigmoid_rampup
from vqseg.models import pretrained
from vqseg.registry import METHODS


@dataclass
class CPSConfig(MethodConfig):
    name: str = "cps"
    consistency: float = 0.1
    consistency_rampup: float = 1.0  # fraction of train.iterations

    def __post_init__(self) -> None:
        check_range("method.consistency", self.consistency, 0)
        check_range("method.consistency_rampup", self.consistency_rampup, 0)


def init_conv_weights(model: nn.Module, init: Callable[[Tensor], Tensor]) -> None:
    """SSL4MIS's two initialisations (2D and 3D): ``init`` on every convolution's weight, batch or
    affine instance norm to identity; a pretrained backbone keeps its weights (only the head and stem
    differ between the two networks)."""
    kept = {id(m) for backbone in pretrained.pretrained_backbones(model) for m in backbone.modules()}
    for m in model.modules():
        if id(m) in kept:
            continue
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            init(m.weight)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@METHODS.register("cps", config=CPSConfig)
class CPS(Method):
    def __init__(self, cfg, model_factory, num_classes: int) -> None:
        super().__init__(cfg, model_factory, num_classes)
        self.params: CPSConfig = cfg.method
        self.peer = model_factory()
        init_conv_weights(self.student, nn.init.kaiming_normal_)
        init_conv_weights(self.peer, nn.init.xavier_normal_)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        p = self.params
        x_l, y_l, _ = self.augment.geometric(batch.labeled, batch.labels)
        u, _, _ = self.augment.geometric(batch.unlabeled)
        n_l = x_l.shape[0]
        inputs = torch.cat([x_l, u])
        with self.pdcr_capture():
            logits_1 = self.student(inputs)
        logits_2 = self.peer(inputs)
        loss_pdcr, logs = labeled_pdcr(self, y_l, u.shape[0], logits_2[n_l:].detach())

        loss_sup_1 = seg_loss(logits_1[:n_l], y_l, self.num_classes)
        loss_sup_2 = seg_loss(logits_2[:n_l], y_l, self.num_classes)
        u_1, u_2 = logits_1[n_l:].float(), logits_2[n_l:].float()
        loss_cps = F.cross_entropy(u_1, u_2.detach().argmax(dim=1)) + F.cross_entropy(u_2, u_1.detach().argmax(dim=1))
        weight = p.consistency * sigmoid_rampup(self.progress(step), p.consistency_rampup)
        logs.update({
            "loss_sup_1": loss_sup_1.detach(),
            "loss_sup_2": loss_sup_2.detach(),
            "loss_cps": loss_cps.detach(),
            "consistency_weight": torch.tensor(weight),
        })
        return StepOutput(loss_sup_1 + loss_sup_2 + weight * loss_cps + loss_pdcr, logs)
