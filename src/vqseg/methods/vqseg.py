"""VQ-Seg (Yang, Xing, Zhu, NeurIPS 2025): consistency learning with perturbation in a VQ space.

    L = L_sup + lambda_u L_u + lambda_rec L_rec + lambda_align L_align + lambda_vq L_vq

- L_sup: (CE + Dice)/2 of the student on weakly augmented labelled slices.
- L_u: the student on the strong view of unlabelled slices, with its code indices perturbed by
  QPM (or by feature dropout, for the paper's comparison), against the EMA teacher's argmax on
  the weak view (pixels under ``threshold`` confidence ignored; 0 keeps all, as in the paper).
  By default the masked CE summed over kept pixels and divided by all pixels, as the released
  code (``u_loss``, ``u_normalise``). QPM's jumps are logged at logging steps (``vq*_jump_*``).
  ``dist_align`` (off by default; not in the paper) first aligns the teacher's class
  probabilities to the labelled masks' class frequencies (see `DistributionAlignment`).
- L_rec: L1 image reconstruction from the post-VQ bottleneck (dual branch), unperturbed passes.
- L_align: patch InfoNCE between the post-VQ map (PFA: resize + 1x1 conv) and a frozen foundation
  model's features of the same view. Features are computed once per training slice (the per-slice
  cache of ``foundation.cached_slice_features``) and warped with the view's affine, since the
  encoder costs seconds per image on a CPU; cells the warp fills with zero padding are not
  sampled. On a pretrained backbone (``model.name`` litemedsam or dinov2) PFA aligns to
  ``method.foundation`` only if that is another model; aligning a backbone to a frozen copy of
  itself is degenerate, so it is then off (with a note), whatever the preset says.
- L_vq: codebook + beta * commitment of every quantizer.

``ablation`` presets reproduce the paper's table rows: base (VQ only), qpm, qpm_db, qpm_pfa, all.
Defaults depart from the paper where its values collapsed here: lambda_align 1 (paper 5) and a
20 % sigmoid ramp-up of lambda_u (paper none), and QPM's temperature is relative (see qpm.py).

Choices where the paper is silent, for a batch-norm CNN backbone (the paper uses DINOv2): the
backbone's dropout is off and the perturbed pass does not update batch-norm running statistics
(both corrupt what the quantizer and evaluation see); codes are looked up L2-normalised in a
32-wide space (``cosine``, ``code_dim``); the reconstruction branch decodes the bottleneck alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.config import ConfigError, MethodConfig, check_range, resolve_path
from vqseg.data.augment import Augmenter, mix
from vqseg.data.provenance import split_channels
from vqseg.methods.base import (
    U_LOSSES,
    U_NORMALISATIONS,
    Batch,
    ClassThresholds,
    DistributionAlignment,
    Method,
    StepOutput,
    confident_labels,
    make_unlabeled_views,
    seg_loss,
    sigmoid_rampup,
    unlabeled_loss,
)
from vqseg.models import frozen_running_stats
from vqseg.models.vq_net import VQSegNet
from vqseg.modules import foundation, pfa
from vqseg.modules.ema import ema_update, make_teacher
from vqseg.modules.qpm import DEFAULT_TEMPERATURE, QPM
from vqseg.modules.sam_refine import EMBED_GRID, PROMPT_FRAME, SAMRefiner
from vqseg.registry import METHODS

ABLATIONS = {
    "base": {"perturbation": "none", "dual_branch": False, "pfa": False},
    "qpm": {"perturbation": "qpm", "dual_branch": False, "pfa": False},
    "qpm_db": {"perturbation": "qpm", "dual_branch": True, "pfa": False},
    "qpm_pfa": {"perturbation": "qpm", "dual_branch": False, "pfa": True},
    "all": {"perturbation": "qpm", "dual_branch": True, "pfa": True},
}


@dataclass
class VQSegConfig(MethodConfig):
    name: str = "vqseg"
    ablation: str = ""  # one of ABLATIONS: sets perturbation / dual_branch / pfa (a clash is an error)
    perturbation: str | None = None  # qpm | shuffle | dropout | none; unset: the preset's, else qpm
    eps: float = 0.7  # QPM strength
    temperature: float = DEFAULT_TEMPERATURE  # in units of each code's nearest-neighbour distance
    dropout: float = 0.5  # rate of the `dropout` perturbation mode
    codebook_size: int = 16384
    vq_levels: list[int] = field(default_factory=lambda: [-1])
    beta: float = 0.25
    cosine: bool = True  # L2-normalised codes and features (prevents collapse on CNN features)
    code_dim: int = 32  # width of the code lookup space (factorized codes); 0 = the feature width
    vq_center: bool = False  # standardise features (affine-free batch norm) before the lookup (frozen encoders)
    # The codebook on the level average-pooled by this factor (not in the paper; 1 = the level itself):
    # the quantized coarse map replaces the level's block means, its finer detail is kept (a fine level,
    # e.g. LiteMedSAM's neck at stride 4, would otherwise put 16x the tokens through a 16k codebook).
    vq_pool: int = 1
    backbone_dropout: bool = False  # keep the backbone's own dropout layers (see VQSeg.__init__)
    dual_branch: bool | None = None  # unset: the preset's, else on
    pfa: bool | None = None  # unset: the preset's, else on unless foundation is none
    foundation: str = "litemedsam"  # litemedsam | dinov2 | none
    foundation_weights: str = ""  # local file (required for dinov2; litemedsam ships its own)
    foundation_input: int = 0  # 0 = the encoder's native input size
    foundation_cache: str = ""  # folder of the per-slice cache; empty: $VQSEG_CACHE (default ~/.cache/vqseg)
    pfa_tau: float = 0.1
    pfa_samples: int = 256
    ema_decay: float = 0.99
    threshold: float = 0.95  # as the released code; 0 keeps every pixel (the paper)
    dist_align: bool = False  # align the teacher's class probabilities to the labelled prior (base.py)
    dist_align_momentum: float = 0.99  # running means over ~1 / (1 - momentum) steps
    # Against the drift to background on a frozen encoder (README, issue 26; not in the paper):
    class_thresholds: bool = False  # class-wise self-adaptive thresholds, `threshold` the highest (base.py)
    class_threshold_momentum: float = 0.99
    u_class_balance: bool = False  # each pseudo-labelled class weighs alike in the unlabelled CE
    anchor_labeled: bool = False  # paste a labelled box, with its ground truth, into each strong view
    # An extension, not VQ-Seg (issue 26, cause 5): LiteMedSAM's box-prompted mask decoder, on the
    # teacher's neck embedding of the weak view, checks each pseudo-labelled structure; only pixels
    # where it agrees with the teacher are kept (modules/sam_refine.py), in place of `threshold`
    sam_refine: bool = False
    sam_margin: float = 5.0  # pixels added around each structure's box
    cutmix: bool = True
    u_loss: str = "ce"  # ce (paper and released code) | ce_dice
    u_normalise: str = "valid"  # CE over all pixels (released code) | confident (over kept pixels)
    lambda_u: float = 1.0
    u_rampup: float = 0.2  # sigmoid ramp-up of lambda_u over this fraction of training (paper: 0)
    lambda_rec: float = 1.0
    lambda_align: float = 1.0  # paper: 5, which collapsed on the CPU schedule (results/failed/)
    lambda_vq: float = 1.0
    eval_teacher: bool = False  # validate/test with the EMA teacher instead of the student

    def __post_init__(self) -> None:
        self._check_ranges()
        if self.ablation and self.ablation not in ABLATIONS:
            raise ConfigError(f"method.ablation={self.ablation!r}; choose from {sorted(ABLATIONS)}")
        if self.pfa is None and not self.ablation and self.foundation == "none":
            self.pfa = False
        # Unset switches take the preset's value (no preset: the full method); a set one must agree
        # with an explicit preset, e.g. ablation=all with perturbation=dropout is refused.
        for key, value in ABLATIONS[self.ablation or "all"].items():
            given = getattr(self, key)
            if given is None:
                setattr(self, key, value)
            elif self.ablation and given != value:
                raise ConfigError(
                    f"method.ablation={self.ablation} sets method.{key}={value}, but method.{key}={given} "
                    "was also given; drop one of the two"
                )
        if self.perturbation not in ("qpm", "shuffle", "dropout", "none"):
            raise ConfigError(f"method.perturbation={self.perturbation!r}; choose qpm, shuffle, dropout or none")
        if self.pfa and self.foundation == "none":
            raise ConfigError("method.pfa needs a foundation model but method.foundation=none; set method.pfa=false")
        if self.u_loss not in U_LOSSES:
            raise ConfigError(f"method.u_loss={self.u_loss!r}; choose from {list(U_LOSSES)}")
        if self.u_normalise not in U_NORMALISATIONS:
            raise ConfigError(f"method.u_normalise={self.u_normalise!r}; choose from {list(U_NORMALISATIONS)}")

    def _check_ranges(self) -> None:
        """Every numeric setting, so that a bad value stops the run at start-up."""
        for key in ("eps", "threshold", "ema_decay", "u_rampup"):
            check_range(f"method.{key}", getattr(self, key), 0, 1)
        check_range("method.dist_align_momentum", self.dist_align_momentum, 0, 1, high_open=True)
        check_range("method.class_threshold_momentum", self.class_threshold_momentum, 0, 1, high_open=True)
        for key in ("temperature", "pfa_tau"):
            check_range(f"method.{key}", getattr(self, key), 0, low_open=True)
        for key in ("beta", "code_dim", "foundation_input", "lambda_u", "lambda_rec", "lambda_align", "lambda_vq"):
            check_range(f"method.{key}", getattr(self, key), 0)
        check_range("method.dropout", self.dropout, 0, 1, high_open=True)
        check_range("method.codebook_size", self.codebook_size, 2)  # QPM jumps between two codes at least
        check_range("method.pfa_samples", self.pfa_samples, 1)
        check_range("method.vq_pool", self.vq_pool, 1)
        check_range("method.sam_margin", self.sam_margin, 0)
        if not self.vq_levels:
            raise ConfigError("method.vq_levels is empty; give at least one encoder level to quantize (-1: deepest)")


@METHODS.register("vqseg", config=VQSegConfig)
class VQSeg(Method):
    strong_views = True

    def __init__(self, cfg, model_factory, num_classes: int) -> None:
        super().__init__(cfg, model_factory, num_classes)
        p: VQSegConfig = cfg.method
        self.params = p
        if not p.backbone_dropout:
            # Dropout before the quantizer flips code assignments between training and evaluation
            # (markedly slower learning on the phantom task with the SSL4MIS U-Net's encoder dropout).
            # The paper's DINOv2 backbone has none; QPM is the perturbation.
            for module in self.student.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        self.student = VQSegNet(
            self.student, cfg.data.in_channels, p.vq_levels, p.codebook_size, p.beta, p.dual_branch, p.cosine, p.code_dim,
            p.vq_center, p.vq_pool,
        )
        self.teacher = make_teacher(self.student)
        self.align = DistributionAlignment(num_classes, p.dist_align_momentum) if p.dist_align else None
        self.class_thresholds = (
            ClassThresholds(num_classes, p.threshold, p.class_threshold_momentum) if p.class_thresholds else None
        )
        self.sam = _sam_refiner(cfg, num_classes) if p.sam_refine else None
        self.perturb = None
        if p.perturbation in ("qpm", "shuffle"):
            self.perturb = QPM(p.eps, p.temperature, mode="jump" if p.perturbation == "qpm" else "shuffle")
        self.adapter: nn.Module | None = None
        self._cache: dict[str, Tensor] = {}
        # Aligning a pretrained backbone's post-VQ map to a frozen copy of the same network is
        # degenerate (the target is the backbone's own input to the quantizer): PFA then needs
        # another foundation model, else it is off.
        self.use_pfa = bool(p.pfa) and cfg.model.name != p.foundation
        if self.use_pfa and cfg.train.patch_size:
            raise ConfigError(
                f"method.pfa: PFA's foundation features are cached per resized slice, not per patch "
                f"(train.patch_size={cfg.train.patch_size}); set method.pfa=false or method.foundation=none"
            )
        if p.pfa and not self.use_pfa:
            print(f"vqseg: PFA off: the backbone is {cfg.model.name} itself; set method.foundation to another "
                  "model to align to it", file=sys.stderr, flush=True)

    def prepare(self, data) -> None:
        """Load the frozen foundation model and get every training slice's features from the
        per-slice cache (a slice met before, in any labelled split or seed, is not encoded again)."""
        super().prepare(data)
        p = self.params
        if not self.use_pfa:
            return
        encoder = foundation.build_foundation(p.foundation, p.foundation_weights or None, p.foundation_input or None)
        root = resolve_path(p.foundation_cache) if p.foundation_cache else None
        device = next(self.student.parameters()).device
        self._cache = {
            which: foundation.cached_slice_features(
                lambda x: [encoder(x)], encoder.cache_key(), f"pfa-{encoder.name}", images,
                shapes=[(encoder.dim, *encoder.grid)], root=root, progress=True,
            )[0].to(device)
            for which, images in (("labeled", data.labeled.images), ("unlabeled", data.unlabeled.images))
        }
        deepest = self.student.base.feature_channels[self.student.levels[-1]]
        self.adapter = pfa.PostVQAdapter(deepest, encoder.dim, encoder.grid).to(device)

    def predictor(self) -> nn.Module:
        return self.teacher if self.params.eval_teacher else self.student

    def _aligned_targets(self, which: str, index: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        """The cached features of the rows ``index`` warped with the view's affine, and where they
        are valid: a ones map warped alongside is ~1 only where every bilinear tap fell inside the
        slice (the warp pads with zeros, which must not act as InfoNCE positives)."""
        features = self._cache[which][index.to(self._cache[which].device)].float()
        ones = features.new_ones(features.shape[0], 1, *features.shape[2:])
        warped = Augmenter.warp(torch.cat([features, ones], dim=1), theta)
        return warped[:, :-1], warped[:, -1] > 0.999

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        p = self.params
        x_l, y_l, theta_l = self.augment.geometric(batch.labeled, batch.labels)
        views = make_unlabeled_views(self.augment, batch.unlabeled, p.cutmix, self.strong_features)
        if self.align is not None:
            self.align.observe_labels(y_l)
        sam_logs: dict[str, Tensor] = {}
        with torch.no_grad():
            pseudo, ignore = confident_labels(self.teacher(views.weak), p.threshold, self.align, self.class_thresholds)
            if self.sam is not None:
                neck = self.teacher.base.encoder(views.weak).levels[-1]
                ignore, sam_logs = self.sam(neck, pseudo)  # in place of the threshold's
        pseudo, ignore = views.mix(pseudo), views.mix(ignore)
        strong = views.strong
        if p.anchor_labeled:
            strong, pseudo, ignore = self._anchor(strong, pseudo, ignore, x_l, y_l)

        # Unperturbed student pass: labelled slices, plus the weak unlabelled views when the
        # reconstruction or alignment branches have something to learn from them.
        needs_unlabeled_clean = p.dual_branch or self.use_pfa
        clean_input = torch.cat([x_l, views.weak]) if needs_unlabeled_clean else x_l
        with self.pdcr_capture():
            clean = self.student.run(clean_input, reconstruct=p.dual_branch)
        n_l = x_l.shape[0]
        loss_sup = seg_loss(clean.logits[:n_l], y_l, self.num_classes)
        unlabeled_rows = torch.ones(clean_input.shape[0] - n_l, *y_l.shape[1:], dtype=torch.bool, device=y_l.device)
        loss_pdcr, pdcr_logs = self.pdcr_term(
            torch.cat([y_l, torch.zeros_like(unlabeled_rows, dtype=y_l.dtype)]),
            torch.cat([torch.zeros_like(y_l, dtype=torch.bool), unlabeled_rows]),
        )

        dropout = p.dropout if p.perturbation == "dropout" else 0.0
        # Frozen statistics: a batch-norm U-Net, unlike the paper's ViT. PDCR on pseudo-labels reads this pass.
        with frozen_running_stats(self.student), self.pdcr_capture(self.cfg.pdcr.unlabeled):
            perturbed = self.student.run(strong, perturb=self.perturb, dropout=dropout)
        loss_u = unlabeled_loss(perturbed.logits, pseudo, self.num_classes, ignore, p.u_loss, p.u_normalise,
                                p.u_class_balance)
        loss_pdcr_u, pdcr_u_logs = self.pseudo_label_pdcr(pseudo, ignore)
        loss_vq = 0.5 * (clean.vq_loss + perturbed.vq_loss)

        lambda_u = p.lambda_u * sigmoid_rampup(self.progress(step), p.u_rampup)
        loss = loss_sup + lambda_u * loss_u + p.lambda_vq * loss_vq + loss_pdcr + lambda_u * loss_pdcr_u
        logs = {
            **pdcr_logs,
            **pdcr_u_logs,
            **sam_logs,
            "loss_sup": loss_sup.detach(),
            "loss_u": loss_u.detach(),
            "loss_vq": loss_vq.detach(),
            "perplexity": clean.perplexity.detach(),
            "pseudo_kept": (~ignore).float().mean(),
        }
        if p.dual_branch:
            loss_rec = F.l1_loss(clean.recon, split_channels(clean_input, self.cfg.data.in_channels)[0])
            loss = loss + p.lambda_rec * loss_rec
            logs["loss_rec"] = loss_rec.detach()
        if self.use_pfa:
            (target_l, valid_l), (target_u, valid_u) = (
                self._aligned_targets("labeled", batch.labeled_index, theta_l),
                self._aligned_targets("unlabeled", batch.unlabeled_index, views.theta),
            )
            loss_align = pfa.patch_infonce(self.adapter(clean.post_vq), torch.cat([target_l, target_u]), p.pfa_tau,
                                       p.pfa_samples, valid=torch.cat([valid_l, valid_u]))
            loss = loss + p.lambda_align * loss_align
            logs["loss_align"] = loss_align.detach()
        if (step + 1) % self.cfg.train.log_every == 0:
            logs.update(self.student.code_usage())
            if self.perturb is not None:
                logs.update(self.student.jump_stats(perturbed))
        return StepOutput(loss, logs)

    def _anchor(
        self, strong: Tensor, pseudo: Tensor, ignore: Tensor, x_l: Tensor, y_l: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Paste a CutMix box of a labelled view (its own intensity draw) into each strong view, with
        the labelled ground truth as target inside it: every unlabelled step then also sees true
        structure sizes, as BCP's copy-paste does (whose pseudo-labels kept the structures' true
        areas where VQ-Seg's shrank, README)."""
        n = strong.shape[0]
        box = self.augment.cutmix_mask(n, tuple(strong.shape[2:]), strong.device)
        partner = torch.randint(x_l.shape[0], (n,), device=strong.device)
        pasted = self.augment.intensity(x_l)[partner]
        return mix(box, pasted, strong), mix(box, y_l[partner], pseudo), ignore & ~box

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.params.ema_decay, step)


def _sam_refiner(cfg, num_classes: int) -> SAMRefiner:
    """``method.sam_refine``: SAM's decoder reads LiteMedSAM's neck at 64 x 64 for a 256 px input, so the
    model must be LiteMedSAM with that input and its last level kept on the neck's grid."""
    m = cfg.model
    if m.name != "litemedsam" or m.encoder_input != PROMPT_FRAME or m.level_strides[-1] != PROMPT_FRAME // EMBED_GRID:
        raise ConfigError(
            f"method.sam_refine: SAM's mask decoder reads LiteMedSAM's neck at {EMBED_GRID} x {EMBED_GRID}; needs "
            f"model.name=litemedsam, model.encoder_input={PROMPT_FRAME} and model.level_strides ending in "
            f"{PROMPT_FRAME // EMBED_GRID} (got {m.name}, {m.encoder_input}, {m.level_strides})"
        )
    weights = None if m.tiny else foundation.litemedsam_weights(m.encoder_weights or None)
    return SAMRefiner(weights, num_classes, cfg.method.sam_margin, m.encoder_input)
