"""The synthetic vessel trees (``data.dataset: vessels``, issue 25): images larger than a patch, with
vessels one to three pixels wide that branch; the same images from the same seeds and no image in
two splits; the classes the dataset dictates; and a two-step run in resize and in patch mode,
validated and scored at the native size, in pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch._dynamo  # noqa: F401  (the first optimiser imports it lazily, ~1.7 s: paid at collection, not by a test)
import yaml
from conftest import tiny_config
from scipy import ndimage

import vqseg.inference as inference
import vqseg.sliding_window as sliding_window
from vqseg.config import ConfigError
from vqseg.data import load_split, load_training_data, resolve_data_config, split_lists
from vqseg.data.vessels import SHAPE, TREES, load_vessels_split, make_image
from vqseg.engine.trainer import train
from vqseg.evaluation.evaluate import evaluate_run

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = {"data.phantom_labeled": 2, "data.phantom_unlabeled": 1, "data.phantom_val": 1, "data.phantom_test": 2}
EIGHT = np.ones((3, 3), bool)


def vessels_config(**overrides: object):
    cfg = tiny_config(**{"data.dataset": "vessels", **COUNTS, "train.image_size": 64, **overrides})
    resolve_data_config(cfg)
    return cfg


def images(count: int = 6) -> list[np.ndarray]:
    """Vessel masks from seeds no split uses."""
    return [make_image(np.random.default_rng((7, i)), f"x{i}").label[0].astype(bool) for i in range(count)]


def test_images_are_native_one_slice_cases_and_the_dataset_dictates_its_classes():
    """One-slice cases on the 320 x 384 grid without a spacing (scored in pixels); resize mode trains
    on 64 x 64 slices, patch mode on the native images; the classes are filled in, a clash refused."""
    cfg = vessels_config()
    assert (cfg.data.num_classes, cfg.data.in_channels, cfg.data.class_names) == (2, 1, ["vessel"])
    for volume in load_split(cfg, "test"):
        assert volume.image.shape == (1, 1, *SHAPE) and volume.image.dtype == np.float32
        assert volume.label.shape == (1, *SHAPE) and volume.label.dtype == np.uint8
        assert set(np.unique(volume.label)) == {0, 1} and volume.spacing is None
        assert 0 <= volume.image.min() < volume.image.max() <= 1
    resized = load_training_data(cfg).labeled
    assert tuple(resized.images.shape) == (2, 1, 64, 64) and tuple(resized.labels.shape) == (2, 64, 64)
    native = load_training_data(vessels_config(**{"train.patch_size": [64, 64]})).labeled
    assert [tuple(image.shape) for image in native.images] == [(1, 1, *SHAPE)] * 2
    with pytest.raises(ConfigError, match="data.num_classes=3 but the vessels data has 2"):
        vessels_config(**{"data.num_classes": 3})


def test_vessels_are_one_to_three_pixels_wide():
    """Half the width across a vessel is the distance from a pixel centre to the nearest background
    pixel, less half a pixel (a straight w-pixel line: w / 2 at its middle). Bifurcations, curves and
    near misses must not widen it beyond 3 px; most vessel pixels lie in thinner vessels."""
    for mask in images():
        half_width = ndimage.distance_transform_edt(mask)[mask] - 0.5
        assert half_width.max() <= 1.5
        assert (half_width == 1.5).any() and (half_width == 0.5).mean() > 0.5


def arms(mask: np.ndarray, inner: float = 4, outer: float = 7) -> np.ndarray:
    """Per vessel pixel at least ``outer`` from the border, how many separate pieces of its own vessel
    cross the ring around it (1: an end, 2: along a vessel, 3 or more: a junction); 0 elsewhere."""
    components, _ = ndimage.label(mask, EIGHT)
    reach = int(outer)
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    ring = (np.hypot(yy, xx) >= inner) & (np.hypot(yy, xx) <= outer)
    counts = np.zeros(mask.shape, int)
    for y, x in zip(*np.nonzero(mask)):
        if reach <= y < mask.shape[0] - reach and reach <= x < mask.shape[1] - reach:
            window = components[y - reach : y + reach + 1, x - reach : x + reach + 1]
            counts[y, x] = ndimage.label(ring & (window == components[y, x]), EIGHT)[1]
    return counts


def test_vessel_trees_branch_and_hold_together():
    """Every image has junctions of three arms and ends inside the image, within one vessel tree
    (branches that stop short of another tree do not count), and no tree falls apart (1 px vessels
    are 8-connected at any angle)."""
    for mask in images(3):
        assert ndimage.label(mask, EIGHT)[1] <= TREES[1]
        found = arms(mask)
        junctions, ends = (ndimage.label(where, EIGHT)[1] for where in (found >= 3, found == 1))
        assert junctions >= 1 and ends >= 2


def test_splits_are_deterministic_disjoint_and_independent_of_their_sizes():
    """The lists a run pins name what is loaded; the same config gives the same images; image i of a
    split does not depend on the split's size; no image appears in two splits."""
    cfg = vessels_config()
    splits = {split: load_vessels_split(cfg, split) for split in ("labeled", "unlabeled", "val", "test")}
    assert split_lists(cfg) == {split: [v.name for v in volumes] for split, volumes in splits.items()}
    assert split_lists(cfg)["test"] == ["test000", "test001"]
    for a, b in zip(splits["test"], load_vessels_split(vessels_config(), "test")):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    larger = load_vessels_split(vessels_config(**{"data.phantom_test": 3}), "test")
    assert len(larger) == 3 and np.array_equal(larger[1].image, splits["test"][1].image)
    every = [v.image.tobytes() for volumes in splits.values() for v in volumes]
    assert len(set(every)) == len(every) == 6


@pytest.mark.parametrize("mode", ["resize", "patch"])
def test_two_steps_train_validate_and_score_at_the_native_size_in_pixels(mode: str, tmp_path: Path, monkeypatch):
    """Resize mode squeezes images to 64 x 64 and predicts through the resize path; patch mode
    trains on 64 x 64 patches and predicts by sliding windows over the whole image. Both predict
    validation and test images on their native 320 x 384 grid and score them per image, in pixels."""
    patch = [64, 64] if mode == "patch" else []
    predicted, windows = [], []
    predict_case, mean_logits = inference.predict_case, sliding_window._mean_logits

    def spy_case(model, volume, how, device):
        labels = predict_case(model, volume, how, device)
        predicted.append(labels.shape)
        return labels

    def spy_windows(model, image, patch_size, *args, **kwargs):
        windows.append((tuple(patch_size), tuple(image.shape)))
        return mean_logits(model, image, patch_size, *args, **kwargs)

    monkeypatch.setattr(inference, "predict_case", spy_case)
    monkeypatch.setattr(sliding_window, "_mean_logits", spy_windows)
    cfg = vessels_config(**{"output_dir": str(tmp_path / "run"), "train.iterations": 2, "train.val_every": 2,
                            "train.batch_size": 2, "method.name": "supervised", "train.patch_size": patch})
    run = train(cfg)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["class_names"] == ["vessel"] and saved["train"]["patch_size"] == patch
    summary = evaluate_run(run, "test", device="cpu")
    assert predicted == [(1, *SHAPE)] * 3  # one validation image at step 2, two test images
    assert windows == ([((64, 64), (1, *SHAPE))] * 3 if patch else [])
    assert summary["units"] == "pixels" and summary["num_volumes"] == 2
    assert list(summary["paper"]["per_class"]) == ["vessel"]
    with (run / "eval_test.csv").open() as f:
        rows = [(r["case"], r["class"], r["units"]) for r in csv.DictReader(f)]
    assert rows == [("test000", "vessel", "pixels"), ("test001", "vessel", "pixels")]
    pinned = json.loads((run / "split.json").read_text())
    assert pinned["dataset"] == "vessels" and pinned["test"] == ["test000", "test001"]
