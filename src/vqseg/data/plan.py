"""A dataset's fingerprint and plan, computed once by ``vqseg prepare`` (as nnU-Net's planner does).

The fingerprint records what the files hold (each case's shape and spacing in file axis order, the
channel names, intensity statistics over the labelled foreground). The plan decides from it, once
per dataset, how every file is read: the array axis 3D volumes are sliced along (the axis with the
largest median spacing) and the intensity rule. Training, evaluation and ``predict`` read every
image and label with the plan, so no file decides for itself.

For patch training the plan also holds a "2d" and a "3d" configuration, as nnU-Net's
ExperimentPlanner: target spacing, median shape after resampling, patch and batch size under a
memory budget, and the U-Net topology (per-stage pooling and kernels, what ``model.pool`` and
``model.kernels`` take). Every per-axis list is in a ``Volume``'s order: the slice axis first
(D x H x W; the "2d" configuration H x W). Data without spacing (2D pictures, the bundled h5
volumes) are planned in voxel units and not resampled; a dataset of single images has no "3d"
configuration. ``plan_volumes`` plans loaded cases, for datasets that are not prepared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vqseg.config import Config, ModelConfig
from vqseg.data.casefiles import SPACING_TOLERANCE, slice_axis
from vqseg.data.volumes import Volume
from vqseg.errors import ConfigError

# Foreground voxels sampled per case for the intensity statistics (nnU-Net samples 10,000).
SAMPLES_PER_CASE = 10_000

# Memory budget of one labelled batch's activations, in MB (2^20 bytes): fp32 values the U-Net keeps
# for the backward pass. A semi-supervised step holds two to four such batches (unlabelled views,
# a second student; an EMA teacher under no_grad keeps none), so 2048 suits a 12-16 GB GPU.
DEFAULT_MEMORY_BUDGET_MB = 2048.0
# fp32 values saved for the backward pass per voxel and feature channel of a stage, by patch
# dimensionality, measured with torch's saved-tensor hooks: 2D on models/unet.py, 15.5 with its
# dropout masks (two conv + batch norm + LeakyReLU blocks per stage in the encoder and again in the
# decoder, the skip concatenation, the 1x1 conv and upsampling); 3D on models/unet3d.py, 9.9 (the
# same blocks with instance norm, strided-conv downsampling, transposed-conv upsampling, no dropout).
VALUES_PER_FEATURE = {2: 16, 3: 10}
ANISOTROPY = 3.0  # largest / smallest median spacing beyond which data count as anisotropic (nnU-Net's)
MIN_FEATURE_MAP = 4  # an axis is pooled only while it keeps at least this many voxels (nnU-Net's)
COVERAGE = 0.05  # a batch covers at most this share of the dataset's voxels (nnU-Net's)
# nnU-Net's starting patch: this many voxels, isotropic in mm, before it is clipped to the median shape
INITIAL_PATCH_VOXELS = {2: 2048**2, 3: 256**3}


@dataclass
class FingerprintBuilder:
    """Collects per-case facts while ``prepare`` reads every file once."""

    channels: int
    shapes: dict[str, list[int]] = field(default_factory=dict)
    zooms: dict[str, list[float] | None] = field(default_factory=dict)
    samples: list[np.ndarray] = field(default_factory=list)  # per labelled case: N x C foreground intensities
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def add(self, name: str, shape: tuple[int, ...], zooms: tuple[float, ...] | None, image: np.ndarray,
            label: np.ndarray | None) -> None:
        """``image`` D x C x H x W as read, ``label`` D x H x W (or None) along the same axes."""
        self.shapes[name] = [int(s) for s in shape]
        self.zooms[name] = None if zooms is None else [float(z) for z in zooms]
        per_channel = image.transpose(1, 0, 2, 3).reshape(image.shape[1], -1)
        low, high = per_channel.min(axis=1).astype(float), per_channel.max(axis=1).astype(float)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)
        if label is not None:
            foreground = per_channel[:, label.reshape(-1) > 0].T
            if len(foreground) > SAMPLES_PER_CASE:
                rng = np.random.default_rng(len(self.samples))
                foreground = foreground[rng.choice(len(foreground), SAMPLES_PER_CASE, replace=False)]
            self.samples.append(foreground.astype(np.float64))

    def build(self, channel_names: list[str]) -> dict:
        voxels = np.concatenate(self.samples) if self.samples else np.zeros((0, self.channels))
        intensity = [
            {
                "min": float(self.low[c]),
                "max": float(self.high[c]),
                **(
                    {
                        "foreground_mean": float(voxels[:, c].mean()),
                        "foreground_std": float(voxels[:, c].std()),
                        "foreground_p00_5": float(np.percentile(voxels[:, c], 0.5)),
                        "foreground_p99_5": float(np.percentile(voxels[:, c], 99.5)),
                    }
                    if len(voxels)
                    else {}
                ),
            }
            for c in range(self.channels)
        ]
        volumes = [z for z in self.zooms.values() if z is not None and len(z) == 3]
        return {
            "channel_names": channel_names,
            "shapes": self.shapes,
            "spacings": self.zooms,
            "median_spacing": [float(v) for v in np.median(volumes, axis=0)] if volumes else None,
            "intensity": intensity,
        }


def make_plan(
    fingerprint: dict, intensity: str, channels: Sequence[int] | None = None, budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
) -> dict:
    """How every file of the dataset is read (one slicing axis for all 3D volumes, one intensity rule)
    and its "2d" and "3d" configurations (see :func:`plan_configurations`)."""
    median = fingerprint["median_spacing"]
    axis = None if median is None else slice_axis(tuple(median))
    shapes, spacings = _fingerprint_cases(fingerprint, axis)
    return {"slice_axis": axis, "intensity": intensity, **plan_configurations(shapes, spacings, channels, budget_mb)}


def cases_against_plan(fingerprint: dict, plan: dict) -> list[str]:
    """3D cases whose own largest spacing lies on another axis than the plan's (beyond the tolerance):
    they are sliced along the plan's axis like every case, but their orientation deserves a look."""
    axis = plan["slice_axis"]
    if axis is None:
        return []
    odd = []
    for name, zooms in sorted(fingerprint["spacings"].items()):
        if zooms is None or len(zooms) != 3:
            continue
        if zooms[axis] < max(zooms) * (1 - SPACING_TOLERANCE):
            odd.append(name)
    return odd


def describe_plan(fingerprint: dict, plan: dict) -> str:
    """One summary line: the slicing axis and why."""
    median = fingerprint["median_spacing"]
    if plan["slice_axis"] is None:
        return "plan: 2D images, read as they are"
    spacing = " x ".join(f"{v:.3g}" for v in median)
    return (
        f"plan: every volume sliced along array axis {plan['slice_axis']} (median spacing {spacing} mm in file "
        "axis order; the largest, ties to the last axis)"
    )


# ---------------------------------------------------------------------------------------------
# Configurations: target spacing, patch, batch and network topology (nnU-Net's ExperimentPlanner)
# ---------------------------------------------------------------------------------------------


@dataclass
class Topology:
    """A U-Net's shape for one patch: per-axis pooling of every stage below the first, kernel sizes of
    every stage (the first included), and what each patch axis must be a multiple of."""

    pool: list[list[int]]
    kernels: list[list[int]]
    divisor: list[int]


def topology(patch: Sequence[int], spacing: Sequence[float], max_stages: int) -> Topology:
    """nnU-Net's ``get_pool_and_conv_props``: pool (by 2) every axis that keeps at least
    ``MIN_FEATURE_MAP`` voxels and whose current spacing is within 2x of the finest poolable one (a
    lone poolable axis needs 3x ``MIN_FEATURE_MAP``), so thick slices wait until the in-plane axes
    have caught up; at most ``max_stages`` stages. An axis's kernel is 1 while its current spacing is
    at least 2x the finest one (a 3-voxel kernel across 10 mm slices mixes unrelated anatomy), then 3
    for good; the bottleneck's kernel follows the same rule (nnU-Net fixes it at 3)."""
    size, current = [float(s) for s in patch], [float(s) for s in spacing]
    kernel = [1] * len(patch)
    pool: list[list[int]] = []
    kernels: list[list[int]] = []

    def settle_kernel() -> None:
        for axis, value in enumerate(current):
            if value / min(current) < 2:
                kernel[axis] = 3
        kernels.append(list(kernel))

    while len(pool) < max_stages - 1:
        poolable = [a for a in range(len(size)) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not poolable:
            break
        finest = min(current[a] for a in poolable)
        poolable = [a for a in poolable if current[a] / finest < 2]
        if len(poolable) == 1 and size[poolable[0]] < 3 * MIN_FEATURE_MAP:
            break
        settle_kernel()
        pool.append([2 if a in poolable else 1 for a in range(len(size))])
        for a in poolable:
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
    settle_kernel()
    divisor = [math.prod(p[a] for p in pool) for a in range(len(patch))]
    return Topology(pool, kernels, divisor)


def _stage_sizes(patch: Sequence[int], pool: Sequence[Sequence[int]]) -> list[list[int]]:
    """The feature map size of every stage: the patch, then divided by each stage's pooling (rounded up)."""
    sizes = [list(patch)]
    for factors in pool:
        sizes.append([math.ceil(s / f) for s, f in zip(sizes[-1], factors)])
    return sizes


def patch_memory_mb(
    patch: Sequence[int], batch_size: int, pool: Sequence[Sequence[int]], channels: Sequence[int]
) -> float:
    """Estimated activations (MB, fp32) a U-Net of widths ``channels`` keeps for the backward pass on a
    batch of patches: ``VALUES_PER_FEATURE`` (of the patch's dimensionality) x 4 bytes x the sum over
    stages of width x voxels, times the batch. The logits, the loss and the framework's workspace
    come on top; stages beyond ``len(channels)`` are not counted (a plan never has them)."""
    values = sum(width * math.prod(size) for width, size in zip(channels, _stage_sizes(patch, pool)))
    return batch_size * VALUES_PER_FEATURE[len(patch)] * 4 * values / 2**20


def check_patch_memory(
    patch: Sequence[int],
    batch_size: int,
    pool: Sequence[Sequence[int]],
    channels: Sequence[int],
    budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> float:
    """The estimate of :func:`patch_memory_mb`; an explicit patch over the budget is refused in one line."""
    needed = patch_memory_mb(patch, batch_size, pool, channels)
    if needed > budget_mb:
        raise ConfigError(
            f"train.patch_size={list(patch)} with a batch of {batch_size} needs about {needed:.0f} MB of activations "
            f"(U-Net widths {list(channels[: len(pool) + 1])}), over the memory budget of {budget_mb:g} MB: "
            "give a smaller train.patch_size or batch size, or raise train.memory_budget_mb"
        )
    return needed


def _pad_up(patch: Sequence[int], divisor: Sequence[int]) -> list[int]:
    return [math.ceil(p / d) * d for p, d in zip(patch, divisor)]


def _configuration(
    shapes: np.ndarray, spacings: np.ndarray | None, copies: np.ndarray, channels: Sequence[int], budget_mb: float
) -> dict:
    """One configuration from per-case shapes (cases x axes) and spacings (None: voxel units);
    ``copies``: how many such images each case holds (its slices, for the 2D configuration).

    nnU-Net's loop: start from a patch of ``INITIAL_PATCH_VOXELS`` isotropic in mm, clipped to the
    median shape; while a batch of 2 exceeds the budget, shrink the axis largest against the median
    shape; the topology follows the patch, and the patch is padded up to a multiple of its pooling.
    The batch is as many patches as the budget holds, at least 2, covering at most ``COVERAGE`` of
    the dataset's voxels."""
    if spacings is None:
        target, anisotropic, resampled = None, False, shapes
    else:
        # The median on every axis, the out-of-plane one included: nnU-Net takes the 10th percentile of an
        # anisotropic axis to resample thick slices finer, but interpolating between 5-10 mm slices
        # invents anatomy, so anisotropic data keep their own (median) out-of-plane spacing.
        target = np.median(spacings, axis=0)
        anisotropic = bool(target.max() / target.min() > ANISOTROPY)
        resampled = np.maximum(np.round(shapes * spacings / target), 1)
    step = np.ones(shapes.shape[1]) if target is None else target
    median_shape = [int(v) for v in np.round(np.median(resampled, axis=0))]
    start = (1 / step) * (INITIAL_PATCH_VOXELS[len(median_shape)] * np.prod(step)) ** (1 / len(median_shape))
    raw = [max(1, min(int(round(s)), m)) for s, m in zip(start, median_shape)]
    while True:
        topo = topology(raw, step, len(channels))
        patch = _pad_up(raw, topo.divisor)
        if patch_memory_mb(patch, 2, topo.pool, channels) <= budget_mb or max(raw) == 1:
            break
        # shrink the axis largest against the median shape (ties: the longest in mm), to just below its
        # next smaller multiple of the pooling, so every step shrinks the patch
        axis = max((a for a in range(len(raw)) if raw[a] > 1), key=lambda a: (patch[a] / median_shape[a], patch[a] * step[a]))
        raw[axis] = max(1, patch[axis] - topo.divisor[axis])
    per_sample = patch_memory_mb(patch, 1, topo.pool, channels)
    covered = round(COVERAGE * float((resampled.prod(axis=1) * copies).sum()) / math.prod(patch))
    batch_size = max(2, min(int(budget_mb // per_sample), covered))
    stages = len(topo.pool) + 1
    return {
        "spacing": None if target is None else [float(v) for v in target],
        "anisotropic": anisotropic,
        "median_shape": median_shape,
        "patch_size": patch,
        "batch_size": batch_size,
        "pool": topo.pool,
        "kernels": topo.kernels,
        "channels": list(channels[:stages]),
        "memory_mb": round(batch_size * per_sample, 1),
        "memory_budget_mb": float(budget_mb),
    }


def plan_configurations(
    shapes: Sequence[Sequence[int]],
    spacings: Sequence[Sequence[float] | None],
    channels: Sequence[int] | None = None,
    budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> dict[str, dict | None]:
    """The "2d" and "3d" configurations of a dataset from its cases' D x H x W shapes and spacings (mm
    per D, H, W axis, as ``Volume.spacing``; D the slice axis, 1 for a 2D picture).

    A case without spacing puts the whole dataset in voxel units (no resampling). A dataset of single
    images has no 3D configuration (None). ``channels``: the U-Net widths the memory is estimated for
    (default ``model.channels``'s); ``budget_mb``: the memory budget of one batch's activations.
    """
    widths = list(ModelConfig().channels if channels is None else channels)
    size = np.array([[int(s) for s in shape] for shape in shapes], dtype=np.float64)
    space = None if any(s is None for s in spacings) else np.array(spacings, dtype=np.float64)
    volumetric = bool((size[:, 0] > 1).all())
    return {
        "2d": _configuration(size[:, 1:], None if space is None else space[:, 1:], size[:, 0], widths, budget_mb),
        "3d": _configuration(size, space, np.ones(len(size)), widths, budget_mb) if volumetric else None,
    }


def plan_volumes(
    volumes: Sequence[Volume], channels: Sequence[int] | None = None, budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
) -> dict[str, dict | None]:
    """The configurations of loaded cases (the bundled datasets have no prepared plan; their
    ``Volume.spacing`` is None, so their plan is in voxel units)."""
    return plan_configurations(
        [(v.image.shape[0], *v.image.shape[2:]) for v in volumes], [v.spacing for v in volumes], channels, budget_mb
    )


def _fingerprint_cases(fingerprint: dict, axis: int | None) -> tuple[list[tuple[int, ...]], list[tuple[float, ...] | None]]:
    """Shapes and spacings in a Volume's order (the plan's slice axis first; 1 x H x W for a picture)."""
    shapes, spacings = [], []
    for name, shape in fingerprint["shapes"].items():
        zooms = fingerprint["spacings"][name]
        if len(shape) == 3:
            order = [axis, *(a for a in range(3) if a != axis)]
            shapes.append(tuple(shape[a] for a in order))
            spacings.append(None if zooms is None else tuple(zooms[a] for a in order))
        else:
            shapes.append((1, *shape[:2]))
            spacings.append(None if zooms is None else (1.0, *zooms[:2]))
    return shapes, spacings


def configuration(plan: dict, name: str, dataset: str) -> dict:
    """The plan's "2d" or "3d" configuration (what ``train.patch_size`` with 2 or 3 values trains with);
    a 3D configuration of a 2D dataset, or a plan written before configurations, is a ConfigError."""
    if name not in plan:
        raise ConfigError(
            f"{dataset}: its plan has no {name} configuration (prepared by an older vqseg); "
            f"run `vqseg prepare {dataset} --force` with the same arguments"
        )
    if plan[name] is None:
        raise ConfigError(
            f"train.patch_size has 3 values but {dataset} is 2D: its cases are single images; "
            f"give 2 sizes (its 2D plan: {plan['2d']['patch_size']})"
        )
    return plan[name]


def describe_configuration(name: str, config: dict | None) -> str:
    """One summary line of a configuration: patch, batch, pooling, target spacing."""
    if config is None:
        return f"plan {name}: none (single images)"
    spacing = (
        "voxel units (no spacing stored, no resampling)"
        if config["spacing"] is None
        else " x ".join(f"{v:.3g}" for v in config["spacing"]) + " mm" + (" (anisotropic)" if config["anisotropic"] else "")
    )
    pooling = " ".join("x".join(str(f) for f in p) for p in config["pool"]) or "none"
    order = " (slice axis first)" if len(config["patch_size"]) == 3 else ""
    memory = f"{config['memory_mb']:.0f}" if config["memory_mb"] >= 10 else f"{config['memory_mb']:.2g}"
    return (
        f"plan {name}: patch {' x '.join(map(str, config['patch_size']))}{order}, batch {config['batch_size']} "
        f"(about {memory} of {config['memory_budget_mb']:.0f} MB), pooling {pooling}, "
        f"target spacing {spacing}"
    )


def plan_patch_run(cfg: Config, plan: dict | None, dataset: str) -> None:
    """Fill in what a patch-mode run (``train.patch_size``) takes from its dataset's plan, where the
    config leaves it open, so config.yaml records it: the target spacing and anisotropy of the
    dataset's 2D or 3D configuration (``plan`` None: a dataset without one, in voxel units), and for
    ``unet3d`` the pooling and kernels of the patch (nnU-Net's topology); then refuse a patch the
    memory budget cannot hold."""
    patch = cfg.train.patch_size
    if not patch:
        return
    spacing = None
    if plan is not None:
        conf = configuration(plan, "3d" if len(patch) == 3 else "2d", dataset)
        spacing = conf["spacing"]
        if not cfg.data.target_spacing and spacing is not None:
            cfg.data.target_spacing = list(spacing)
        cfg.aug.anisotropic = cfg.aug.anisotropic or bool(conf["anisotropic"])
    if cfg.model.name == "unet3d" and not cfg.model.pool:
        shape = topology(patch, cfg.data.target_spacing or spacing or [1.0] * len(patch), len(cfg.model.channels))
        if any(size % factor for size, factor in zip(patch, shape.divisor)):
            fitting = [max(1, round(size / factor)) * factor for size, factor in zip(patch, shape.divisor)]
            raise ConfigError(
                f"train.patch_size={list(patch)}: the planned pooling {shape.pool} needs multiples of "
                f"{shape.divisor} per axis, e.g. {fitting}"
            )
        cfg.model.pool, cfg.model.kernels = shape.pool, shape.kernels
        cfg.model.channels = cfg.model.channels[: len(shape.pool) + 1]
        cfg.model.dropout = cfg.model.dropout[: len(shape.pool) + 1]
    pool = cfg.model.pool or [[2] * len(patch)] * (len(cfg.model.channels) - 1)
    check_patch_memory(patch, cfg.train.batch_size, pool, cfg.model.channels, cfg.train.memory_budget_mb)

