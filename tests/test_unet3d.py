"""unet3d: nnU-Net's generic 3D U-Net: shapes under anisotropic pooling, per-axis kernels and
strides, its blocks, the default plan, the config checks, layer names and gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from vqseg.config import ConfigError, ModelConfig, load_config
from vqseg.models import available_models, build_model
from vqseg.modules.attach import FeatureTap

CHANNELS = [2, 4, 6, 8]
POOL = [[1, 2, 2], [2, 2, 2], [1, 2, 2]]  # thick slices: the depth is halved once
KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
PATCH = (8, 32, 32)
LEVEL_SHAPES = [(8, 32, 32), (8, 16, 16), (4, 8, 8), (4, 4, 4)]


def anisotropic(**changes: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(name="unet3d", channels=CHANNELS, dropout=[0.0] * 4, pool=POOL, kernels=KERNELS)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return build_model(cfg, in_channels=1, num_classes=3)


def test_registered_and_output_matches_the_input_under_anisotropic_pooling() -> None:
    assert "unet3d" in available_models()
    model = anisotropic()
    x = torch.randn(1, 1, *PATCH)
    levels = model.encode(x).levels
    assert [tuple(level.shape) for level in levels] == [(1, c, *s) for c, s in zip(CHANNELS, LEVEL_SHAPES)]
    assert model(x).shape == (1, 3, *PATCH)
    assert model.feature_channels == CHANNELS and model.reconstruction_channels == CHANNELS
    assert model.encoder.reconstruction_scales == POOL


def test_kernels_and_pooling_per_axis_reach_the_convs() -> None:
    model = anisotropic()
    stages = [model.encoder.stem, *model.encoder.downs]
    for level, stage in enumerate(stages):
        first, second = stage[0][0], stage[1][0]
        for conv in (first, second):
            assert isinstance(conv, nn.Conv3d) and list(conv.kernel_size) == KERNELS[level]
            assert list(conv.padding) == [k // 2 for k in KERNELS[level]]
        assert list(first.stride) == ([1, 1, 1] if level == 0 else POOL[level - 1])  # strided conv, no max-pool
        assert list(second.stride) == [1, 1, 1]
    for n, up in enumerate(model.decoder.ups):  # ups.0 is the deepest
        level = len(CHANNELS) - 2 - n  # the level it lands on
        assert isinstance(up.up, nn.ConvTranspose3d)
        assert list(up.up.kernel_size) == list(up.up.stride) == POOL[level]
        assert (up.up.in_channels, up.up.out_channels) == (CHANNELS[level + 1], CHANNELS[level])
        assert up.conv[0][0].in_channels == 2 * CHANNELS[level]  # the skip concatenated
        assert all(list(block[0].kernel_size) == KERNELS[level] for block in up.conv)
    assert isinstance(model.head, nn.Conv3d) and model.head.kernel_size == (1, 1, 1)
    assert {k for k in model.state_dict() if k.startswith("head.")} == {"head.weight", "head.bias"}


def test_blocks_are_conv_instance_norm_leaky_relu_with_nnunet_init() -> None:
    model = anisotropic()
    blocks = [m for m in model.modules() if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv3d)]
    assert len(blocks) == 2 * len(CHANNELS) + 2 * (len(CHANNELS) - 1)
    for conv, norm, act in blocks:
        assert isinstance(norm, nn.InstanceNorm3d) and norm.affine and norm.num_features == conv.out_channels
        assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.01
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {nn.BatchNorm3d, nn.MaxPool3d, nn.Dropout, nn.Dropout3d}
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert all(conv.bias is not None and not conv.bias.any() for conv in convs)  # He init: zero biases


def test_empty_plan_is_isotropic_halving_with_3x3x3_kernels() -> None:
    model = anisotropic(pool=[], kernels=[])
    levels = model.encode(torch.randn(1, 1, 16, 16, 16)).levels
    assert [tuple(level.shape[2:]) for level in levels] == [(16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3]
    assert all(m.kernel_size == (3, 3, 3) for m in model.modules() if isinstance(m, nn.Conv3d) and m is not model.head)


def unet3d_config(**values: object) -> list[str]:
    base = {"model.name": "unet3d", "model.channels": CHANNELS, "model.dropout": [0, 0, 0, 0]}
    return [f"{key}={json.dumps(value)}" for key, value in {**base, **values}.items()]


def test_resolve_accepts_a_divisible_3d_patch() -> None:
    cfg = load_config(None, unet3d_config(**{"model.pool": POOL, "model.kernels": KERNELS, "train.patch_size": list(PATCH)}))
    assert cfg.model.pool == POOL  # the config keeps what was given: the planner fills empty plans
    load_config(None, unet3d_config(**{"train.patch_size": [8, 16, 24]}))  # default plan: 8 per axis


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model.pool": [[2, 2, 2]]}, r"model\.pool has 1 entries but model\.channels has 4 stages: give 3"),
        ({"model.kernels": [[3, 3, 3]] * 3}, r"model\.kernels has 3 entries .* give 4"),
        ({"model.pool": [[2, 2]] * 3}, r"model\.pool\[0\]=\[2, 2\]: give 3 sizes"),
        ({"model.kernels": [[3, 3, 2]] * 4}, r"model\.kernels\[0\].*odd"),
        ({"train.patch_size": [32, 32]}, r"train\.patch_size=\[32, 32\]: .*3D patches"),
        ({"model.pool": POOL, "train.patch_size": [3, 32, 32]}, r"pooling \[2, 8, 8\] of model\.pool .*\[4, 32, 32\]"),
    ],
)
def test_resolve_refuses_plans_that_do_not_fit(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, unet3d_config(**values))
    assert "\n" not in str(error.value)


def test_documented_layer_names_tap_the_levels_and_decoder_stages() -> None:
    model = anisotropic()
    names = ["encoder.stem", "encoder.downs.0", "encoder.downs.2", "decoder.ups.0.conv", "decoder.ups.2.conv"]
    with FeatureTap(model, names) as tap:
        model(torch.randn(1, 1, *PATCH))
        shapes = {name: tuple(tap[name].shape[1:]) for name in names}
    assert shapes == {
        "encoder.stem": (2, *LEVEL_SHAPES[0]),
        "encoder.downs.0": (4, *LEVEL_SHAPES[1]),
        "encoder.downs.2": (8, *LEVEL_SHAPES[3]),
        "decoder.ups.0.conv": (6, *LEVEL_SHAPES[2]),
        "decoder.ups.2.conv": (2, *LEVEL_SHAPES[0]),
    }


def test_gradients_reach_every_weight() -> None:
    model = anisotropic()
    x = torch.randn(1, 1, *PATCH, requires_grad=True)
    labels = torch.randint(0, 3, (1, *PATCH), generator=torch.Generator().manual_seed(1))
    nn.functional.cross_entropy(model(x), labels).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        if name.endswith("weight"):
            assert parameter.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_the_plan_fills_an_empty_pooling_and_refuses_a_patch_it_does_not_divide() -> None:
    """With model.pool empty the planner (data/plan.py) fills pooling and kernels for the patch and
    spacing, trims model.channels to the stages it plans, and refuses a patch its pooling cannot divide."""
    from vqseg.data import resolve_data_config

    cfg = load_config(None, unet3d_config(**{"data.dataset": "phantom", "train.patch_size": [8, 32, 32]}))
    resolve_data_config(cfg)
    assert cfg.model.pool and len(cfg.model.kernels) == len(cfg.model.pool) + 1 == len(cfg.model.channels)
    total = [math.prod(axis) for axis in zip(*cfg.model.pool)]
    assert all(size % factor == 0 for size, factor in zip([8, 32, 32], total))
    odd = load_config(None, unet3d_config(**{"data.dataset": "phantom", "train.patch_size": [9, 20, 32]}))
    with pytest.raises(ConfigError, match=r"train\.patch_size=\[9, 20, 32\]: the planned pooling .* multiples of"):
        resolve_data_config(odd)

