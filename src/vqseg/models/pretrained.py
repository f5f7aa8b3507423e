"""Pretrained encoders (LiteMedSAM's TinyViT, DINOv2 ViT-S/14) with a DPT head, in two modes.

``model.encoder_mode=finetune``: the encoder trains, with its own learning rate
(``train.encoder_lr``, see :func:`pretrained_backbones`). ``frozen`` (the CPU mode): the encoder
never trains and stays in eval mode; its pyramid is computed once per slice and cached on disk
(``vqseg.modules.foundation.cached_slice_features``). Training views then carry provenance
channels (``vqseg.data.provenance``) and the encoder looks their features up in a bank of the
training slices' cached pyramids, so every spatial augmentation a method applies to the image
(the geometric warp, CutMix, BCP's copy-paste) moves the features with it; intensity
augmentation and input noise change the image channels only, so they reach the image stem and
not the frozen features. Plain images (validation, test, predict) are encoded through the same
cache and kept in a bounded in-RAM memo; :func:`set_cache_writes` keeps ``predict`` on new images
from adding them to the cache.

Pyramids (``timm`` ``features_only`` style, shallowest first):

- ``litemedsam``: TinyViT's stage maps 1-3 (64, 128, 160 channels; native strides 1, 2 and 4)
  and the neck's 256-channel embedding that SAM's decoder reads (in place of the last stage's raw
  320 channels). The cache keeps them at strides 4, 8, 4 and 4 of the encoder input (stages 1-2
  average-pooled, stage 3 and the neck native: about 4 MB per 256 px slice in float16 instead of
  16 MB fully native), and the model average-pools them further to ``model.level_strides``
  (default 4, 8, 16, 16: the DPT head reads them at strides 4-32, and VQ-Seg's codebook sits on a
  16 x 16 map like the paper's DINOv2 patch grid); one cache serves every choice of strides.
  ``model.train_neck``: the cache keeps what enters the neck (the last stage's 320 channels at
  stride 4) instead, and the encoder runs a trainable copy of the neck on it (``PretrainedEncoder.neck``).
- ``dinov2``: blocks 2, 5, 8 and 11 (384 channels each, final norm) on the 14-pixel patch grid,
  as UniMatch V2's DPT takes them.

The model's encoder returns levels 1-4 and, beside them, the image stem's full-resolution map
(``Features``; see ``dpt``): the stem is not a level.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqseg.config import Config, ConfigError, ModelConfig
from vqseg.data.provenance import provenance_at, sample_bank, split_channels
from vqseg.inference import model_inputs
from vqseg.models.base import Features, SegmentationHead, SegmentationModel
from vqseg.models.dpt import DPTDecoder, ImageStem
from vqseg.modules import foundation
from vqseg.registry import MODELS

if TYPE_CHECKING:
    from vqseg.data.volumes import SegmentationData

PRETRAINED_MODELS = ("litemedsam", "dinov2")
DINOV2_BLOCKS = (2, 5, 8, 11)  # UniMatch V2's intermediate_layer_idx for ViT-S
BACKBONE_IDENTITY = "backbone_identity"  # a frozen backbone's checkpoint entry (see _drop_frozen_backbone)
LEGACY_PYRAMID = "pyramid-v1"  # identities written before content hashing: weights file name and size only


def default_encoder_input(name: str, image_size: int) -> int:
    """The encoder's input side when ``model.encoder_input`` is 0: the training size (DINOv2: its
    largest multiple of the 14-pixel patch)."""
    return image_size // 14 * 14 if name == "dinov2" else image_size


def resolve_encoder_input(cfg: Config) -> None:
    """``model.encoder_input`` 0 becomes the size it stands for, so config.yaml records the size used.
    Patch mode is for the U-Nets: a frozen encoder's features are cached per resized slice."""
    if cfg.train.patch_size:
        raise ConfigError(
            f"train.patch_size={cfg.train.patch_size}: model.name={cfg.model.name} trains on resized slices "
            "(its frozen features are cached per slice); use resize mode (no patch_size) or model.name=unet/unet3d"
        )
    if cfg.model.encoder_input == 0:
        cfg.model.encoder_input = default_encoder_input(cfg.model.name, cfg.train.image_size)
    check_encoder_input(cfg.model.name, cfg.model.encoder_input)


def check_encoder_input(name: str, size: int) -> None:
    if name == "litemedsam" and (size % 4 or size < 16):
        raise ConfigError(f"model.encoder_input={size}: LiteMedSAM needs a multiple of 4, at least 16")
    if name == "dinov2" and (size % 14 or size < 14):
        raise ConfigError(f"model.encoder_input={size}: DINOv2 needs a multiple of its 14-pixel patch")


def is_frozen(cfg: ModelConfig) -> bool:
    """Whether training batches of this model carry provenance (a frozen pretrained encoder)."""
    return cfg.name in PRETRAINED_MODELS and cfg.encoder_mode == "frozen"


class PyramidBackbone(nn.Module):
    """Images (B x 1|3 x H x W, any size) -> maps on the encoder's grid, shallowest first.

    ``sides``: each map's side; ``recipe``: how the maps are taken from the network (stages or
    blocks, normalisation, pooling), part of the identity with everything else they depend on.
    """

    name = "pyramid"

    def __init__(self, input_size: int, out_channels: list[int], sides: list[int], weights: Path | None,
                 recipe: str, precision: str = "fp32", cache_sides: list[int] | None = None,
                 cache_channels: list[int] | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.out_channels = out_channels
        self.sides = sides  # what the model reads
        self.cache_sides = cache_sides or sides  # what forward returns and the cache keeps
        self.cache_channels = cache_channels or out_channels
        self.weights = weights
        self.recipe = recipe
        self.precision = precision

    def identity(self) -> str:
        """What the cached features depend on (cache key and checkpoint guard): model, recipe,
        input size, widths, precision and the weights file's content."""
        return (f"{self.name}|{self.recipe}|input={self.input_size}|channels={self.out_channels}|"
                f"{self.precision}|{foundation.weights_fingerprint(self.weights)}")

    def autocast(self, device: torch.device) -> torch.autocast:
        """The encoder's compute precision (``model.encoder_precision``): bfloat16 runs LiteMedSAM
        about twice as fast on a CPU (benchmarks/logs/encoder_precision_cpu.log)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def select(self, levels: list[Tensor]) -> list[Tensor]:
        """The maps the model reads from the maps the cache keeps (average-pooled to ``sides``)."""
        return [level if level.shape[-1] == side else F.adaptive_avg_pool2d(level.float(), side)
                for level, side in zip(levels, self.sides)]

    def levels(self, images: Tensor) -> list[Tensor]:
        """The model's pyramid of ``images``, computed (fine-tuning, or no cache wanted)."""
        return self.select(self(images))

    def legacy_identity(self) -> str:
        """The identity checkpoints recorded before content hashing: the weights file's name and size
        (they were all trained on float32 features pooled to strides 4, 8, 16, 16 for LiteMedSAM)."""
        source = "random-tiny" if self.weights is None else f"{self.weights.name}|{self.weights.stat().st_size}"
        settings = "" if self.precision == "fp32" and self.legacy_layout() else f"|{self.recipe}|{self.precision}"
        return f"{self.name}|{LEGACY_PYRAMID}|{self.input_size}|{self.out_channels}|{source}{settings}"

    def legacy_layout(self) -> bool:
        return True

    def level_shapes(self) -> list[tuple[int, int, int]]:
        return [(c, side, side) for c, side in zip(self.cache_channels, self.cache_sides)]

    def cached(self, images: Tensor, memo: foundation.FeatureMemo | None = None, write: bool = True,
               progress: bool = False) -> list[Tensor]:
        """The model's pyramid of plain images through the on-disk cache (float16, CPU); see
        ``foundation.cached_slice_features`` for ``memo`` and ``write``."""
        levels = foundation.cached_slice_features(self, self.identity(), self.name, images,
                                                  shapes=self.level_shapes(), memo=memo, write=write, progress=progress)
        return [level.to(torch.float16) for level in self.select(levels)]


# Strides (of the encoder input) at which the cache keeps LiteMedSAM's stages 1-3 and neck (native:
# 1, 2, 4, 4); ``model.level_strides`` must be multiples of them.
TINYVIT_CACHE_STRIDES = (4, 8, 4, 4)
DEFAULT_LEVEL_STRIDES = [4, 8, 16, 16]


def _sides(input_size: int, strides: list[int] | tuple[int, ...]) -> list[int]:
    return [max(input_size // s, 1) for s in strides]


class TinyViTPyramid(PyramidBackbone):
    name = "litemedsam"

    def __init__(self, input_size: int, weights: Path | None, strides: list[int] | None = None,
                 precision: str = "fp32", train_neck: bool = False) -> None:
        self.strides = list(strides or DEFAULT_LEVEL_STRIDES)
        self.train_neck = train_neck
        widths = [16, 32, 40, 256] if weights is None else [64, 128, 160, 256]
        last = "neck-input" if train_neck else "neck"
        super().__init__(input_size, widths, _sides(input_size, self.strides), weights,
                         recipe=f"stages=1,2,3,{last}|minmax|avgpool-strides={list(TINYVIT_CACHE_STRIDES)}",
                         precision=precision, cache_sides=_sides(input_size, TINYVIT_CACHE_STRIDES),
                         cache_channels=widths[:3] + [320] if train_neck else None)
        self.net = foundation.build_tinyvit(input_size, tiny=weights is None)
        if weights is not None:
            foundation.load_litemedsam(self.net, weights)

    def legacy_layout(self) -> bool:
        return self.strides == DEFAULT_LEVEL_STRIDES and not self.train_neck

    def forward(self, images: Tensor) -> list[Tensor]:
        """The maps the cache keeps (strides ``TINYVIT_CACHE_STRIDES``), float32: the last is the
        neck's output, or with ``train_neck`` its input."""
        x = foundation.minmax_normalise(foundation.encoder_input(images, self.input_size))
        with self.autocast(x.device):
            first, second, third, neck_input, neck = foundation.tinyvit_stages(self.net, x)
        last = neck_input if self.train_neck else neck
        return [F.adaptive_avg_pool2d(m.float(), side)
                for m, side in zip((first, second, third, last), self.cache_sides)]

    def select(self, levels: list[Tensor]) -> list[Tensor]:
        """With ``train_neck`` the last map stays on the neck's grid: it is pooled after the neck."""
        if not self.train_neck:
            return super().select(levels)
        return super().select(levels[:-1]) + [levels[-1]]


class DINOv2Pyramid(PyramidBackbone):
    name = "dinov2"

    def __init__(self, input_size: int, weights: Path | None, precision: str = "fp32") -> None:
        tiny = {"embed_dim": 32, "depth": 4, "num_heads": 2} if weights is None else {}
        self.blocks = [0, 1, 2, 3] if weights is None else list(DINOV2_BLOCKS)
        width = tiny.get("embed_dim", 384)
        super().__init__(input_size, [width] * 4, [input_size // foundation.DINOv2Encoder.patch_size] * 4, weights,
                         recipe=f"blocks={self.blocks}|final-norm|imagenet-mean-std", precision=precision)
        self.net = foundation.load_dinov2(weights, **tiny)
        self.register_buffer("mean", torch.tensor(foundation._IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(foundation._IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = (foundation.encoder_input(images, self.input_size) - self.mean) / self.std
        with self.autocast(x.device):
            levels = self.net.get_intermediate_layers(x, n=self.blocks, reshape=True, norm=True)
        return [level.float() for level in levels]


class FrozenFeatures:
    """What frozen encoders share: the training slices' feature bank, an in-RAM memo of plain
    images' features (least recently used dropped beyond ``foundation.DEFAULT_MEMO_BYTES``, 2 GiB;
    set ``memo.max_bytes`` to change it) and whether those are added to the on-disk cache.

    Not copied by ``deepcopy``, so an EMA teacher (``make_teacher``) looks up the same bank; not
    part of any state dict (it is rebuilt from the cache on start and on resume).
    """

    def __init__(self) -> None:
        self.bank: list[Tensor] | None = None  # per level: N x h x w x C float16
        self.memo = foundation.FeatureMemo()
        self.write_cache = True  # False: read the cache, add nothing (see set_cache_writes)

    def __deepcopy__(self, memo: dict) -> FrozenFeatures:
        return self


class PretrainedEncoder(nn.Module):
    """Image stem + pretrained backbone; ``frozen``: the backbone never trains (see module docstring)."""

    def __init__(self, backbone: PyramidBackbone, in_channels: int, stem_channels: int, frozen: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.stem = ImageStem(in_channels, stem_channels)
        self.image_channels = in_channels
        self.frozen = frozen
        self.store = FrozenFeatures()
        self.stem_channels = stem_channels
        self.out_channels = list(backbone.out_channels)
        # VQ-Seg's reconstruction: two x2 stages from the deepest map (about 1/4 of the input for
        # LiteMedSAM), then upsampled; further stages at 1/2 and 1 would cost more than the head.
        self.reconstruction_channels = backbone.out_channels[-3:]
        # LiteMedSAM's neck, trained from its pretrained weights on the cached neck input
        self.neck = copy.deepcopy(backbone.net.neck).requires_grad_(True) if getattr(backbone, "train_neck", False) else None
        if frozen:
            backbone.requires_grad_(False)
            backbone.eval()
            self.register_state_dict_post_hook(_drop_frozen_backbone)
            self.register_load_state_dict_pre_hook(_restore_frozen_backbone)

    def train(self, mode: bool = True) -> PretrainedEncoder:
        """A frozen backbone stays in eval mode whatever a parent module asks."""
        super().train(mode)
        if self.frozen:
            self.backbone.train(False)
        return self

    def cached(self, images: Tensor, progress: bool = False) -> list[Tensor]:
        """The frozen backbone's pyramid of plain images, through the memo and the on-disk cache (float16, CPU)."""
        return self.backbone.cached(images, memo=self.store.memo, write=self.store.write_cache, progress=progress)

    def forward(self, x: Tensor) -> Features:
        image, provenance = split_channels(x, self.image_channels)
        stem = self.stem(image.contiguous(memory_format=torch.channels_last))  # see `channels_last`
        if provenance is not None:
            levels = self._look_up(provenance)
        elif self.frozen:
            levels = [level.to(image.device, torch.float32) for level in self.cached(image)]
        else:
            levels = self.backbone.levels(image)
        if self.neck is not None:
            levels = levels[:-1] + [self._neck(levels[-1])]
        return Features([level.contiguous(memory_format=torch.channels_last) for level in levels], stem)

    def _neck(self, neck_input: Tensor) -> Tensor:
        """The trainable neck on the cached neck input, in the encoder's precision, pooled to the
        model's last level."""
        with self.backbone.autocast(neck_input.device):
            out = self.neck(neck_input.float()).float()
        side = self.backbone.sides[-1]
        return out if out.shape[-1] == side else F.adaptive_avg_pool2d(out, side)

    def _look_up(self, provenance: Tensor) -> list[Tensor]:
        if not self.frozen or self.store.bank is None:
            raise RuntimeError(
                "input carries provenance channels but this encoder has no feature bank "
                "(frozen mode, after vqseg.models.pretrained.prepare_frozen_encoders)"
            )
        levels = []
        for bank in self.store.bank:
            index, coords, valid = provenance_at(provenance, tuple(bank.shape[1:3]))
            levels.append(sample_bank(bank, index.to(bank.device), coords.to(bank.device), valid.to(bank.device)))
        return [level.to(provenance.device) for level in levels]


def _drop_frozen_backbone(module: PretrainedEncoder, state: dict, prefix: str, metadata: dict) -> None:
    """Checkpoints leave out a frozen backbone (23 MB for LiteMedSAM): it never changes and is
    rebuilt from its weights file. They record which one, so that another file is refused."""
    for key in [k for k in state if k.startswith(prefix + "backbone.")]:
        del state[key]
    state[prefix + BACKBONE_IDENTITY] = module.backbone.identity()


def _restore_frozen_backbone(module: PretrainedEncoder, state: dict, prefix: str, *_: object) -> None:
    stored = state.pop(prefix + BACKBONE_IDENTITY, None)
    if stored is not None:
        check_backbone_identity(module.backbone, stored)
    for key, value in module.backbone.state_dict(prefix=prefix + "backbone.").items():
        state.setdefault(key, value)


def check_backbone_identity(backbone: PyramidBackbone, stored: str) -> None:
    """Refuse a checkpoint trained on another frozen encoder than ``backbone`` (ConfigError).

    An identity recorded before content hashing (``pyramid-v1``: model, input size, widths,
    weights file name and size) is accepted when those match, with a note that the weights'
    content could not be verified.
    """
    legacy = stored.split("|")[1:2] == [LEGACY_PYRAMID]
    current = backbone.legacy_identity() if legacy else backbone.identity()
    if stored != current:
        raise ConfigError(f"these weights were trained on the frozen encoder {stored!r}; "
                          f"model.encoder_weights now gives {current!r}")
    if legacy and backbone.weights is not None:
        foundation.note_once(
            f"vqseg: this older checkpoint names its frozen encoder's weights by file name and size only "
            f"({backbone.weights.name}, {backbone.weights.stat().st_size} bytes, as {backbone.weights}): "
            "their content could not be verified"
        )


def _build(name: str, cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    weights: Path | None = None
    if not cfg.tiny:
        if name == "litemedsam":
            try:
                weights = foundation.litemedsam_weights(cfg.encoder_weights or None)
            except (FileNotFoundError, ImportError) as err:
                raise ConfigError(f"model.encoder_weights: {err}") from None
        else:
            if not cfg.encoder_weights or not Path(cfg.encoder_weights).expanduser().is_file():
                raise ConfigError(
                    f"model.encoder_weights={cfg.encoder_weights!r}: DINOv2 needs a local vit_small_patch14_dinov2 "
                    "(timm) or dinov2_vits14 (facebookresearch) weights file; nothing is downloaded"
                )
            weights = Path(cfg.encoder_weights).expanduser()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # tiny random stand-ins: every copy (CPS's two networks) is the same encoder
        if name == "litemedsam":
            backbone = TinyViTPyramid(cfg.encoder_input, weights, cfg.level_strides, cfg.encoder_precision,
                                      cfg.train_neck)
        else:
            backbone = DINOv2Pyramid(cfg.encoder_input, weights, cfg.encoder_precision)
    encoder = PretrainedEncoder(backbone, in_channels, cfg.stem_channels, cfg.encoder_mode == "frozen")
    decoder = DPTDecoder(encoder.out_channels, cfg.stem_channels, cfg.decoder_features, cfg.dpt_strides)
    return SegmentationModel(encoder, decoder, SegmentationHead(decoder.out_channels, num_classes))


@MODELS.register("litemedsam", resolve=resolve_encoder_input)
def _litemedsam(cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    return _build("litemedsam", cfg, in_channels, num_classes)


@MODELS.register("dinov2", resolve=resolve_encoder_input)
def _dinov2(cfg: ModelConfig, in_channels: int, num_classes: int) -> SegmentationModel:
    return _build("dinov2", cfg, in_channels, num_classes)


def channels_last(module: nn.Module, cfg: ModelConfig) -> nn.Module:
    """A pretrained model's method in the channels-last layout (its features are handed over in it).

    oneDNN's CPU convolutions at these widths run faster in it (a one-off profile, not a
    committed benchmark; benchmarks/pretrained_speed.py times the result); the U-Net keeps the default layout its
    recorded benchmarks were measured in."""
    return module.to(memory_format=torch.channels_last) if cfg.name in PRETRAINED_MODELS else module


def pretrained_backbones(module: nn.Module) -> list[nn.Module]:
    """The pretrained backbones inside ``module``, and their trainable necks (their weights must not
    be re-initialised, and they train at ``train.encoder_lr`` when fine-tuned)."""
    encoders = [m for m in module.modules() if isinstance(m, PretrainedEncoder)]
    return [m.backbone for m in encoders] + [m.neck for m in encoders if m.neck is not None]


def frozen_encoders(module: nn.Module) -> list[PretrainedEncoder]:
    return [m for m in module.modules() if isinstance(m, PretrainedEncoder) and m.frozen]


def set_cache_writes(module: nn.Module, enabled: bool) -> None:
    """Whether the frozen encoders in ``module`` add the plain images they encode to the on-disk
    cache (they always read it). On for training, validation and evaluation on the dataset's own
    slices, which later runs meet again; ``predict`` on new images turns it off."""
    for encoder in frozen_encoders(module):
        encoder.store.write_cache = enabled


def install_bank(module: nn.Module, levels: list[Tensor], device: torch.device) -> None:
    """Give every frozen encoder in ``module`` one shared bank: per level, the N x C x h x w
    pyramids of the rows that provenance index 0..N-1 refers to."""
    encoders = frozen_encoders(module)
    encoders[0].store.bank = [level.permute(0, 2, 3, 1).to(device, torch.float16).contiguous() for level in levels]
    for encoder in encoders:
        encoder.store = encoders[0].store


def prepare_frozen_encoders(
    module: nn.Module, data: SegmentationData, uses_unlabeled: bool, image_size: int, eval_batch: int,
    device: torch.device, extra_sets: Sequence[Tensor] = (),
) -> bool:
    """Build the feature bank (labelled rows, then unlabelled rows when used: the order of the
    provenance indices of ``Method.training_inputs``; then the rows of ``extra_sets``, e.g. the
    unlabelled slices' photometric copies) and encode the validation slices, all through the cache;
    False when ``module`` has no frozen encoder."""
    encoders = frozen_encoders(module)
    if not encoders:
        return False

    first = encoders[0]
    identities = {e.backbone.identity() for e in encoders}
    if len(identities) > 1:
        raise RuntimeError(f"frozen encoders in one method differ: {sorted(identities)}")
    sets = [data.labeled.images, *([data.unlabeled.images] if uses_unlabeled else []), *extra_sets]
    per_set = [first.backbone.cached(images, progress=True) for images in sets]
    install_bank(module, [torch.cat([levels[i] for levels in per_set]) for i in range(len(per_set[0]))], device)
    val = [x for volume in data.val for x in model_inputs(volume.image, image_size, eval_batch, device)]
    if val:
        first.cached(torch.cat(val), progress=True)
    return True

