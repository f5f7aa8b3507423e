"""UniMatch (Yang, Qi, Feng, Zhang, Shi, CVPR 2023): unified image- and feature-level perturbations.

Source: LiheYoung/UniMatch, ``more-scenarios/medical/unimatch.py`` with ``configs/acdc.yaml``
(lr 0.01, conf_thresh 0.95, batch 12 + 12), ``model/unet.py`` (``need_fp``: Dropout2d(0.5) on
every encoder feature) and ``util/utils.py`` (Dice with an ignore mask).

    L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2

- One network, no EMA. Labelled slices and the weak unlabelled view share one encoder pass; the
  weak logits p_w give pseudo-labels argmax p_w kept where max softmax p_w >= 0.95.
- L_x: (CE + Dice)/2 on the labelled slices.
- L_s1, L_s2: two strong views of the same weak view, each with its own intensity draw and CutMix,
  against the pseudo-labels mixed by the same CutMix box. As in the UniMatch medical code these
  unlabelled terms are Dice only (with low-confidence pixels ignored), not CE + Dice.
- L_fp: the decoder on the weak view's encoder levels after Dropout2d(0.5), against the same
  pseudo-labels (a pretrained backbone's image stem is not an encoder level: UniMatch V2's DPT has
  none, and it is left unperturbed).

CutMix partners: UniMatch pastes from a second unlabelled batch whose pseudo-labels come from an
extra eval-mode pass. Here each strong view pastes from another image of the same batch (the
permutation of :func:`make_unlabeled_views`) and takes that image's pseudo-label from the weak
pass already computed, so no extra forward pass is needed; those pseudo-labels come from the
train-mode network, like UniMatch's own (non-pasted) pseudo-labels.

The clean and the perturbed features are decoded in two passes (UniMatch decodes both, labelled
rows included, in one batch). PDCR, when configured, reads the clean encoder + decoder pass over
labelled and weak unlabelled rows (captured explicitly), never the perturbed or strong passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqseg.config import MethodConfig, check_range
from vqseg.methods.base import (
    Batch,
    Method,
    StepOutput,
    channel_dropout,
    confident_labels,
    dice_loss,
    labeled_pdcr,
    make_unlabeled_views,
    seg_loss,
    strong_view,
)
from vqseg.registry import METHODS


@dataclass
class UniMatchConfig(MethodConfig):
    name: str = "unimatch"
    conf_thresh: float = 0.95
    fp_dropout: float = 0.5  # Dropout2d rate of the feature-perturbation stream
    weight_strong: float = 0.25  # per strong view
    weight_fp: float = 0.5

    def __post_init__(self) -> None:
        check_range("method.conf_thresh", self.conf_thresh, 0, 1)
        check_range("method.fp_dropout", self.fp_dropout, 0, 1, high_open=True)
        check_range("method.weight_strong", self.weight_strong, 0)
        check_range("method.weight_fp", self.weight_fp, 0)


@METHODS.register("unimatch", config=UniMatchConfig)
class UniMatch(Method):
    strong_views = True

    def __init__(self, cfg, model_factory, num_classes: int) -> None:
        super().__init__(cfg, model_factory, num_classes)
        self.params: UniMatchConfig = cfg.method

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        p = self.params
        x_l, y_l, _ = self.augment.geometric(batch.labeled, batch.labels)
        views1 = make_unlabeled_views(self.augment, batch.unlabeled, features=self.strong_features)
        views2 = strong_view(self.augment, views1.weak, views1.theta, features=self.strong_features)
        n_l, n_u = x_l.shape[0], views1.weak.shape[0]

        with self.pdcr_capture():
            features = self.student.encode(torch.cat([x_l, views1.weak]))
            logits_x, logits_w = self.student.decode(features).split([n_l, n_u])
        loss_pdcr, logs = labeled_pdcr(self, y_l, n_u, logits_w)
        unlabeled = features.rows(slice(n_l, None))  # the encoder's levels, not a pretrained image stem
        logits_fp = self.student.decode(
            unlabeled.with_levels([channel_dropout(f, p.fp_dropout) for f in unlabeled.levels])
        )
        logits_s1, logits_s2 = self.student(torch.cat([views1.strong, views2.strong])).chunk(2)

        pseudo, ignore = confident_labels(logits_w, p.conf_thresh)
        loss_x = seg_loss(logits_x, y_l, self.num_classes)
        loss_s1 = dice_loss(logits_s1, views1.mix(pseudo), self.num_classes, views1.mix(ignore))
        loss_s2 = dice_loss(logits_s2, views2.mix(pseudo), self.num_classes, views2.mix(ignore))
        loss_fp = dice_loss(logits_fp, pseudo, self.num_classes, ignore)
        loss = (loss_x + p.weight_strong * (loss_s1 + loss_s2) + p.weight_fp * loss_fp) / 2 + loss_pdcr
        logs.update({
            "loss_x": loss_x.detach(),
            "loss_s1": loss_s1.detach(),
            "loss_s2": loss_s2.detach(),
            "loss_fp": loss_fp.detach(),
            "mask_ratio": (~ignore).float().mean(),
        })
        return StepOutput(loss, logs)
