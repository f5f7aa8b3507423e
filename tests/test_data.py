"""Dataset readers: the ACDC reader on a synthetic folder (every bad input is a DataError naming the
file or setting), the real ACDC split sizes when the data is present, and the phantom."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_HW, TinyACDC, tiny_config, write_volume

from vqseg.config import ConfigError
from vqseg.data import load_split, load_training_data
from vqseg.data.acdc import load_acdc_split, read_h5_volume
from vqseg.data.phantom import SLICES_PER_CASE, load_phantom, load_phantom_split
from vqseg.data.volumes import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def acdc_cfg(root: Path, **overrides):
    return tiny_config(**{"data.dataset": "acdc", "data.root": str(root), "train.image_size": 16, **overrides})


def names_of(slice_set) -> set[str]:
    return {name.rsplit("_slice", 1)[0] for name in slice_set.names}


# ---------------------------------------------------------------------------------------------
# Reading the synthetic ACDC folder
# ---------------------------------------------------------------------------------------------


def test_both_frame_naming_conventions(tiny_acdc: TinyACDC):
    cfg = acdc_cfg(tiny_acdc.root)
    val = load_acdc_split(cfg, "val")  # patient 7: frame01 + frame17 (ACDC), patient 8: frame01 + frame02
    assert [v.name for v in val] == ["patient007_frame01", "patient007_frame17", "patient008_frame01", "patient008_frame02"]
    for v in val:
        depth = tiny_acdc.depths[v.name]
        assert v.image.shape == (depth, 1, *TINY_HW) and v.image.dtype == np.float32
        assert v.label.shape == (depth, *TINY_HW) and v.label.dtype == np.uint8
        with h5py.File(tiny_acdc.volume_path(v.name)) as f:
            np.testing.assert_array_equal(v.image[:, 0], f["image"][()])
            np.testing.assert_array_equal(v.label, f["label"][()])


def test_frames_sorted_numerically_and_stray_files_ignored(tiny_acdc: TinyACDC):
    volumes = tiny_acdc.root / "volumes"
    # a third phase with a higher frame number, and files that only look like volumes
    write_volume(volumes / "patient009_frame03.h5", np.zeros((1, *TINY_HW), np.float32), np.zeros((1, *TINY_HW), np.uint8))
    (volumes / "patient009_frame01_scribble.h5").write_bytes(b"not a volume")
    (volumes / "patient009_frame01.h5.bak").write_bytes(b"not a volume")
    test = load_split(acdc_cfg(tiny_acdc.root), "test")
    assert [v.name for v in test] == [
        "patient009_frame01", "patient009_frame03", "patient009_frame19", "patient010_frame01", "patient010_frame02",
    ]


def test_labeled_by_count_follows_labeled_order(tiny_acdc: TinyACDC):
    data = load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": 2}))
    labeled = [4, 2]  # first two of labeled_order, not of train
    unlabeled = [1, 3, 5, 6]
    assert len(data.labeled) == tiny_acdc.slices(labeled)
    assert len(data.unlabeled) == tiny_acdc.slices(unlabeled)
    assert names_of(data.labeled) == {s for p in labeled for s in tiny_acdc.files[p]}
    assert names_of(data.unlabeled) == {s for p in unlabeled for s in tiny_acdc.files[p]}
    assert data.labeled.images.shape == (len(data.labeled), 1, 16, 16)
    assert data.labeled.labels.shape == (len(data.labeled), 16, 16) and data.labeled.labels.dtype == torch.uint8
    assert int(data.labeled.labels.max()) <= 3
    assert data.unlabeled.labels is None  # unlabelled slices carry no labels into training
    assert data.unlabeled.images.shape == (len(data.unlabeled), 1, 16, 16)
    assert [v.name for v in data.val] == [s for p in (7, 8) for s in tiny_acdc.files[p]]
    assert data.num_classes == 4 and data.in_channels == 1 and data.class_names == ["RV", "Myo", "LV"]


def test_labeled_slices_are_the_resized_volume(tiny_acdc: TinyACDC):
    data = load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": 1, "train.image_size": 16}))
    stem = tiny_acdc.files[4][0]
    with h5py.File(tiny_acdc.volume_path(stem)) as f:
        image, label = f["image"][()], f["label"][()]
    i = data.labeled.names.index(f"{stem}_slice1")
    expected = torch.nn.functional.interpolate(torch.from_numpy(image[1][None, None]), size=(16, 16), mode="bilinear")
    torch.testing.assert_close(data.labeled.images[i, 0], expected[0, 0])
    # nearest resizing keeps labels from the source slice
    assert set(data.labeled.labels[i].unique().tolist()) <= set(np.unique(label[1]).tolist())


def test_labeled_by_explicit_list(tiny_acdc: TinyACDC):
    data = load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": [5, 1]}))
    assert names_of(data.labeled) == {s for p in (1, 5) for s in tiny_acdc.files[p]}
    assert len(data.labeled) == tiny_acdc.slices([1, 5])
    assert names_of(data.unlabeled) == {s for p in (2, 3, 4, 6) for s in tiny_acdc.files[p]}


def test_all_training_patients_labeled_leaves_unlabeled_empty(tiny_acdc: TinyACDC):
    data = load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": 6}))
    assert len(data.labeled) == tiny_acdc.slices([1, 2, 3, 4, 5, 6])
    assert len(data.unlabeled) == 0


def test_labeled_order_defaults_to_train_order(tiny_acdc: TinyACDC):
    splits = {k: v for k, v in tiny_acdc.splits.items() if k != "labeled_order"}
    (tiny_acdc.root / "splits.json").write_text(json.dumps(splits))
    data = load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": 2}))
    assert names_of(data.labeled) == {s for p in (1, 2) for s in tiny_acdc.files[p]}


def test_float_labels_with_integer_values_are_accepted(tiny_acdc: TinyACDC, tmp_path):
    path = tmp_path / "patient001_frame01.h5"
    write_volume(path, np.zeros((2, 4, 4), np.float32), np.full((2, 4, 4), 3.0, np.float32))
    volume = read_h5_volume(path)
    assert volume.label.dtype == np.uint8 and (volume.label == 3).all()


def test_single_slice_volume_becomes_one_deep(tmp_path):
    path = tmp_path / "patient001_frame01.h5"
    write_volume(path, np.zeros((6, 5), np.float32), np.ones((6, 5), np.uint8))
    volume = read_h5_volume(path)
    assert volume.image.shape == (1, 1, 6, 5) and volume.label.shape == (1, 6, 5)


# ---------------------------------------------------------------------------------------------
# Bad input: a DataError naming the file or setting
# ---------------------------------------------------------------------------------------------


def _load(tiny: TinyACDC, **overrides):
    return load_training_data(acdc_cfg(tiny.root, **overrides))


def _rewrite(tiny: TinyACDC, stem: str, image=..., label=...) -> Path:
    """Replace a training volume (patient 1 is unlabelled by default, so every file is read)."""
    path = tiny.volume_path(stem)
    with h5py.File(path) as f:
        old_image, old_label = f["image"][()], f["label"][()]
    path.unlink()
    write_volume(path, old_image if image is ... else image, old_label if label is ... else label)
    return path


def test_corrupt_file(tiny_acdc: TinyACDC):
    path = tiny_acdc.volume_path("patient001_frame01")
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(DataError, match="patient001_frame01.h5") as err:
        _load(tiny_acdc)
    assert "HDF5" in str(err.value)


def test_empty_file(tiny_acdc: TinyACDC):
    tiny_acdc.volume_path("patient003_frame13").write_bytes(b"")
    with pytest.raises(DataError, match="patient003_frame13.h5"):
        _load(tiny_acdc)


def test_missing_label_dataset(tiny_acdc: TinyACDC):
    _rewrite(tiny_acdc, "patient001_frame11", label=None)
    with pytest.raises(DataError, match="patient001_frame11.h5") as err:
        _load(tiny_acdc)
    assert "label" in str(err.value)


def test_image_label_shape_mismatch(tiny_acdc: TinyACDC):
    depth = tiny_acdc.depths["patient002_frame02"]
    _rewrite(tiny_acdc, "patient002_frame02", label=np.zeros((depth, TINY_HW[0], TINY_HW[1] - 1), np.uint8))
    with pytest.raises(DataError, match="patient002_frame02.h5") as err:
        _load(tiny_acdc)
    assert "shape" in str(err.value)


def test_slice_count_mismatch(tiny_acdc: TinyACDC):
    depth = tiny_acdc.depths["patient002_frame02"]
    _rewrite(tiny_acdc, "patient002_frame02", label=np.zeros((depth + 1, *TINY_HW), np.uint8))
    with pytest.raises(DataError, match="patient002_frame02.h5"):
        _load(tiny_acdc)


@pytest.mark.parametrize(
    "bad_label",
    [
        np.full((3, *TINY_HW), 4, np.uint8),  # class 4 with num_classes 4
        np.full((3, *TINY_HW), -1, np.int16),  # negative
        np.full((3, *TINY_HW), 255, np.uint8),  # an ignore index leaking into the data
    ],
    ids=["too-large", "negative", "255"],
)
def test_label_values_out_of_range(tiny_acdc: TinyACDC, bad_label):
    _rewrite(tiny_acdc, "patient005_frame15", label=bad_label)
    with pytest.raises(DataError, match="patient005_frame15.h5") as err:
        _load(tiny_acdc)
    assert "[0, 3]" in str(err.value)


def test_non_integer_labels(tiny_acdc: TinyACDC):
    _rewrite(tiny_acdc, "patient005_frame15", label=np.full((3, *TINY_HW), 1.5, np.float32))
    with pytest.raises(DataError, match="patient005_frame15.h5") as err:
        _load(tiny_acdc)
    assert "integer" in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_intensities(tiny_acdc: TinyACDC, bad):
    image = np.zeros((3, *TINY_HW), np.float32)
    image[1, 2, 3] = bad
    _rewrite(tiny_acdc, "patient006_frame02", image=image)
    with pytest.raises(DataError, match="patient006_frame02.h5") as err:
        _load(tiny_acdc)
    assert "NaN or Inf" in str(err.value)


def test_non_finite_intensities_in_validation_volume(tiny_acdc: TinyACDC):
    image = np.zeros((3, *TINY_HW), np.float32)
    image[0, 0, 0] = np.nan
    _rewrite(tiny_acdc, "patient008_frame02", image=image)
    with pytest.raises(DataError, match="patient008_frame02.h5"):
        _load(tiny_acdc)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_empty_split(tiny_acdc: TinyACDC, split):
    tiny_acdc.write_splits(**{split: []})
    with pytest.raises(DataError, match="splits.json") as err:
        _load(tiny_acdc)
    assert repr(split) in str(err.value)


def test_missing_split_key(tiny_acdc: TinyACDC):
    splits = dict(tiny_acdc.splits)
    del splits["test"]
    (tiny_acdc.root / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match="'test'"):
        _load(tiny_acdc)


def test_missing_splits_json(tiny_acdc: TinyACDC):
    (tiny_acdc.root / "splits.json").unlink()
    with pytest.raises(DataError, match="splits.json") as err:
        _load(tiny_acdc)
    assert "missing" in str(err.value)


def test_invalid_splits_json(tiny_acdc: TinyACDC):
    (tiny_acdc.root / "splits.json").write_text("{train: [1, 2]")
    with pytest.raises(DataError, match="splits.json") as err:
        _load(tiny_acdc)
    assert "JSON" in str(err.value)


@pytest.mark.parametrize("count", [7, 0, -1])
def test_labeled_count_outside_training_set(tiny_acdc: TinyACDC, count):
    with pytest.raises(DataError, match="data.labeled_cases") as err:
        _load(tiny_acdc, **{"data.labeled_cases": count})
    assert str(count) in str(err.value) and "6 patients" in str(err.value)


@pytest.mark.parametrize("ids, named", [([1, 7], "7"), ([42], "42")])
def test_labeled_patient_not_in_train_split(tiny_acdc: TinyACDC, ids, named):
    with pytest.raises(DataError, match="data.labeled_cases") as err:
        _load(tiny_acdc, **{"data.labeled_cases": ids})
    assert named in str(err.value)


def test_labeled_empty_list(tiny_acdc: TinyACDC):
    with pytest.raises(DataError, match="data.labeled_cases"):
        _load(tiny_acdc, **{"data.labeled_cases": []})


def test_missing_volume_file_for_listed_patient(tiny_acdc: TinyACDC):
    for stem in tiny_acdc.files[7]:
        tiny_acdc.volume_path(stem).unlink()
    with pytest.raises(DataError, match="patient 007"):
        _load(tiny_acdc)


def test_missing_data_root(tmp_path):
    missing = tmp_path / "nowhere" / "acdc"
    with pytest.raises(DataError, match="data.root") as err:
        load_training_data(acdc_cfg(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match="data.root"):
        load_split(acdc_cfg(missing), "test")


def test_unknown_dataset_and_split(tiny_acdc: TinyACDC):
    with pytest.raises(ConfigError, match="data.dataset='brats' is not registered"):
        load_training_data(acdc_cfg(tiny_acdc.root, **{"data.dataset": "brats"}))
    with pytest.raises(DataError, match="'train'"):
        load_split(acdc_cfg(tiny_acdc.root), "train")


def test_labeled_order_outside_train_is_rejected(tiny_acdc: TinyACDC):
    tiny_acdc.write_splits(labeled_order=[7, 1, 2, 3, 4, 5])
    with pytest.raises(DataError, match="labeled_order"):
        _load(tiny_acdc, **{"data.labeled_cases": 1})


def test_overlapping_splits_are_rejected(tiny_acdc: TinyACDC):
    tiny_acdc.write_splits(test=[9, 10, 1])
    with pytest.raises(DataError, match="splits.json"):
        _load(tiny_acdc)


# ---------------------------------------------------------------------------------------------
# Real ACDC (skipped without the data)
# ---------------------------------------------------------------------------------------------


def _real_cfg(root: Path, cases):
    return tiny_config(**{"data.dataset": "acdc", "data.root": str(root), "data.labeled_cases": cases})


def _slices_per_patient(root: Path, patients: list[int]) -> dict[int, int]:
    """Independent count from the HDF5 headers (no pixel data read)."""
    counts = {}
    for p in patients:
        files = sorted((root / "volumes").glob(f"patient{p:03d}_frame[0-9][0-9].h5"))
        assert len(files) == 2, files
        counts[p] = 0
        for path in files:
            with h5py.File(path) as f:
                counts[p] += f["image"].shape[0]
    return counts


@pytest.mark.usefixtures("cached_acdc_reads")
@pytest.mark.parametrize("cases, slices", [(3, 68), (7, 136)])
def test_real_acdc_labeled_counts(acdc_root: Path, cases, slices):
    splits = json.loads((acdc_root / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (70, 10, 20)
    data = load_training_data(_real_cfg(acdc_root, cases))
    assert len(data.labeled) == slices
    per_patient = _slices_per_patient(acdc_root, splits["train"])
    labeled = splits["labeled_order"][:cases]
    assert {int(n[7:10]) for n in names_of(data.labeled)} == set(labeled)
    assert len(data.labeled) == sum(per_patient[p] for p in labeled)
    # every other training slice is unlabelled
    assert len(data.unlabeled) == sum(per_patient.values()) - slices
    assert {int(n[7:10]) for n in names_of(data.unlabeled)} == set(splits["train"]) - set(labeled)
    assert data.labeled.images.shape[1:] == (1, 32, 32)
    # validation: 10 patients x 2 phases, at native resolution
    assert len(data.val) == 20
    assert sorted({int(v.name[7:10]) for v in data.val}) == sorted(splits["val"])
    assert all(v.image.shape[-2:] == v.label.shape[-2:] and min(v.image.shape[-2:]) > 100 for v in data.val)


# ---------------------------------------------------------------------------------------------
# Phantom
# ---------------------------------------------------------------------------------------------


def test_phantom_shapes_and_labels():
    cfg = tiny_config(**{"data.phantom_labeled": 8, "data.phantom_unlabeled": 7, "data.phantom_val": 12})
    data = load_phantom(cfg)
    assert data.labeled.images.shape == (8, 1, 32, 32) and data.labeled.labels.shape == (8, 32, 32)
    assert len(data.labeled.names) == 8
    assert data.unlabeled.labels is None and len(data.unlabeled) >= 7
    assert data.labeled.images.dtype == torch.float32 and torch.isfinite(data.labeled.images).all()
    assert set(data.labeled.labels.unique().tolist()) == {0, 1, 2, 3}  # every structure is drawn
    assert len(data.val) == 2
    for v in data.val:
        assert v.image.ndim == 4 and v.image.shape[:2] == (SLICES_PER_CASE, 1)
        assert v.label.shape == (SLICES_PER_CASE, *v.image.shape[-2:]) and v.label.dtype == np.uint8
        assert v.label.max() <= 3 and v.image.min() >= 0 and v.image.max() <= 1.0 + 1e-6
    assert data.num_classes == 4 and data.class_names == ["RV", "Myo", "LV"]


def test_phantom_is_reproducible_and_splits_are_disjoint():
    cfg = tiny_config(**{"data.phantom_labeled": 6, "data.phantom_unlabeled": 6, "data.phantom_test": 6})
    a, b = load_phantom(cfg), load_phantom(cfg)
    assert torch.equal(a.labeled.images, b.labeled.images)
    assert np.array_equal(a.val[0].image, b.val[0].image)
    test = load_phantom_split(cfg, "test")
    val = load_phantom_split(cfg, "val")
    first = {
        "labeled": a.labeled.images[0, 0],
        "unlabeled": a.unlabeled.images[0, 0],
        "val": torch.nn.functional.interpolate(torch.from_numpy(val[0].image[:1]), size=(32, 32), mode="bilinear")[0, 0],
        "test": torch.nn.functional.interpolate(torch.from_numpy(test[0].image[:1]), size=(32, 32), mode="bilinear")[0, 0],
    }
    names = list(first)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert (first[x] - first[y]).abs().max() > 0.05, f"{x} and {y} phantoms coincide"
    assert not np.array_equal(val[0].label, test[0].label)
