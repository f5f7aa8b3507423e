"""The contract between the training engine and a (semi-)supervised method.

A method owns the networks it trains (student, teacher, extra heads) and turns one batch into a
loss. The engine handles everything else: data streams, optimiser, schedule, AMP, distributed
gradient averaging, validation, checkpoints. Adding a method is one small module.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.config import Config, ConfigError, MethodConfig
from vqseg.data.augment import Augmenter, mix
from vqseg.data.provenance import add_provenance, shift_rows
from vqseg.data.volumes import SegmentationData
from vqseg.models import SegmentationModel, pretrained
from vqseg.models.pretrained import prepare_frozen_encoders
from vqseg.modules.attach import FeatureTap, PDCRConfig, PDCRLayer, infer_channels, pdcr_total_loss
from vqseg.registry import METHODS

PDCR_IGNORE = 255


@dataclass
class Batch:
    """Images at training size on the device; ``unlabeled`` is None for labelled-only methods."""

    labeled: Tensor
    labels: Tensor
    unlabeled: Tensor | None = None
    labeled_index: Tensor | None = None
    unlabeled_index: Tensor | None = None


@dataclass
class StepOutput:
    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Subclasses set ``uses_unlabeled`` and implement :meth:`training_step`."""

    uses_unlabeled: bool = True
    always_eval: tuple[str, ...] = ("teacher",)  # submodules that predict in eval mode (EMA teachers)
    strong_views: bool = False  # draws intensity-augmented strong views (make_unlabeled_views)

    def __init__(self, cfg: Config, model_factory: Callable[[], SegmentationModel], num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.augment = Augmenter(cfg.aug, cfg.data.in_channels, anisotropic=cfg.aug.anisotropic)
        self.student = model_factory()
        self.pdcr = _pdcr_config(cfg)
        self.pdcr_proj: nn.Module | None = None
        if self.pdcr is not None and self.pdcr.cross_layer is not None:
            self.pdcr_proj = _cross_projection(self.student, self.pdcr, cfg)
        # The hooks record only inside pdcr_capture(), so a teacher deep-copied from the student
        # (hooks included) or a later pass over another view never replaces the features PDCR uses.
        self._tap = FeatureTap(self.student, self.pdcr.tapped_names(), on_demand=True) if self.pdcr else None
        self.photometric = cfg.model.photometric_encodings
        if self.photometric and not self.strong_views:
            raise ConfigError(
                f"model.photometric_encodings={self.photometric}: method.name={cfg.method.name} draws no "
                "intensity-augmented strong view to give them to (vqseg and unimatch do)"
            )

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for name in self.always_eval:
            if isinstance(getattr(self, name, None), nn.Module):
                getattr(self, name).train(False)
        return self

    def after_step(self, step: int) -> None:
        """Hook run after each optimiser step (EMA teachers update here)."""

    def after_validation(self, step: int, score: float) -> None:
        """Hook run on the validating process after each validation of :meth:`predictor` at ``step``
        steps done (BCP keeps its best pre-trained student here); state it keeps must be in
        ``state_dict`` so that a resumed run continues identically."""

    def parameter_groups(self) -> list[dict]:
        """Optimiser groups: trainable pretrained weights (a fine-tuned backbone, a frozen LiteMedSAM's
        trained neck) at ``train.encoder_lr``, everything else at ``train.lr``; a group left empty is
        dropped."""
        backbone = {id(p) for m in pretrained.pretrained_backbones(self) for p in m.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in backbone], "lr": self.cfg.train.lr},
            {"params": [p for p in trainable if id(p) in backbone], "lr": self.cfg.train.encoder_lr},
        ]
        return [g for g in groups if g["params"]]

    def predictor(self) -> nn.Module:
        """The network that validation and test use (the student unless a method says otherwise)."""
        return self.student

    def prepare(self, data: SegmentationData) -> None:
        """Hook run once before training with the in-memory data: frozen pretrained encoders get
        their feature bank (labelled rows, then unlabelled ones when the method uses them) and the
        validation slices' features, all through the on-disk cache. Overrides call it first."""
        cfg = self.cfg
        device = next(self.parameters()).device
        self._bank_rows = {"labeled": 0, "unlabeled": len(data.labeled)}
        self._unlabeled_count = len(data.unlabeled)
        copies = [self.augment.photometric_copy(data.unlabeled.images, k) for k in range(1, self.photometric + 1)]
        self._uses_bank = prepare_frozen_encoders(
            self, data, self.uses_unlabeled, cfg.train.image_size, cfg.eval.batch_size, device, copies
        )

    def training_inputs(self, images: Tensor, index: Tensor, split: str) -> Tensor:
        """Training slices ``index`` of ``split`` as the networks take them: with a frozen encoder,
        followed by provenance channels that point at their rows of the feature bank
        (``data/provenance.py``); otherwise as they are."""
        if not getattr(self, "_uses_bank", False):
            return images
        return add_provenance(images, index + self._bank_rows[split])

    def strong_features(self, strong: Tensor) -> Tensor:
        """A strong view whose unlabelled pixels read the features of one of their slice's
        ``model.photometric_encodings`` photometric copies (drawn per sample; bank rows after the
        unlabelled ones, see :meth:`prepare`) instead of the unaugmented slice's; as it is otherwise."""
        if not self.photometric or not getattr(self, "_uses_bank", False):
            return strong
        start, count = self._bank_rows["unlabeled"], self._unlabeled_count
        copy = torch.randint(1, self.photometric + 1, (strong.shape[0],), device=strong.device)
        return shift_rows(strong, self.cfg.data.in_channels, start, count, copy * count)

    def progress(self, step: int) -> float:
        return step / max(self.cfg.train.iterations, 1)

    def pdcr_capture(self, enabled: bool = True) -> ContextManager[object]:
        """Wrap exactly the student pass whose hidden features the next :meth:`pdcr_term` uses.

        Making the choice explicit keeps PDCR on the intended view whatever order a
        ``training_step`` runs its passes in. A no-op when PDCR is off or ``enabled`` is false.
        """
        return self._tap.capture() if self._tap is not None and enabled else nullcontext()

    def pdcr_term(self, labels: Tensor, ignore: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """PDCR on the hidden features captured by :meth:`pdcr_capture` (zero when PDCR is off).

        Layer names refer to the backbone built by the model factory (e.g. ``encoder.downs.3``),
        also when a method wraps it (VQ-Seg's quantized network).

        ``labels`` cover every row of the captured pass; rows or pixels without a trustworthy label
        are marked by ``ignore`` (unlabelled rows, low-confidence pseudo-labels). The captured
        features are consumed: a second call needs a new capture.
        """
        if self.pdcr is None:
            return labels.new_zeros((), dtype=torch.float32), {}
        target = labels if ignore is None else labels.masked_fill(ignore, PDCR_IGNORE)
        loss, parts = pdcr_total_loss(self._tap, target, self.num_classes, self.pdcr, PDCR_IGNORE, cross_proj=self.pdcr_proj)
        self._tap.clear()
        return loss, parts

    def pseudo_label_pdcr(self, labels: Tensor, ignore: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """PDCR on an unlabelled pass driven by pseudo-labels, when ``pdcr.unlabeled`` asks for it."""
        if self.pdcr is None or not self.cfg.pdcr.unlabeled:
            return labels.new_zeros((), dtype=torch.float32), {}
        loss, parts = self.pdcr_term(labels, ignore)
        return loss, {f"unlabeled_{k}": v for k, v in parts.items()}


def dice_loss(logits: Tensor, target: Tensor, num_classes: int, ignore: Tensor | None = None) -> Tensor:
    """Soft Dice over classes (SSL4MIS's DiceLoss), optionally masking ignored pixels."""
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).movedim(-1, 1).float()
    if ignore is not None:
        keep = (~ignore).float()[:, None]
        probs, onehot = probs * keep, onehot * keep
    dims = (0, *range(2, probs.ndim))  # batch and every spatial axis: 2D images or 3D volumes
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    return 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


def class_balance_weights(target: Tensor, kept: Tensor, num_classes: int) -> Tensor:
    """Per-pixel weights 1 / (share of the kept pixels of the pixel's class), scaled to a mean of
    one over the kept pixels: every class present weighs as much as every other in the loss."""
    counts = torch.bincount(target[kept], minlength=num_classes).float()
    present = counts > 0
    inverse = torch.where(present, counts.sum() / (present.sum() * counts.clamp_min(1)), torch.zeros_like(counts))
    return inverse[target] * kept


def masked_ce(
    logits: Tensor, target: Tensor, ignore: Tensor | None = None, normalise: str = "confident",
    weights: Tensor | None = None,
) -> Tensor:
    """Pixel CE summed over the kept pixels (``ignore`` false), divided by the kept count
    (``confident``) or by every pixel (``valid``, UniMatch V2 / VQ-Seg code: while few pixels pass
    the threshold the loss stays small, a built-in ramp-up); ``weights`` (per pixel, zero where
    ignored) replace the kept mask, e.g. :func:`class_balance_weights`."""
    if ignore is None:
        return F.cross_entropy(logits.float(), target)
    ce_map = F.cross_entropy(logits.float(), target, reduction="none")
    kept = (~ignore).float() if weights is None else weights
    if normalise == "confident":
        return (ce_map * kept).sum() / (~ignore).float().sum().clamp(min=1)
    if normalise == "valid":
        return (ce_map * kept).sum() / kept.numel()
    raise ValueError(f"unknown CE normalisation {normalise!r}; choose confident or valid")


def seg_loss(logits: Tensor, target: Tensor, num_classes: int, ignore: Tensor | None = None) -> Tensor:
    """(CE + Dice) / 2, the supervised loss of SSL4MIS, UniMatch and BCP on ACDC."""
    return 0.5 * (masked_ce(logits, target, ignore) + dice_loss(logits, target, num_classes, ignore))


U_LOSSES = ("ce", "ce_dice")
U_NORMALISATIONS = ("valid", "confident")


def unlabeled_loss(
    logits: Tensor, pseudo: Tensor, num_classes: int, ignore: Tensor, loss: str = "ce", normalise: str = "valid",
    class_balance: bool = False,
) -> Tensor:
    """Loss against pseudo-labels with unconfident pixels (``ignore``) masked out.

    ``ce``: the masked CE alone (the VQ-Seg paper and its released code); ``ce_dice``: (CE +
    masked Dice) / 2, the labelled loss of the ACDC protocol. ``normalise``: see `masked_ce`.
    ``class_balance``: each kept pixel's CE weighted by :func:`class_balance_weights`.
    """
    weights = class_balance_weights(pseudo, ~ignore, num_classes) if class_balance else None
    ce = masked_ce(logits, pseudo, ignore, normalise, weights)
    if loss == "ce":
        return ce
    if loss == "ce_dice":
        return 0.5 * (ce + dice_loss(logits, pseudo, num_classes, ignore))
    raise ValueError(f"unknown unlabelled loss {loss!r}; choose from {U_LOSSES}")


@METHODS.register("supervised", config=MethodConfig)
class Supervised(Method):
    """Labelled slices only; with every training patient labelled it is the fully supervised bound."""

    uses_unlabeled = False

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        images, labels, _ = self.augment.geometric(batch.labeled, batch.labels)
        with self.pdcr_capture():
            logits = self.student(images)
        loss_sup = seg_loss(logits, labels, self.num_classes)
        loss_pdcr, logs = self.pdcr_term(labels)
        return StepOutput(loss_sup + loss_pdcr, {"loss_sup": loss_sup.detach(), **logs})


@dataclass
class UnlabeledViews:
    """A weak (geometric) view, a strong view of it (intensity + CutMix), and how they were made."""

    weak: Tensor
    strong: Tensor
    theta: Tensor  # the weak view's affine, to warp anything aligned with the raw image
    box: Tensor  # N x H x W CutMix region, taken from sample ``perm[i]``
    perm: Tensor

    def mix(self, target: Tensor) -> Tensor:
        """Apply the strong view's CutMix to per-pixel targets computed on the weak view."""
        return mix(self.box, target[self.perm], target)


def strong_view(
    augment: Augmenter, weak: Tensor, theta: Tensor, cutmix: bool = True,
    features: Callable[[Tensor], Tensor] | None = None,
) -> UnlabeledViews:
    """A strong view of ``weak``: its own intensity draw, CutMix box and CutMix partner;
    ``features`` re-points a frozen encoder's lookups (``Method.strong_features``)."""
    n, device = weak.shape[0], weak.device
    strong = augment.intensity(weak)
    if features is not None:
        strong = features(strong)
    box = augment.cutmix_mask(n, tuple(weak.shape[2:]), device)
    if not cutmix:
        box = torch.zeros_like(box)
    perm = torch.randperm(n, device=device)
    return UnlabeledViews(weak, mix(box, strong[perm], strong), theta, box, perm)


def make_unlabeled_views(
    augment: Augmenter, images: Tensor, cutmix: bool = True, features: Callable[[Tensor], Tensor] | None = None,
) -> UnlabeledViews:
    weak, _, theta = augment.geometric(images)
    return strong_view(augment, weak, theta, cutmix, features)


def channel_dropout(features: Tensor, rate: float) -> Tensor:
    """Whole feature channels dropped (Dropout2d on images, Dropout3d on volumes), always on."""
    dropout = F.dropout3d if features.ndim == 5 else F.dropout2d
    return dropout(features, rate, training=True)


def sigmoid_rampup(progress: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = progress / length clipped to [0, 1] (Laine & Aila 2017)."""
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def labeled_pdcr(
    method: Method, labels: Tensor, unlabeled_rows: int, unlabeled_logits: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PDCR on the captured student pass over the labelled rows then ``unlabeled_rows`` unlabelled rows.

    The unlabelled rows are ignored unless ``pdcr.unlabeled`` is set and predictions for them are
    given (a teacher's, a peer's or the weak view's): then their confident pseudo-labels
    (``pdcr.unlabeled_threshold``) drive PDCR there too.
    """
    settings = method.cfg.pdcr
    if unlabeled_logits is not None and settings.unlabeled:
        pseudo, ignore_u = confident_labels(unlabeled_logits, settings.unlabeled_threshold)
    else:
        pseudo = labels.new_zeros((unlabeled_rows, *labels.shape[1:]))
        ignore_u = torch.ones_like(pseudo, dtype=torch.bool)
    ignore = torch.cat([torch.zeros_like(labels, dtype=torch.bool), ignore_u])
    return method.pdcr_term(torch.cat([labels, pseudo]), ignore)


def confident_labels(
    logits: Tensor,
    threshold: float,
    align: "DistributionAlignment | None" = None,
    class_thresholds: "ClassThresholds | None" = None,
) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels and the mask of pixels to ignore (confidence below ``threshold``, or
    below their class's threshold when ``class_thresholds`` is given), from the probabilities after
    distribution alignment when ``align`` is given."""
    probs = logits.detach().float().softmax(dim=1)
    if align is not None:
        probs = align(probs)
    confidence, labels = probs.max(dim=1)
    if class_thresholds is not None:
        return labels, confidence < class_thresholds(confidence, labels)
    return labels, confidence < threshold


class ClassThresholds(nn.Module):
    """Class-wise self-adaptive confidence thresholds (FlexMatch / FreeMatch style; not in VQ-Seg).

    With one threshold, the pixels that pass it are overwhelmingly background: a teacher is more
    confident there than on a thin structure it is still learning, so the student is taught mostly
    background and shrinks the structures. Here class c's threshold is
    ``threshold * conf_c / max_k conf_k``, with conf_c a running mean (momentum ``momentum`` per
    step) of the teacher's confidence on the pixels it assigns to c: while every class is
    unconfident the ratios are near one and nothing passes early; once background is learned, a
    class the teacher is less sure of is kept at a proportionally lower threshold. Buffers, so a
    resumed run continues with them.
    """

    def __init__(self, num_classes: int, threshold: float, momentum: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.momentum = momentum
        self.register_buffer("confidence", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, confidence: Tensor, labels: Tensor) -> Tensor:
        """Per-pixel thresholds for pixels of confidence ``confidence`` and argmax ``labels``;
        folds this batch's class means into the running ones first."""
        k = self.confidence.numel()
        sums = torch.zeros(k, device=confidence.device).index_add_(0, labels.flatten(), confidence.flatten())
        counts = torch.bincount(labels.flatten(), minlength=k).to(sums)
        seen = counts > 0
        batch = torch.where(seen, sums / counts.clamp_min(1), self.confidence)
        self.confidence.mul_(self.momentum).add_(batch, alpha=1 - self.momentum)
        per_class = self.threshold * self.confidence / self.confidence.max()
        return per_class[labels]


class DistributionAlignment(nn.Module):
    """p <- normalise(p * prior_labelled / mean_unlabelled) per pixel (ReMixMatch, Berthelot et al. 2020).

    Self-training with a confidence threshold can feed on its own class bias: a teacher that
    under-segments a structure labels its border background, the student learns that, and the
    structure shrinks further. Alignment rescales the pseudo-labeller's class probabilities so
    that their mean over unlabelled pixels follows the class frequencies of the labelled masks.
    Both are running means over steps, bias-corrected as in Adam; the corrections cancel in the
    ratio while both have seen the same number of steps (one labelled and one unlabelled batch a
    step, as in VQ-Seg), so they matter only when the counts differ. They are buffers, so a resumed
    run continues with them. Caveat, measured on the frozen LiteMedSAM suite (README): with a prior
    that is mostly background, it turns an early, unconfident teacher confidently background almost
    everywhere, and did worse than no alignment.
    """

    def __init__(self, num_classes: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("labeled_sum", torch.zeros(num_classes))
        self.register_buffer("unlabeled_sum", torch.zeros(num_classes))
        self.register_buffer("labeled_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("unlabeled_steps", torch.zeros((), dtype=torch.long))

    def _mean(self, which: str) -> Tensor:
        """The bias-corrected running mean of ``which`` (labeled or unlabeled)."""
        return getattr(self, f"{which}_sum") / (1 - self.momentum ** getattr(self, f"{which}_steps"))

    def _update(self, which: str, frequencies: Tensor) -> Tensor:
        total = getattr(self, f"{which}_sum")
        total.mul_(self.momentum).add_(frequencies.to(total), alpha=1 - self.momentum)
        getattr(self, f"{which}_steps").add_(1)
        return self._mean(which)

    @torch.no_grad()
    def observe_labels(self, labels: Tensor) -> None:
        """Fold one labelled batch's class frequencies into the prior."""
        counts = torch.bincount(labels.flatten(), minlength=self.labeled_sum.numel())
        self._update("labeled", counts.float() / labels.numel())

    @torch.no_grad()
    def forward(self, probs: Tensor) -> Tensor:
        """Aligned N x C x H x W probabilities; folds this batch's mean into the unlabelled estimate."""
        if self.labeled_steps.item() == 0:
            raise RuntimeError("distribution alignment needs a labelled batch first (observe_labels)")
        unlabeled = self._update("unlabeled", probs.mean(dim=(0, *range(2, probs.ndim))))
        ratio = self._mean("labeled") / unlabeled.clamp_min(1e-6)
        aligned = probs * ratio.view(1, -1, *[1] * (probs.ndim - 2))
        return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)


def example_input(cfg: Config, channels: int) -> Tensor:
    """Zeros shaped like a training batch of two (patches, or resized slices), for dry runs."""
    spatial = cfg.train.patch_size or [cfg.train.image_size] * 2
    return torch.zeros(2, channels, *spatial)


def _pdcr_config(cfg: Config) -> PDCRConfig | None:
    p = cfg.pdcr
    if not p.layers and not p.cross_layer:
        return None
    if p.cross_layer and len(p.cross_layer) != 2:
        raise ValueError(f"pdcr.cross_layer must name two layers, got {p.cross_layer}")
    return PDCRConfig(
        layers=[PDCRLayer(layer.name, layer.num_samples, layer.weight) for layer in p.layers],
        patch_sizes=tuple(p.patch_sizes) if p.patch_sizes else "receptive",
        tau=p.tau,
        sampling=p.sampling,
        cross_layer=tuple(p.cross_layer) if p.cross_layer else None,
        cross_weight=p.cross_weight,
    )


def _cross_projection(model: nn.Module, pdcr: PDCRConfig, cfg: Config) -> nn.Module | None:
    """A linear map between the two cross-layer feature spaces when their widths differ."""
    channels = infer_channels(model, list(pdcr.cross_layer), example_input(cfg, cfg.data.in_channels))
    c_a, c_b = (channels[name] for name in pdcr.cross_layer)
    return None if c_a == c_b else nn.Linear(c_b, c_a)
