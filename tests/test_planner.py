"""The planner's 2D and 3D configurations (nnU-Net's ExperimentPlanner) and resampling to their spacing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from own_data_builders import write_image_folder

from vqseg.data.plan import (
    DEFAULT_MEMORY_BUDGET_MB,
    VALUES_PER_FEATURE,
    check_patch_memory,
    configuration,
    make_plan,
    patch_memory_mb,
    plan_configurations,
    plan_volumes,
    topology,
)
from vqseg.data.prepare import SPLIT_FILE, prepare
from vqseg.data.resample import (
    labels_at_shape,
    resample_image,
    resample_labels,
    resampled_shape,
    volume_at_spacing,
)
from vqseg.data.volumes import DataError, Geometry, Volume
from vqseg.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Topology: nnU-Net's get_pool_and_conv_props
# ---------------------------------------------------------------------------------------------


def test_isotropic_patch_pools_every_axis_up_to_the_stage_cap():
    topo = topology([160, 160, 160], [1.0, 1.0, 1.0], max_stages=6)
    assert topo.pool == [[2, 2, 2]] * 5 and topo.kernels == [[3, 3, 3]] * 6 and topo.divisor == [32, 32, 32]


def test_thick_slices_wait_until_the_in_plane_spacing_catches_up():
    """10 mm slices, 1.5 mm pixels: in-plane pooling twice (1.5 -> 3 -> 6 mm), then the slice axis
    is within 2x and pools too, until it would drop below 4 voxels; kernels are 1 across the slices
    while their spacing is at least twice the finest, then 3 for good."""
    topo = topology([10, 256, 224], [10.0, 1.5, 1.5], max_stages=5)
    assert topo.pool == [[1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert topo.kernels == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert topo.divisor == [2, 16, 16]


def test_a_lone_poolable_axis_needs_three_times_the_minimum():
    """Only H is poolable (W has 6 voxels): it pools while it has at least 12 (64 -> 32 -> 16 -> 8)."""
    topo = topology([64, 6], [1.0, 1.0], max_stages=8)
    assert topo.pool == [[2, 1]] * 3 and topo.divisor == [8, 1]


# ---------------------------------------------------------------------------------------------
# Memory estimate
# ---------------------------------------------------------------------------------------------


def test_memory_estimate_formula():
    # widths 4 and 8 on 8 x 8 then 4 x 4: 4 * 64 + 8 * 16 = 384 values, each VALUES_PER_FEATURE fp32, batch 2
    assert patch_memory_mb([8, 8], 2, [[2, 2]], [4, 8]) == pytest.approx(2 * VALUES_PER_FEATURE[2] * 4 * 384 / 2**20)
    assert patch_memory_mb([2, 8, 8], 1, [[1, 2, 2]], [4, 8]) == pytest.approx(VALUES_PER_FEATURE[3] * 4 * 768 / 2**20)


def _saved_for_backward_mb(encoder: torch.nn.Module, decoder: torch.nn.Module, x: torch.Tensor) -> float:
    weights = {p.data_ptr() for m in (encoder, decoder) for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(encoder(x))
    return sum(saved.values()) / 2**20


def test_memory_estimate_matches_what_the_unets_save_for_backward():
    """The per-feature constants are what models/unet.py (2D, with its dropout masks) and
    models/unet3d.py save for the backward pass, within 10 %."""
    from vqseg.models.unet import UNetDecoder, UNetEncoder
    from vqseg.models.unet3d import UNet3DDecoder, UNet3DEncoder

    channels = [4, 8, 16, 32]
    encoder, decoder = UNetEncoder(1, channels, [0.05, 0.1, 0.2, 0.3]), UNetDecoder(channels)
    measured = _saved_for_backward_mb(encoder, decoder, torch.rand(2, 1, 64, 64))
    assert patch_memory_mb([64, 64], 2, [[2, 2]] * 3, channels) / measured == pytest.approx(1, abs=0.1)
    pool, kernels = [[1, 2, 2], [2, 2, 2], [2, 2, 2]], [[1, 3, 3]] + [[3, 3, 3]] * 3
    encoder, decoder = UNet3DEncoder(1, channels, pool, kernels), UNet3DDecoder(channels, pool, kernels)
    measured = _saved_for_backward_mb(encoder, decoder, torch.rand(2, 1, 8, 32, 32))
    assert patch_memory_mb([8, 32, 32], 2, pool, channels) / measured == pytest.approx(1, abs=0.1)


def test_an_explicit_patch_over_the_budget_is_one_config_error():
    pool = [[1, 2, 2]] * 3
    fits = check_patch_memory([8, 64, 64], 2, pool, [16, 32, 64, 128], budget_mb=1000)
    assert fits == pytest.approx(patch_memory_mb([8, 64, 64], 2, pool, [16, 32, 64, 128]))
    with pytest.raises(ConfigError) as err:
        check_patch_memory([32, 256, 256], 4, pool, [16, 32, 64, 128], budget_mb=1000)
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.patch_size=[32, 256, 256] with a batch of 4")
    assert "memory budget of 1000 MB" in message


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

ANISOTROPIC = dict(
    shapes=[(10, 200, 180), (12, 180, 160), (9, 220, 200)],
    spacings=[(8.0, 1.6, 1.6), (8.0, 1.8, 1.8), (10.0, 1.5, 1.5)],
)


def _check_config(config: dict, dims: int) -> None:
    """What every configuration guarantees."""
    stages = len(config["pool"]) + 1
    assert len(config["patch_size"]) == len(config["median_shape"]) == dims
    assert all(len(p) == dims for p in config["pool"]) and all(len(k) == dims for k in config["kernels"])
    assert len(config["kernels"]) == stages == len(config["channels"])
    divisor = np.prod(config["pool"], axis=0) if config["pool"] else np.ones(dims, int)
    assert all(p % d == 0 for p, d in zip(config["patch_size"], divisor))
    ceiling = [-(-m // d) * d for m, d in zip(config["median_shape"], divisor)]
    assert all(p <= c for p, c in zip(config["patch_size"], ceiling))  # at most the median shape, rounded up
    assert config["batch_size"] >= 2
    assert config["memory_mb"] <= config["memory_budget_mb"]


def test_anisotropic_dataset_keeps_its_median_out_of_plane_spacing():
    plan = plan_configurations(ANISOTROPIC["shapes"], ANISOTROPIC["spacings"], [8, 16, 32, 64])
    three = plan["3d"]
    assert three["spacing"] == [8.0, 1.6, 1.6] and three["anisotropic"]
    # resampled: (10, 200, 180), (12, 202, 180), (11, 206, 188) -> median
    assert three["median_shape"] == [11, 202, 180]
    assert three["kernels"][0] == [1, 3, 3] and three["pool"][0] == [1, 2, 2]
    _check_config(three, 3)
    two = plan["2d"]
    assert two["spacing"] == [1.6, 1.6] and not two["anisotropic"] and two["median_shape"] == [202, 180]
    _check_config(two, 2)


def test_a_small_budget_shrinks_the_axis_largest_against_the_median_first():
    shapes, spacings = [(1, 64, 256)] * 40, [None] * 40
    roomy = plan_configurations(shapes, spacings, [8, 16, 32], budget_mb=1e4)["2d"]
    assert roomy["patch_size"] == [64, 256]
    tight = plan_configurations(shapes, spacings, [8, 16, 32], budget_mb=2.0)["2d"]
    _check_config(tight, 2)
    assert tight["batch_size"] == 2 and tight["patch_size"][0] < 64
    height, width = tight["patch_size"]
    assert abs(width / 256 - height / 64) <= 4 / 64  # shrunk in proportion, one pooling step apart


def test_batch_size_fills_the_budget_but_covers_at_most_5_percent_of_the_data():
    few = plan_configurations([(1, 32, 32)] * 10, [None] * 10, [8, 16], budget_mb=1e4)["2d"]
    assert few["batch_size"] == 2  # 10 images: 5 % is half an image
    many = plan_configurations([(1, 32, 32)] * 4000, [None] * 4000, [8, 16], budget_mb=10.0)["2d"]
    per_sample = patch_memory_mb(many["patch_size"], 1, many["pool"], [8, 16])
    assert many["batch_size"] == int(10.0 // per_sample) < 200


def test_single_images_have_no_3d_configuration():
    plan = plan_configurations([(1, 40, 36), (1, 44, 30)], [None, None])
    assert plan["3d"] is None and plan["2d"]["spacing"] is None
    assert configuration(plan, "2d", "DATA") is plan["2d"]
    with pytest.raises(ConfigError, match=r"^train.patch_size has 3 values but DATA is 2D: .*2D plan: \[") as err:
        configuration(plan, "3d", "DATA")
    assert "\n" not in str(err.value)


def test_a_plan_without_configurations_asks_for_prepare_again():
    with pytest.raises(ConfigError, match=r"run `vqseg prepare /d --force`"):
        configuration({"slice_axis": 2, "intensity": "percentile"}, "3d", "/d")


def test_bundled_volumes_without_spacing_are_planned_in_voxel_units():
    volumes = [Volume(f"p{i}", np.zeros((6 + i, 1, 40, 36), np.float32), None) for i in range(3)]
    plan = plan_volumes(volumes, [8, 16, 32])
    assert plan["3d"]["spacing"] is None and plan["3d"]["median_shape"] == [7, 40, 36]
    assert plan["2d"]["median_shape"] == [40, 36]
    _check_config(plan["3d"], 3)


def test_fingerprint_axes_are_put_in_volume_order():
    """The fingerprint is in file axis order; configurations put the plan's slice axis first."""
    fingerprint = {
        "shapes": {"a": [14, 12, 4], "b": [14, 12, 4]},
        "spacings": {"a": [1.4, 1.5, 6.0], "b": [1.4, 1.5, 6.0]},
        "median_spacing": [1.4, 1.5, 6.0],
    }
    plan = make_plan(fingerprint, "percentile")
    assert plan["slice_axis"] == 2
    assert plan["3d"]["spacing"] == [6.0, 1.4, 1.5] and plan["3d"]["median_shape"] == [4, 14, 12]
    assert plan["3d"]["memory_budget_mb"] == DEFAULT_MEMORY_BUDGET_MB


def test_prepare_of_an_image_folder_stores_a_2d_plan_and_says_there_is_no_3d_one(tmp_path):
    root = write_image_folder(tmp_path / "d", shape=(40, 36))
    lines = prepare(root, val="2", test="2")
    plan = json.loads((root / SPLIT_FILE).read_text())["plan"]
    assert plan["3d"] is None and plan["2d"]["median_shape"] == [40, 36]
    assert "plan 3d: none (single images)" in lines
    assert any(line.startswith("plan 2d: patch ") and "voxel units" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Resampling to the plan's spacing and back
# ---------------------------------------------------------------------------------------------


def _phantom(shape=(12, 40, 36)) -> tuple[np.ndarray, np.ndarray]:
    """D x 1 x H x W image and D x H x W labels: a large box (1) around a smaller one (2)."""
    label = np.zeros(shape, np.uint8)
    label[2:10, 6:34, 5:30] = 1
    label[3:9, 12:28, 10:26] = 2
    image = (label[:, None] / 2 + 0.1).astype(np.float32)
    return image, label


def _dice(a: torch.Tensor, b: torch.Tensor, c: int) -> float:
    return float(2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()))


@pytest.mark.parametrize("target", [(3.0, 1.5, 1.5), (1.0, 0.5, 0.7)])
def test_resampling_round_trip_restores_the_shape_and_large_structures(target):
    image, label = _phantom()
    volume = Volume("v", image, label, spacing=(2.0, 1.0, 1.0))
    resampled_image, resampled_label = volume_at_spacing(volume, target, 3)
    shape = resampled_shape((12, 40, 36), (2.0, 1.0, 1.0), target)
    assert tuple(resampled_image.shape) == (1, *shape) and tuple(resampled_label.shape) == shape
    assert resampled_label.dtype == torch.uint8
    back = resample_labels(resampled_label, (12, 40, 36), 3)
    original = torch.from_numpy(label)
    assert back.shape == original.shape
    assert _dice(back, original, 1) > 0.9 and _dice(back, original, 2) > 0.85
    image_back = resample_image(resampled_image, (12, 40, 36))
    assert (image_back[0] - torch.from_numpy(image[:, 0])).abs().mean() < 0.05
    # a prediction's probabilities go back the same way
    probabilities = torch.nn.functional.one_hot(resampled_label.long(), 3).movedim(-1, 0).float()
    assert torch.equal(labels_at_shape(probabilities, (12, 40, 36)), back.long())


def test_identity_spacing_is_a_no_op_bit_for_bit():
    image, label = _phantom()
    volume = Volume("v", image, label, spacing=(2.0, 1.0, 1.0))
    same_image, same_label = volume_at_spacing(volume, (2.0, 1.0, 1.0), 3)
    assert torch.equal(same_image, torch.from_numpy(image.transpose(1, 0, 2, 3)))
    assert torch.equal(same_label, torch.from_numpy(label))
    x = torch.rand(2, 5, 6, 7)
    assert resample_image(x, (5, 6, 7)) is x


def test_a_2d_target_resamples_each_slice_in_plane():
    image, label = _phantom()
    volume = Volume("v", image, label, spacing=(2.0, 1.0, 1.0))
    resampled_image, resampled_label = volume_at_spacing(volume, (1.25, 1.5), 3)
    assert tuple(resampled_label.shape) == (12, 32, 24)
    per_slice = torch.nn.functional.interpolate(torch.from_numpy(image), size=(32, 24), mode="bilinear")
    torch.testing.assert_close(resampled_image, per_slice.transpose(0, 1), atol=1e-6, rtol=0)


def test_voxel_units_are_not_resampled_and_missing_spacing_is_named():
    image, label = _phantom()
    volume = Volume("v", image, label, geometry=Geometry(source="/data/case7.h5", shape=(12, 40, 36)))
    kept, _ = volume_at_spacing(volume, None, 3)
    assert tuple(kept.shape) == (1, 12, 40, 36)
    with pytest.raises(DataError, match=r"^/data/case7.h5: no spacing stored, but the plan resamples to 2 x 1 x 1 mm"):
        volume_at_spacing(volume, (2.0, 1.0, 1.0), 3)
