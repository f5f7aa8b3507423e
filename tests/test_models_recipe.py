"""The networks' recipes, line by line: the SSL4MIS U-Net, the DPT head, the pretrained pyramids'
preprocessing and levels, the frozen encoder (eval mode, cache, bank rows) and the foundation
feature cache.

Each network is checked against a functional re-implementation written here from its documented
recipe and fed the module's own parameters (by state-dict name), so a changed rate, order,
concatenation, resampling mode or size fails; the pyramids' inputs are checked by spying on what
the backbone network receives.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from test_pretrained import cache_dir, needs_medsam, pretrained_config  # noqa: F401  (cache_dir: autouse fixture)
from torch import Tensor
from torch.nn import functional as F

from vqseg.config import ModelConfig
from vqseg.data import load_training_data
from vqseg.data.augment import Augmenter
from vqseg.data.provenance import add_provenance
from vqseg.inference import predict_volumes
from vqseg.models import Features, build_model
from vqseg.models.dpt import DPTDecoder
from vqseg.models.pretrained import (
    DINOv2Pyramid,
    PretrainedEncoder,
    PyramidBackbone,
    TinyViTPyramid,
    check_encoder_input,
    default_encoder_input,
    prepare_frozen_encoders,
)
from vqseg.modules import foundation
from vqseg.modules.foundation import FeatureMemo, FoundationEncoder, LiteMedSAMEncoder, cached_slice_features
from vqseg.run import build_run_method

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SSL4MIS_CHANNELS = [16, 32, 64, 128, 256]
SSL4MIS_DROPOUT = [0.05, 0.1, 0.2, 0.3, 0.5]


def randomise_norms(module: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode batch norm matters."""
    gen = torch.Generator().manual_seed(7)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


class Functional:
    """Parameters by state-dict name, and the layers of the recipes written as plain functions."""

    def __init__(self, module: torch.nn.Module, training: bool) -> None:
        self.s = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.training = training

    def conv(self, name: str, x: Tensor, padding: int = 0, stride: int = 1, bias: bool = True) -> Tensor:
        return F.conv2d(x, self.s[f"{name}.weight"], self.s[f"{name}.bias"] if bias else None,
                        stride=stride, padding=padding)

    def bn(self, name: str, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.s[f"{name}.running_mean"].clone(), self.s[f"{name}.running_var"].clone(),
                            self.s[f"{name}.weight"], self.s[f"{name}.bias"], training=self.training,
                            momentum=0.1, eps=1e-5)


# ---------------------------------------------------------------------------------------------
# U-Net (SSL4MIS)
# ---------------------------------------------------------------------------------------------


def unet_reference(f: Functional, x: Tensor, dropout: list[float]) -> Tensor:
    """SSL4MIS's UNet: ConvBlock = conv3x3-BN-LeakyReLU(0.01)-Dropout(p)-conv3x3-BN-LeakyReLU; the
    encoder's levels get dropout[0..4] and a 2x2 max-pool before every level but the first; each
    decoder step is 1x1 conv, bilinear upsampling (align_corners) to the skip, [skip, up]
    concatenation and a ConvBlock without dropout; a 3x3 head."""

    def block(prefix: str, y: Tensor, p: float) -> Tensor:
        y = F.leaky_relu(f.bn(f"{prefix}.1", f.conv(f"{prefix}.0", y, padding=1)), 0.01)
        y = F.dropout(y, p, training=f.training)
        return F.leaky_relu(f.bn(f"{prefix}.5", f.conv(f"{prefix}.4", y, padding=1)), 0.01)

    feats = [block("encoder.stem", x, dropout[0])]
    for level in range(1, len(dropout)):
        feats.append(block(f"encoder.downs.{level - 1}.1", F.max_pool2d(feats[-1], 2), dropout[level]))
    y = feats[-1]
    for i, skip in enumerate(reversed(feats[:-1])):
        up = F.interpolate(f.conv(f"decoder.ups.{i}.reduce", y), size=skip.shape[-2:], mode="bilinear",
                           align_corners=True)
        y = block(f"decoder.ups.{i}.conv", torch.cat([skip, up], dim=1), 0.0)
    return f.conv("head", y, padding=1)


@pytest.mark.parametrize("training", [False, True])
def test_unet_is_ssl4mis_unet(training: bool) -> None:
    """The default model (SSL4MIS's widths and per-level dropout rates) equals the functional
    recipe, in eval mode (running statistics) and in training mode (batch statistics, the same
    dropout masks drawn in the same order)."""
    cfg = ModelConfig()
    assert cfg.name == "unet" and cfg.channels == SSL4MIS_CHANNELS and cfg.dropout == SSL4MIS_DROPOUT
    torch.manual_seed(0)
    model = build_model(cfg, 1, 4)
    randomise_norms(model)
    model.train(training)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    f = Functional(model, training)
    torch.manual_seed(11)
    with torch.no_grad():
        got = model(x)
    torch.manual_seed(11)
    expected = unet_reference(f, x, SSL4MIS_DROPOUT)
    assert got.shape == (2, 4, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    features = model.encode(x)
    assert features.stem is None  # the U-Net's first block is a level (with its skip), not a stem
    assert [t.shape[1] for t in features.levels] == SSL4MIS_CHANNELS == model.feature_channels
    assert [t.shape[-1] for t in features.levels] == [32, 16, 8, 4, 2]
    assert model.reconstruction_channels == SSL4MIS_CHANNELS


def test_unet_dropout_rates_by_level() -> None:
    """One dropout per encoder level at model.dropout's rate (shallowest first); none in the decoder."""
    model = build_model(ModelConfig(channels=[4, 8, 16, 32, 64], dropout=[0.01, 0.02, 0.03, 0.04, 0.05]), 1, 2)
    assert [m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)] == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert all(m.p == 0.0 for m in model.decoder.modules() if isinstance(m, torch.nn.Dropout))


# ---------------------------------------------------------------------------------------------
# DPT head
# ---------------------------------------------------------------------------------------------


def dpt_reference(f: Functional, features: list[Tensor], strides: tuple[int, ...] = (4, 8, 16, 32)) -> Tensor:
    """UniMatch V2's DPT with this package's departures (module docstring of ``dpt``). Other
    ``strides``: the path runs at the finest stride met so far, each skip resized to it."""
    stem, *levels = features
    h, w = stem.shape[-2:]

    def scaled(s: int) -> tuple[int, int]:
        return max(1, math.ceil(h / s)), max(1, math.ceil(w / s))

    sizes = [scaled(s) for s in strides]
    if tuple(strides) != (4, 8, 16, 32):  # the finest level's grid is where the whole path runs
        finest = scaled(min(strides))
        rn_sizes, sizes = sizes, [finest] * 4
    else:
        rn_sizes = sizes
    rn = []
    for i, level in enumerate(levels):
        projected = F.interpolate(f.conv(f"projects.{i}", level), size=rn_sizes[i], mode="bilinear", align_corners=False)
        rn.append(F.interpolate(f.conv(f"layers_rn.{i}", projected, padding=1, bias=False), size=sizes[i],
                                mode="bilinear", align_corners=False))

    def rcu(prefix: str, x: Tensor) -> Tensor:
        return x + f.conv(f"{prefix}.conv2", F.relu(f.conv(f"{prefix}.conv1", F.relu(x), padding=1)), padding=1)

    def fusion(i: int, x: Tensor, skip: Tensor | None, size: tuple[int, int]) -> Tensor:
        if skip is not None:
            x = x + rcu(f"fusions.{i}.skip_unit", skip)
        x = F.interpolate(rcu(f"fusions.{i}.unit", x), size=size, mode="bilinear", align_corners=True)
        return f.conv(f"fusions.{i}.out", x)

    path = fusion(3, rn[3], None, sizes[2])  # deepest first, each step to the next shallower scale
    path = fusion(2, path, rn[2], sizes[1])
    path = fusion(1, path, rn[1], sizes[0])
    path = fusion(0, path, rn[0], sizes[0])  # the last stays at a quarter of the input
    stem_half = F.relu(f.bn("stem_down.1", f.conv("stem_down.0", stem, padding=1, stride=2, bias=False)))
    coarse = F.relu(f.conv("output_conv.0", path, padding=1))
    coarse = F.interpolate(coarse, size=stem_half.shape[-2:], mode="bilinear", align_corners=False)
    fused = F.relu(f.bn("fuse.1", f.conv("fuse.0", torch.cat([coarse, stem_half], 1), padding=1, bias=False)))
    fused = F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([fused, stem], 1)  # the model's head classifies it


@pytest.mark.parametrize(
    "size,grids,strides",
    [((30, 35), [8, 4, 2, 2], (4, 8, 16, 32)), ((32, 32), [2, 2, 2, 2], (4, 8, 16, 32)),
     ((32, 32), [8, 4, 2, 8], (4, 8, 16, 4))],
)
def test_dpt_head_is_the_recipe(size: tuple[int, int], grids: list[int], strides: tuple[int, ...]) -> None:
    """Project, reassemble at strides 4/8/16/32 (ceil), fuse from the deepest up, fuse with the
    half-resolution stem, 1x1 classifier over [fused, stem] at the input size. With the neck read
    at stride 4 (``model.dpt_strides``: 4, 8, 16, 4), the whole fusion path runs at stride 4."""
    torch.manual_seed(0)
    head = DPTDecoder([5, 6, 7, 8], stem_channels=3, features=8, strides=strides)
    randomise_norms(head)
    with torch.no_grad():  # non-zero biases everywhere (the defaults are small)
        for name, p in head.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    head.eval()
    gen = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 3, *size, generator=gen)]
    features += [torch.randn(2, c, g, g, generator=gen) for c, g in zip([5, 6, 7, 8], grids)]
    with torch.no_grad():
        got = head(Features(features[1:], features[0]))
    assert got.shape == (2, 6, *size) and head.out_channels == 6  # [fused, stem] for the model's head
    expected = dpt_reference(Functional(head, False), features, strides)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # UniMatch V2's widths (out_channels scaled by features): 1/2, 1, 2, 2
    assert [p.out_channels for p in head.projects] == [4, 8, 16, 16]


def test_dpt_head_refuses_other_pyramids() -> None:
    with pytest.raises(ValueError, match="4 pyramid levels"):
        DPTDecoder([5, 6, 7], stem_channels=3)


# ---------------------------------------------------------------------------------------------
# Pyramid preprocessing and levels
# ---------------------------------------------------------------------------------------------


def batch_with_ranges(h: int, w: int) -> Tensor:
    """Two grey images with very different intensity ranges (per-image normalisation shows)."""
    gen = torch.Generator().manual_seed(4)
    base = torch.rand(2, 1, h, w, generator=gen)
    return torch.cat([base[:1] * 5 + 3, base[1:] * 0.1 - 2])


def resized(images: Tensor, size: int, antialias: bool) -> Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=antialias).expand(-1, 3, -1, -1)


def per_image_minmax(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo)


@pytest.mark.parametrize("side,antialias", [((48, 40), True), ((16, 16), False)])
def test_litemedsam_pyramid_input_and_levels(monkeypatch: pytest.MonkeyPatch, side, antialias: bool) -> None:
    """TinyViT sees the image resized to its input (antialiased when shrinking), replicated to
    three channels and min-max normalised per image; the cache keeps stage maps 1-3 and the neck
    (not the raw last stage) at 1/4, 1/8, 1/4 and 1/4 of the input, and the model reads them
    average-pooled to 1/4, 1/8, 1/16 and 1/16 (``model.level_strides``)."""
    backbone = TinyViTPyramid(32, None)
    seen = []
    gen = torch.Generator().manual_seed(5)
    maps = [torch.randn(2, c, s, s, generator=gen) for c, s in [(16, 32), (32, 16), (40, 8), (320, 8), (256, 8)]]

    def spy(net, x):
        seen.append((net, x))
        return maps

    monkeypatch.setattr(foundation, "tinyvit_stages", spy)
    images = batch_with_ranges(*side)
    levels = backbone(images)
    ((net, x),) = seen
    assert net is backbone.net
    torch.testing.assert_close(x, per_image_minmax(resized(images, 32, antialias)), atol=1e-5, rtol=0)
    cached = [F.avg_pool2d(maps[0], 4), F.avg_pool2d(maps[1], 4), maps[2], maps[4]]
    assert len(levels) == 4
    for got, want in zip(levels, cached):
        torch.testing.assert_close(got, want)
    read = backbone.select(levels)
    for got, want in zip(read, [cached[0], cached[1], F.avg_pool2d(maps[2], 4), F.avg_pool2d(maps[4], 4)]):
        torch.testing.assert_close(got, want)
    native = TinyViTPyramid(32, None, strides=[4, 8, 4, 4]).select(levels)
    for got, want in zip(native, cached):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("full", [False, True])
def test_dinov2_pyramid_input_and_blocks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, full: bool) -> None:
    """DINOv2 sees the resized, replicated image with ImageNet's mean and std; the pyramid is
    blocks 2, 5, 8 and 11 (UniMatch V2's ViT-S layers; the tiny stand-in's 0-3), final norm,
    reshaped to the patch grid."""
    tiny = foundation.load_dinov2(None, embed_dim=32, depth=12 if full else 4, num_heads=2)
    weights = None
    if full:
        weights = tmp_path / "dinov2.pth"
        weights.write_bytes(b"0")
        monkeypatch.setattr(foundation, "load_dinov2", lambda *args, **kwargs: tiny)
    backbone = DINOv2Pyramid(28, weights)
    if not full:
        backbone.net = tiny
    calls = []
    original = tiny.get_intermediate_layers

    def spy(x, **kwargs):
        calls.append((x, kwargs))
        return original(x, **kwargs)

    monkeypatch.setattr(tiny, "get_intermediate_layers", spy)
    images = batch_with_ranges(40, 36)
    levels = backbone(images)
    ((x, kwargs),) = calls
    torch.testing.assert_close(x, (resized(images, 28, True) - IMAGENET_MEAN) / IMAGENET_STD)
    assert list(kwargs["n"]) == ([2, 5, 8, 11] if full else [0, 1, 2, 3])
    assert kwargs["reshape"] is True and kwargs["norm"] is True
    assert [tuple(level.shape) for level in levels] == [(2, 32, 2, 2)] * 4
    assert backbone.out_channels == ([384] * 4 if full else [32] * 4)


def test_encoder_input_sizes() -> None:
    assert default_encoder_input("dinov2", 256) == 252 and default_encoder_input("litemedsam", 256) == 256
    assert default_encoder_input("dinov2", 28) == 28
    check_encoder_input("litemedsam", 16)
    check_encoder_input("dinov2", 14)
    for name, size in [("litemedsam", 12), ("litemedsam", 18), ("dinov2", 21), ("dinov2", 0)]:
        with pytest.raises(Exception, match=f"encoder_input={size}"):
            check_encoder_input(name, size)


def test_backbone_identity_names_everything_the_features_depend_on(tmp_path: Path) -> None:
    """The cache key and checkpoint guard change with the model, recipe (stages or blocks,
    normalisation, pooling), input size, pyramid widths and the weights file's content, and carry
    the precision; the file's name does not matter."""
    a, b, c = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "c.pth"
    a.write_bytes(b"12345")
    b.write_bytes(b"12345")
    c.write_bytes(b"54321")
    base = PyramidBackbone(32, [4, 8], [8, 4], a, "stages=1,2")
    others = [PyramidBackbone(16, [4, 8], [8, 4], a, "stages=1,2"), PyramidBackbone(32, [4, 9], [8, 4], a, "stages=1,2"),
              PyramidBackbone(32, [4, 8], [8, 4], c, "stages=1,2"), PyramidBackbone(32, [4, 8], [8, 4], None, "stages=1,2"),
              PyramidBackbone(32, [4, 8], [8, 4], a, "stages=2,3")]
    tiny_vit = TinyViTPyramid(32, None)
    bf16 = TinyViTPyramid(32, None, precision="bf16")
    identities = [p.identity() for p in [base, *others, tiny_vit, bf16, DINOv2Pyramid(28, None)]]
    assert len(set(identities)) == len(identities)
    assert all(("|bf16|" if p is bf16 else "|fp32|") in p.identity() for p in [base, *others, tiny_vit, bf16])
    assert "avgpool-strides=[4, 8, 4, 4]" in tiny_vit.identity() and "minmax" in tiny_vit.identity()
    # the strides the model reads are taken from one cache: they do not change its key
    assert TinyViTPyramid(32, None, strides=[4, 8, 4, 4]).identity() == tiny_vit.identity()
    assert "blocks=[0, 1, 2, 3]|final-norm" in DINOv2Pyramid(28, None).identity()
    assert PyramidBackbone(32, [4, 8], [8, 4], b, "stages=1,2").identity() == base.identity()  # same content
    before = base.identity()
    a.write_bytes(b"123456")  # another file under the same name
    assert base.identity() != before


# ---------------------------------------------------------------------------------------------
# Frozen encoder: eval mode from the start, cache, bank rows, shared bank
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["litemedsam", "dinov2"])
def test_frozen_encoder_encodes_plain_images_in_eval_mode_through_float16(name: str) -> None:
    """Frozen from construction (no .train()/.eval() call needed): no gradients, eval mode, no
    running-statistics update; its levels are the eval-mode backbone's, stored in float16."""
    model = build_model(pretrained_config(name).model, 1, 4)
    encoder = model.encoder
    backbone = encoder.backbone
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    features = model.encode(images)
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        expected = backbone.eval().levels(images)
    assert len(features.levels) == 4 and features.stem.shape == (3, 4, 32, 32)  # the stem is not a level
    for got, want in zip(features.levels, expected, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got.half().float(), got)  # stored in float16
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(features.stem, encoder.stem(images))  # the stem sees the image itself


def test_finetuned_encoder_runs_the_backbone_with_gradients() -> None:
    model = build_model(pretrained_config("litemedsam", "finetune").model, 1, 4).train()
    images = torch.rand(2, 1, 32, 32)
    levels = model.encode(images).levels
    assert all(level.requires_grad and level.dtype == torch.float32 for level in levels)
    levels[-1].sum().backward()
    assert all(p.grad is not None for p in model.encoder.backbone.net.neck.parameters())


def test_builds_share_the_backbone_but_not_the_head() -> None:
    """Every copy of a tiny stand-in is the same encoder (fixed seed), while the stem and head
    keep drawing from the global generator (CPS's two networks start differently)."""
    cfg = pretrained_config("litemedsam").model
    torch.manual_seed(0)
    a, b = build_model(cfg, 1, 4), build_model(cfg, 1, 4)
    sa, sb = a.encoder.backbone.state_dict(), b.encoder.backbone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a.encoder.stem[0].weight, b.encoder.stem[0].weight)
    assert not torch.equal(a.head.weight, b.head.weight)


@pytest.mark.parametrize("uses_unlabeled", [True, False])
def test_bank_rows_are_labelled_then_unlabelled_slices(uses_unlabeled: bool) -> None:
    """The bank (N x h x w x C float16 per level) holds the cached pyramids of the labelled
    slices, then the unlabelled ones when the method uses them (the provenance indices of
    ``Streams``); an identity-provenance view looks up exactly its slice's features; the
    validation slices are encoded ahead of training; every frozen encoder shares the bank."""
    cfg = pretrained_config("litemedsam", **{"method.name": "cps"})
    data = load_training_data(cfg)
    method = build_run_method(cfg, 1, 4)
    encoders = [m for m in method.modules() if isinstance(m, PretrainedEncoder)]
    assert len(encoders) == 2
    prepare_frozen_encoders(method, data, uses_unlabeled, 32, 8, torch.device("cpu"))
    assert encoders[1].store is encoders[0].store
    bank = encoders[0].store.bank
    backbone = encoders[0].backbone
    slices = [data.labeled.images, *([data.unlabeled.images] if uses_unlabeled else [])]
    images = torch.cat([torch.as_tensor(s) for s in slices])
    with torch.no_grad():  # the cache keeps float16 maps of one slice at a time; the model reads them pooled
        kept = [torch.cat(maps) for maps in zip(*(backbone(image[None]) for image in images))]
        expected = backbone.select([level.half() for level in kept])
    assert len(bank) == 4
    for rows, want in zip(bank, expected):
        assert rows.dtype == torch.float16 and rows.shape == (len(images), *want.shape[2:], want.shape[1])
        torch.testing.assert_close(rows, want.half().permute(0, 2, 3, 1), atol=0, rtol=0)

    index = torch.arange(len(images)).flip(0)
    view = add_provenance(images[index], index)
    with torch.no_grad():
        looked_up = encoders[1](view)
    for got, want in zip(looked_up.levels, expected, strict=True):
        torch.testing.assert_close(got, want[index].half().float(), atol=2e-3, rtol=0)

    shift = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).expand(len(view), 2, 3)  # by half the image
    with torch.no_grad():
        shifted = encoders[1](Augmenter.warp(view, shift))
    for level in shifted.levels:  # what comes from outside the source image reads zeros, like its pixels
        half = level.shape[-1] // 2
        assert (level[..., half:] == 0).all() and (level[..., :half] != 0).any()

    calls = []
    original = backbone.forward
    backbone.forward = lambda x: calls.append(len(x)) or original(x)
    predict_volumes(method.student, data.val, 32, 8, torch.device("cpu"))
    assert calls == []  # the validation slices were encoded (and memoised) by the set-up


# ---------------------------------------------------------------------------------------------
# Foundation encoders and caches
# ---------------------------------------------------------------------------------------------


def test_minmax_normalise_per_image_and_constant_images() -> None:
    x = torch.cat([batch_with_ranges(8, 8), batch_with_ranges(8, 8).flip(0) * 3, batch_with_ranges(8, 8) - 1], 1)
    torch.testing.assert_close(foundation.minmax_normalise(x), per_image_minmax(x))  # over all three channels
    flat = foundation.minmax_normalise(torch.full((1, 3, 4, 4), 2.0))
    assert torch.equal(flat, torch.zeros_like(flat))


def test_encoder_input_resize_and_replication() -> None:
    up = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(foundation.encoder_input(up, 32), resized(up, 32, False), atol=0, rtol=0)
    down = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(foundation.encoder_input(down, 32), resized(down, 32, True), atol=0, rtol=0)
    same = torch.rand(1, 3, 32, 32)
    assert torch.equal(foundation.encoder_input(same, 32), same)


def test_tinyvit_stages_are_each_stage_before_its_downsampling_then_the_neck() -> None:
    net = foundation.build_tinyvit(256, tiny=True).eval()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    before_downsampling: list[Tensor] = []
    outputs: list[Tensor] = []
    for layer in net.layers:
        if layer.downsample is not None:
            layer.downsample.register_forward_pre_hook(lambda m, args: before_downsampling.append(args[0]))
    net.layers[-1].blocks[-1].register_forward_hook(lambda m, args, out: outputs.append(out))
    with torch.no_grad():
        reference_neck = net.forward_features(x)
        outputs.clear(), before_downsampling.clear()
        maps = foundation.tinyvit_stages(net, x)

    def as_map(t: Tensor, side: int) -> Tensor:
        return t if t.ndim == 4 else t.reshape(1, side, side, -1).permute(0, 3, 1, 2)

    sides = [256, 128, 64, 64]  # TinyViT's native strides 1, 2, 4, 4
    assert len(maps) == 5 and len(before_downsampling) == 3
    for i in range(3):
        torch.testing.assert_close(maps[i], as_map(before_downsampling[i], sides[i]))
    torch.testing.assert_close(maps[3], as_map(outputs[0], 64))  # the last stage's output
    torch.testing.assert_close(maps[4], net.neck(maps[3]))
    # at 256 px the vendored forward_features runs too: the neck of the last stage
    torch.testing.assert_close(maps[4], reference_neck)


def test_foundation_encoder_never_builds_a_graph() -> None:
    class Tiny(FoundationEncoder):
        name = "tiny"

        def __init__(self) -> None:
            super().__init__(dim=3, input_size=16, grid=(16, 16))
            self.scale = torch.nn.Parameter(torch.ones(1))
            self._freeze()

        def _normalise(self, x: Tensor) -> Tensor:
            return x * 2

        def _encode(self, x: Tensor) -> Tensor:
            return x * self.scale

    enc = Tiny()
    images = torch.rand(1, 1, 16, 16, requires_grad=True)
    out = enc(images)
    assert not out.requires_grad
    torch.testing.assert_close(out, images.detach().expand(-1, 3, -1, -1) * 2)


@needs_medsam
def test_litemedsam_features_ignore_the_intensity_scale() -> None:
    """LiteMedSAM's own preprocessing: per-image min-max, so an affine intensity change (and the
    other images of the batch) leave an image's embedding unchanged."""
    enc = LiteMedSAMEncoder(input_size=32)
    image = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    alone = enc(image)
    batch = enc(torch.cat([image * 7 - 3, image * 0.01]))
    torch.testing.assert_close(batch[0:1], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)


def test_foundation_cache_keys_follow_the_weights_content(tmp_path: Path) -> None:
    """Model, input size, width, grid, precision and the weights file's content key the cache;
    a file with the same name and size but other bytes misses, a renamed copy hits."""
    def key(cls: type, dim: int, path: Path, size: int = 32, grid: tuple[int, int] = (8, 8)) -> str:
        enc = cls.__new__(cls)
        FoundationEncoder.__init__(enc, dim=dim, input_size=size, grid=grid)
        enc.weights_path = path
        return enc.cache_key()

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"1")
    b.write_bytes(b"1")
    keys = [key(LiteMedSAMEncoder, 256, a), key(foundation.DINOv2Encoder, 384, a)]
    assert key(LiteMedSAMEncoder, 256, b) == keys[0] and f"|{foundation.PRECISION}|" in keys[0]
    for size, dim, grid in [(64, 256, (8, 8)), (32, 128, (8, 8)), (32, 256, (4, 4))]:
        keys.append(key(LiteMedSAMEncoder, dim, a, size, grid))
    a.write_bytes(b"2")  # same name, same size, other weights
    keys.append(key(LiteMedSAMEncoder, 256, a))
    assert len(set(keys)) == len(keys)


def test_digest_and_stored_key_guard_the_cache(tmp_path: Path) -> None:
    images = torch.rand(2, 1, 4, 4)
    digest = foundation._digest("id", images)
    assert digest == foundation._digest("id", images.clone())
    assert digest != foundation._digest("other", images)
    assert digest != foundation._digest("id", images.view(2, 1, 2, 8))  # same bytes, another shape
    assert digest != foundation._digest("id", images.view(torch.int32))  # same bytes, another dtype
    path = tmp_path / "x.pt"
    torch.save({"key": "abc", "levels": [torch.zeros(1, 2, 2, dtype=torch.float16)]}, path)
    assert foundation._read_slice(path, "abc", [(1, 2, 2)]) is not None
    assert foundation._read_slice(path, "abd", [(1, 2, 2)]) is None
    assert foundation._read_slice(tmp_path / "missing.pt", "abc", None) is None


def test_cached_slice_features_mixed_hits_keep_the_order(cache_dir: Path) -> None:  # noqa: F811 (the fixture)
    """Per-slice float16 cache: a call where some slices hit returns every slice in its own row,
    encodes only the missing ones (in batches of the given size), memoises hits, and another
    identity misses."""
    weights = torch.randn(3, 1)
    calls: list[int] = []

    def encode(x: Tensor) -> list[Tensor]:
        calls.append(len(x))
        return [x * weights.view(1, 3, 1, 1), F.avg_pool2d(x, 2)]

    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    first = cached_slice_features(encode, "enc", "name", images[[1, 3]])
    assert calls == [1, 1]  # one slice at a time by default
    memo = FeatureMemo()
    levels = cached_slice_features(encode, "enc", "name", images, memo=memo, batch_size=2)
    assert calls == [1, 1, 2, 1]  # slices 0, 2, 4 only
    expected = encode(images)
    for got, want in zip(levels, expected):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want.half(), atol=0, rtol=0)
    torch.testing.assert_close(first[0], expected[0][[1, 3]].half(), atol=0, rtol=0)
    assert len(memo) == 5
    shutil.rmtree(cache_dir)  # the memo alone answers now
    calls.clear()
    again = cached_slice_features(encode, "enc", "name", images[[4, 0]], memo=memo)
    assert calls == [] and torch.equal(again[1], levels[1][[4, 0]])
    cached_slice_features(encode, "other", "name", images[:1], memo=memo)  # even through a shared memo
    assert calls == [1]


def test_foundation_cache_key_is_the_encoders_whole_identity(tmp_path: Path) -> None:
    """Two encoders with one name and input size but other features (here: width) never share a file."""

    class Widths(FoundationEncoder):
        name = "widths"

        def __init__(self, dim: int) -> None:
            super().__init__(dim=dim, input_size=8, grid=(1, 1))
            self._freeze()

        def _normalise(self, x: Tensor) -> Tensor:
            return x

        def _encode(self, x: Tensor) -> Tensor:
            return x.mean((1, 2, 3), keepdim=True).expand(-1, self.dim, 1, 1)

    images = torch.rand(2, 1, 8, 8)
    for dim in (4, 5):
        enc = Widths(dim)
        (levels,) = cached_slice_features(lambda x: [enc(x)], enc.cache_key(), enc.name, images,
                                          shapes=[(dim, 1, 1)], root=tmp_path)
        assert levels.shape == (2, dim, 1, 1)


def test_litemedsam_checkpoint_loads_its_image_encoder_strictly(tmp_path: Path) -> None:
    """Only ``image_encoder.*`` keys, prefix stripped, every key required."""
    net = foundation.build_tinyvit(32, tiny=True)
    torch.manual_seed(3)
    source = foundation.build_tinyvit(32, tiny=True)
    state = {f"image_encoder.{k}": v for k, v in source.state_dict().items()}
    state["mask_decoder.weight"] = torch.zeros(1)
    path = tmp_path / "lite_medsam.pth"
    torch.save(state, path)
    foundation.load_litemedsam(net, path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())
    del state[next(iter(state))]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        foundation.load_litemedsam(net, path)
    torch.save({"mask_decoder.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="image_encoder"):
        foundation.load_litemedsam(net, path)


# ---------------------------------------------------------------------------------------------
# Encoder levels, the image stem and the head (issue 24)
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_with_the_head_in_the_decoder_loads_into_the_head() -> None:
    """Checkpoints written before the segmentation head was its own module name it decoder.head."""
    model = build_model(ModelConfig(channels=[4, 8, 16, 32, 64], dropout=[0.0] * 5), 1, 3).eval()
    old = {("decoder." + k if k.startswith("head.") else k): v.clone() for k, v in model.state_dict().items()}
    fresh = build_model(ModelConfig(channels=[4, 8, 16, 32, 64], dropout=[0.0] * 5), 1, 3).eval()
    fresh.load_state_dict(old)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_unimatch_feature_dropout_leaves_a_pretrained_image_stem_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """UniMatch's feature-perturbation stream drops out the encoder's levels (UniMatch V2's DPT has no
    stem); the stem's map reaches the decoder as the clean pass computed it."""
    from vqseg.data import load_training_data
    from vqseg.methods.base import Batch

    cfg = pretrained_config("litemedsam", **{"method.name": "unimatch", "method.fp_dropout": 0.9})
    data = load_training_data(cfg)
    method = build_run_method(cfg, 1, 4)
    method.prepare(data)
    method.train()
    decoded = []
    decode = method.student.decode
    monkeypatch.setattr(method.student, "decode", lambda f: decoded.append(f) or decode(f))
    li, ui = torch.arange(2), torch.arange(3)
    batch = Batch(method.training_inputs(data.labeled.images[li], li, "labeled"), data.labeled.labels[li].long(),
                  method.training_inputs(data.unlabeled.images[ui], ui, "unlabeled"), li, ui)
    method.training_step(batch, 0)
    clean, perturbed = decoded[0], decoded[1]  # the clean pass over labelled + weak rows, then the fp stream
    assert torch.equal(perturbed.stem, clean.stem[2:])
    for dropped, level in zip(perturbed.levels, clean.levels[:], strict=True):
        zero = (dropped.flatten(2) == 0).all(dim=2)
        assert zero.float().mean() > 0.5  # whole channels dropped at rate 0.9
        kept = ~zero
        torch.testing.assert_close(dropped.flatten(2)[kept], level[2:].flatten(2)[kept] / 0.1)


def test_vq_levels_count_encoder_levels_not_the_stem() -> None:
    """method.vq_levels indexes the encoder's levels: 0 is a pretrained pyramid's first level (64
    channels for LiteMedSAM's stage 1), -1 its neck."""
    cfg = pretrained_config("litemedsam", **{"method.name": "vqseg", "method.foundation": "none",
                                             "method.codebook_size": 16, "method.vq_levels": [0, -1]})
    net = build_run_method(cfg, 1, 4).student
    widths = net.base.feature_channels
    assert len(widths) == 4 and net.levels == [0, 3]
    assert net.quantizers["0"].center is not None and net.quantizers["0"].down.in_channels == widths[0]
