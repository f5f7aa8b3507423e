"""Synthetic vessel trees: a built-in thin-structure dataset that needs no data (issue 25).

Each image holds a few trees entering from the border, each a trunk that bifurcates into thinner
branches, every segment a walk whose direction turns smoothly. Vessels are one to three pixels wide
on images larger than a training patch, so squeezing an image to ``train.image_size`` loses them,
which is what native-resolution patch training is compared against. Branches stop before they touch
another branch, so no crossing or merge is wider than three pixels. They are slightly darker than a
background of uneven illumination, texture and speckle, by less than the illumination varies, so no
global threshold finds them. One image per case (scored as an image, distances in pixels); the
split sizes reuse ``data.phantom_labeled``, ``phantom_unlabeled``, ``phantom_val`` and
``phantom_test``, counted in images.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from vqseg.config import Config, ConfigError, DataConfig
from vqseg.data.phantom import smooth_noise
from vqseg.data.sets import training_set
from vqseg.data.volumes import DatasetReader, SegmentationData, Volume
from vqseg.registry import DATASETS

CLASS_NAMES = ["vessel"]
SHAPE = (320, 384)  # H x W: larger than a 128 x 128 or 256 x 256 training patch
STEP = 0.5  # px between the points of a walk, dense enough for discs to merge into a tube
GAP = 3.5  # px kept free around a branch, beyond its radius: others stop short of touching it
FREE_START = 12.0  # px a child walks before its parent and sibling count as obstacles
TREES = (3, 5)  # trees per image, fewest and most
DEPTH = 3  # bifurcations below a trunk
# the thinnest radius that still gives every column (or row) of a line a pixel centre, whatever its angle
# and offset (0.5 px across, a quarter STEP along), so 1 px vessels stay 8-connected
MIN_RADIUS = 0.6


def _stamp(points: np.ndarray, radius: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels whose centres lie within ``radius`` of any of the N x 2 (y, x) ``points``."""
    reach = np.arange(-int(np.ceil(radius)), int(np.ceil(radius)) + 1)
    oy, ox = (o.ravel() for o in np.meshgrid(reach, reach, indexing="ij"))
    base = np.round(points).astype(int)
    ys, xs = base[:, :1] + oy, base[:, 1:] + ox
    near = (ys - points[:, :1]) ** 2 + (xs - points[:, 1:]) ** 2 <= radius**2
    inside = near & (ys >= 0) & (ys < shape[0]) & (xs >= 0) & (xs < shape[1])
    return ys[inside], xs[inside]


def _walk(rng: np.random.Generator, start: np.ndarray, angle: float, length: float) -> tuple[np.ndarray, float]:
    """Points of a walk from ``start`` whose turning rate varies smoothly (knots every 16 px, rarely over
    0.1 rad/px: curves bend over 10 px or more, much wider than a vessel), and its final direction."""
    steps = max(int(length / STEP), 2)
    knots = rng.normal(0, 0.025, steps // 32 + 2)
    turn = np.interp(np.arange(steps) / 32, np.arange(len(knots)), knots)
    angles = angle + np.cumsum(turn * STEP)
    moves = STEP * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return start + np.cumsum(moves, axis=0), float(angles[-1])


def _vessel_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A few trees from the border: trunks 3 px wide, each generation thinner down to 1 px.

    ``owner`` holds, per pixel, the segment whose free zone covers it; a walk ends where it leaves
    the image or enters another segment's zone (its parent's and sibling's only after FREE_START).
    """
    h, w = shape
    mask = np.zeros(shape, bool)
    owner = np.full(shape, -1, np.int32)
    pending = []  # (id, start, angle, length, radius, depth, the ids it may start inside)
    for tree in range(rng.integers(TREES[0], TREES[1] + 1)):
        along = rng.uniform(0.15, 0.85)
        start, inward = [
            (np.array([0.0, along * (w - 1)]), np.pi / 2),
            (np.array([h - 1.0, along * (w - 1)]), -np.pi / 2),
            (np.array([along * (h - 1), 0.0]), 0.0),
            (np.array([along * (h - 1), w - 1.0]), np.pi),
        ][rng.integers(4)]
        angle = inward + rng.uniform(-0.5, 0.5)
        pending.append((tree, start, angle, rng.uniform(100, 180), rng.uniform(1.0, 1.25), 0, ()))
    next_id = len(pending)
    while pending:
        segment, start, angle, length, radius, depth, kin = pending.pop(0)
        points, end_angle = _walk(rng, start, angle, length)
        pixels = np.round(points).astype(int)
        inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < h) & (pixels[:, 1] >= 0) & (pixels[:, 1] < w)
        stop = len(points) if inside.all() else int(np.argmin(inside))
        found = owner[pixels[:stop, 0], pixels[:stop, 1]]
        exempt = (np.arange(stop) * STEP < FREE_START) & np.isin(found, kin)
        blocked = np.flatnonzero((found >= 0) & ~exempt)
        stop = int(blocked[0]) if len(blocked) else stop
        if stop * STEP < 8:  # a stub under 8 px: no segment, no children
            continue
        points = points[:stop]
        mask[_stamp(points, radius, shape)] = True
        zone = _stamp(points, radius + GAP, shape)
        owner[zone] = np.where(owner[zone] < 0, segment, owner[zone])
        if depth < DEPTH and stop == len(pixels) and rng.random() < 0.9:  # bifurcate where it ended freely
            for k, turn in enumerate(rng.uniform(0.45, 1.0, 2) * np.array([1, -1])):  # one to each side
                child = (points[-1], end_angle + turn, length * rng.uniform(0.6, 0.9))
                thinner = max(MIN_RADIUS, radius * rng.uniform(0.65, 0.8))
                kin = (segment, next_id + 1 - k)  # parent, sibling
                pending.append((next_id + k, *child, thinner, depth + 1, kin))
            next_id += 2
    return mask


def make_image(rng: np.random.Generator, name: str, shape: tuple[int, int] = SHAPE) -> Volume:
    """One image and its vessel mask, as a one-slice case: 1 x 1 x H x W in [0, 1], 1 x H x W."""
    mask = _vessel_mask(rng, shape)
    background = 0.5 + 0.15 * smooth_noise(rng, shape, 3) + 0.05 * smooth_noise(rng, shape, 12)
    # partial volume at the edges: a 1 px vessel is fainter than a 3 px one
    profile = 0.5 * mask + 0.5 * uniform_filter(mask.astype(np.float64), 3)
    contrast = rng.uniform(0.08, 0.14) * (1.0 + 0.3 * smooth_noise(rng, shape, 8))
    image = (background - contrast * profile) * (1.0 + 0.08 * rng.standard_normal(shape))  # speckle
    image += rng.normal(0, 0.02, shape)
    image = (image - image.min()) / (image.max() - image.min())
    return Volume(name, image.astype(np.float32)[None, None], mask.astype(np.uint8)[None])


# split -> (generator seed, case-name prefix); disjoint seeds, so no image leaks between splits
_SPLITS = {"labeled": (11000, "lab"), "unlabeled": (12000, "unl"), "val": (13000, "val"), "test": (14000, "test")}


def _counts(cfg: Config) -> dict[str, int]:
    """Images per split: the phantom's size keys, in images (one image is one case here)."""
    return {split: getattr(cfg.data, f"phantom_{split}") for split in _SPLITS}


def vessels_split_lists(cfg: Config) -> dict[str, list[str]]:
    return {split: [f"{_SPLITS[split][1]}{i:03d}" for i in range(n)] for split, n in _counts(cfg).items()}


def load_vessels_split(cfg: Config, split: str) -> list[Volume]:
    """Image i of a split comes from its own generator (split seed, i): the same whatever the count."""
    seed, prefix = _SPLITS[split]
    count = _counts(cfg)[split]
    return [make_image(np.random.default_rng((seed, i)), f"{prefix}{i:03d}") for i in range(count)]


def adopt_vessel_classes(cfg: Config) -> None:
    """Two classes, one channel, class ``vessel``: a key left at its default takes these values, so
    ``data.dataset: vessels`` needs nothing else; any other value is an error."""
    defaults = DataConfig()
    for key, value in (("num_classes", 2), ("in_channels", 1), ("class_names", list(CLASS_NAMES))):
        found = getattr(cfg.data, key)
        if found != value and found != getattr(defaults, key):
            raise ConfigError(f"data.{key}={found!r} but the vessels data has {value!r}; leave data.{key} out")
        setattr(cfg.data, key, value)


def load_vessels(cfg: Config) -> SegmentationData:
    return SegmentationData(
        labeled=training_set(load_vessels_split(cfg, "labeled"), cfg, keep_labels=True),
        unlabeled=training_set(load_vessels_split(cfg, "unlabeled"), cfg, keep_labels=False),
        val=load_vessels_split(cfg, "val"),
        num_classes=2,
        class_names=CLASS_NAMES,
        in_channels=1,
    )


DATASETS.register("vessels")(
    DatasetReader(load_vessels, load_vessels_split, vessels_split_lists, adopt_vessel_classes, synthetic=True)
)
