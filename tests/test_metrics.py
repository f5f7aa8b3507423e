"""Metrics must equal medpy (the SSL4MIS oracle) and expose the paper/honest split."""

from __future__ import annotations

import math

import h5py
import nibabel as nib
import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy.ndimage import gaussian_filter

from vqseg.metrics import (
    ClassScore,
    EmptyMaskError,
    aggregate,
    asd,
    compare_volumes,
    dice,
    format_compare,
    format_markdown,
    hd95,
    jaccard,
    load_label_volume,
    score_volume,
)

TOL = 1e-6


def blobs(rng: np.random.Generator, shape: tuple[int, ...], fill: float, sigma: float = 2.0) -> np.ndarray:
    """Smooth random blobs covering roughly ``fill`` of the volume."""
    field = gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1.0 - fill)


def small_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A blob confined to a random sub-box, so cropping to the bounding box matters."""
    mask = np.zeros(shape, bool)
    lo = [int(rng.integers(0, s // 2)) for s in shape]
    sub = tuple(slice(start, start + max(2, s // 3)) for start, s in zip(lo, shape))
    mask[sub] = blobs(rng, mask[sub].shape, 0.5, sigma=1.0)
    return mask


def assert_all_match(p: np.ndarray, g: np.ndarray, spacing=None, connectivity: int = 1) -> None:
    assert abs(dice(p, g) - mb.dc(p, g)) < TOL
    assert abs(jaccard(p, g) - mb.jc(p, g)) < TOL
    assert abs(hd95(p, g, spacing, connectivity) - mb.hd95(p, g, spacing, connectivity)) < TOL
    assert abs(asd(p, g, spacing, connectivity) - mb.asd(p, g, spacing, connectivity)) < TOL


CASES_2D = [(seed, sp, conn) for seed in range(10) for sp in (None, (0.7, 1.9)) for conn in (1, 2)]
CASES_3D = [(seed, sp, conn) for seed in range(6) for sp in (None, (10.0, 1.5, 1.5)) for conn in (1, 3)]


@pytest.mark.parametrize("seed,spacing,connectivity", CASES_2D)
def test_random_2d_masks_match_medpy(seed, spacing, connectivity):
    rng = np.random.default_rng(seed)
    shape = (48, 40)
    for pred, gt in [
        (blobs(rng, shape, 0.3), blobs(rng, shape, 0.3)),  # large, touch the border
        (small_blob(rng, shape), small_blob(rng, shape)),  # small, cropping active
        (small_blob(rng, shape), blobs(rng, shape, 0.1)),
    ]:
        assert_all_match(pred, gt, spacing, connectivity)


@pytest.mark.parametrize("seed,spacing,connectivity", CASES_3D)
def test_random_3d_masks_match_medpy(seed, spacing, connectivity):
    rng = np.random.default_rng(100 + seed)
    shape = (8, 36, 30)
    for pred, gt in [
        (blobs(rng, shape, 0.25), blobs(rng, shape, 0.25)),
        (small_blob(rng, shape), small_blob(rng, shape)),
    ]:
        assert_all_match(pred, gt, spacing, connectivity)


@pytest.mark.parametrize("spacing", [None, (3.0, 0.5, 1.25)])
def test_masks_touching_volume_border_match_medpy(spacing):
    # medpy erodes with outside-the-volume = background, so voxels on the volume
    # border are surface; a crop that treated its edge differently would differ.
    shape = (6, 20, 18)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    pred[:, :9, :7] = True  # corner block touching five faces
    gt[1:, 3:, 10:] = True  # opposite corner
    gt[0, 0, 0] = True
    assert_all_match(pred, gt, spacing)
    full = np.ones(shape, bool)
    assert_all_match(full, gt, spacing)
    assert_all_match(pred, full, spacing, connectivity=3)


def test_single_voxel_masks_match_medpy():
    shape = (7, 15, 13)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[0, 0, 0] = True
    b[6, 14, 12] = True
    for spacing in (None, (2.0, 1.0, 0.5)):
        assert_all_match(a, b, spacing)
        assert_all_match(a, a, spacing)
        assert_all_match(a, blobs(np.random.default_rng(7), shape, 0.2), spacing)
    assert hd95(a, b) == pytest.approx(math.sqrt(6**2 + 14**2 + 12**2))


def test_hd95_pools_both_directions_like_medpy():
    # Asymmetric case: a far outlier in pred only. Pooled percentile differs from
    # max/mean of per-direction percentiles, so this pins medpy's definition.
    gt = np.zeros((40, 40), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[38, 38] = True
    assert hd95(pred, gt) == pytest.approx(mb.hd95(pred, gt), abs=TOL)
    assert asd(pred, gt) == pytest.approx(mb.asd(pred, gt), abs=TOL)
    assert asd(gt, pred) == pytest.approx(mb.asd(gt, pred), abs=TOL)
    assert asd(pred, gt) != pytest.approx(asd(gt, pred))


def test_non_bool_inputs_are_binarized_like_medpy():
    rng = np.random.default_rng(3)
    p = blobs(rng, (30, 30), 0.3).astype(np.int32) * 7
    g = blobs(rng, (30, 30), 0.3).astype(np.float32) * 0.5
    assert_all_match(p, g)


def test_empty_masks_overlap_values_match_medpy():
    empty = np.zeros((10, 12), bool)
    full = np.zeros((10, 12), bool)
    full[2:5, 3:9] = True
    # medpy 0.5's dc means 1.0 here, but its numpy-scalar division returns NaN
    # instead of reaching the ZeroDivisionError branch; we return the intended 1.0.
    with np.errstate(invalid="ignore"):
        medpy_dc = mb.dc(empty, empty)
    assert medpy_dc == 1.0 or math.isnan(medpy_dc)
    assert dice(empty, empty) == 1.0
    assert jaccard(empty, empty) == mb.jc(empty, empty) == 1.0
    assert dice(empty, full) == mb.dc(empty, full) == 0.0
    assert dice(full, empty) == mb.dc(full, empty) == 0.0
    assert jaccard(full, empty) == mb.jc(full, empty) == 0.0


@pytest.mark.parametrize("fn,medpy_fn", [(hd95, mb.hd95), (asd, mb.asd)])
def test_distances_raise_empty_mask_error_where_medpy_raises(fn, medpy_fn):
    empty = np.zeros((9, 9), bool)
    full = np.zeros((9, 9), bool)
    full[3:6, 3:6] = True
    cases = [(empty, full, "prediction"), (full, empty, "ground-truth"), (empty, empty, "prediction")]
    for p, g, which in cases:
        with pytest.raises(RuntimeError):
            medpy_fn(p, g)
        with pytest.raises(EmptyMaskError, match=which):
            fn(p, g)
    assert issubclass(EmptyMaskError, ValueError)


def test_shape_and_spacing_validation():
    a = np.ones((4, 5), bool)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        dice(a, np.ones((5, 4), bool))
    with pytest.raises(ValueError, match="one per axis"):
        hd95(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        asd(a, a, spacing=(1.0, 0.0))


def label_pair() -> tuple[np.ndarray, np.ndarray]:
    """Class 1 found, class 2 missed by the prediction, class 3 spurious in the prediction."""
    rng = np.random.default_rng(11)
    shape = (6, 32, 28)
    gt = np.zeros(shape, np.int64)
    pred = np.zeros(shape, np.int64)
    gt[blobs(rng, shape, 0.2)] = 1
    pred[blobs(rng, shape, 0.2)] = 1
    gt[2:4, 2:6, 2:6] = 2
    pred[1:3, 20:25, 20:25] = 3
    return pred, gt


def test_score_volume_paper_vs_honest():
    pred, gt = label_pair()
    s1, s2, s3 = score_volume(pred, gt, num_classes=4, spacing=(10.0, 1.5, 1.5))

    p1, g1 = pred == 1, gt == 1
    assert s1.dice == pytest.approx(mb.dc(p1, g1), abs=TOL)
    assert s1.jaccard == pytest.approx(mb.jc(p1, g1), abs=TOL)
    assert s1.hd95 == pytest.approx(mb.hd95(p1, g1, (10.0, 1.5, 1.5)), abs=TOL)
    assert s1.asd == pytest.approx(mb.asd(p1, g1, (10.0, 1.5, 1.5)), abs=TOL)
    assert (s1.hd95_found, s1.asd_found) == (s1.hd95, s1.asd)
    assert not s1.missed and not s1.spurious

    assert (s2.dice, s2.jaccard, s2.hd95, s2.asd) == (0.0, 0.0, 0.0, 0.0)
    assert s2.missed and not s2.spurious
    assert s2.hd95_found is None and s2.asd_found is None

    assert (s3.dice, s3.jaccard, s3.hd95, s3.asd) == (0.0, 0.0, 0.0, 0.0)
    assert s3.spurious and not s3.missed
    assert s3.hd95_found is None and s3.asd_found is None


def test_score_volume_both_empty_and_validation():
    gt = np.zeros((4, 6, 6), np.int64)
    gt[1:3, 1:4, 1:4] = 1
    (s1, s2) = score_volume(gt, gt, num_classes=3)
    assert (s1.dice, s1.hd95, s1.hd95_found) == (1.0, 0.0, 0.0)
    assert (s2.dice, s2.jaccard, s2.hd95, s2.asd) == (1.0, 1.0, 0.0, 0.0)
    assert not s2.missed and not s2.spurious and s2.hd95_found is None
    with pytest.raises(ValueError, match=r"\(4, 6, 6\).*\(4, 6, 5\)"):
        score_volume(gt, gt[..., :5], num_classes=3)
    with pytest.raises(ValueError, match="num_classes=2"):
        score_volume(gt * 2, gt, num_classes=2)


def cs(dice_, hd, found: bool, missed=False, spurious=False) -> ClassScore:
    return ClassScore(
        dice=dice_,
        jaccard=dice_ / 2,
        hd95=hd,
        asd=hd / 4,
        missed=missed,
        spurious=spurious,
        hd95_found=hd if found else None,
        asd_found=hd / 4 if found else None,
    )


def test_aggregate_arithmetic():
    vols = [
        [cs(0.8, 4.0, True), cs(0.0, 0.0, False, missed=True)],
        [cs(0.6, 8.0, True), cs(0.5, 2.0, True)],
        [cs(0.4, 0.0, False, spurious=True), cs(0.0, 0.0, False, missed=True)],
    ]
    out = aggregate(vols, ["LV", "RV"])
    assert out["num_volumes"] == 3
    lv_p, rv_p = out["paper"]["per_class"]["LV"], out["paper"]["per_class"]["RV"]
    assert lv_p["dice"] == pytest.approx(0.6)
    assert lv_p["jaccard"] == pytest.approx(0.3)
    assert lv_p["hd95"] == pytest.approx(4.0)
    assert lv_p["asd"] == pytest.approx(1.0)
    assert lv_p["dice_std"] == pytest.approx(np.std([0.8, 0.6, 0.4]))
    assert rv_p["dice"] == pytest.approx(0.5 / 3)
    assert rv_p["hd95"] == pytest.approx(2.0 / 3)
    assert out["paper"]["mean"]["dice"] == pytest.approx((0.6 + 0.5 / 3) / 2)
    assert out["paper"]["mean"]["hd95"] == pytest.approx((4.0 + 2.0 / 3) / 2)
    assert out["paper"]["mean"]["dice_std"] == pytest.approx(np.std([0.4, 0.55, 0.2]))

    lv_h, rv_h = out["honest"]["per_class"]["LV"], out["honest"]["per_class"]["RV"]
    assert lv_h["hd95"] == pytest.approx(6.0)
    assert lv_h["asd"] == pytest.approx(1.5)
    assert (lv_h["missed"], lv_h["spurious"]) == (0, 1)
    assert rv_h["hd95"] == pytest.approx(2.0)
    assert (rv_h["missed"], rv_h["spurious"]) == (2, 0)
    assert out["honest"]["mean"]["hd95"] == pytest.approx(4.0)
    assert (out["honest"]["mean"]["missed"], out["honest"]["mean"]["spurious"]) == (2, 1)

    never = aggregate([[cs(0.0, 0.0, False, missed=True)]], ["Myo"])
    assert never["honest"]["per_class"]["Myo"]["hd95"] is None
    assert never["honest"]["mean"]["asd"] is None
    with pytest.raises(ValueError, match="2 class names"):
        aggregate([[cs(0.5, 1.0, True)]], ["LV", "RV"])


def test_format_markdown_table():
    vols = [[cs(0.8, 4.0, True), cs(0.0, 0.0, False, missed=True)]]
    text = format_markdown(aggregate(vols, ["LV", "RV"]))
    lines = text.splitlines()
    assert lines[0].startswith("| Class | Dice | Jaccard | HD95 | ASD |")
    assert "#missed" in lines[0]
    lv = next(line for line in lines if line.startswith("| LV "))
    rv = next(line for line in lines if line.startswith("| RV "))
    assert lv.split("|")[2].strip() == "0.8000"
    assert rv.split("|")[6].strip() == "n/a"  # honest HD95: never found
    assert rv.split("|")[8].strip() == "1"  # missed once
    assert any(line.startswith("| **mean** ") for line in lines)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def write_nifti(path, data, zooms=(1.25, 1.25, 10.0), dtype=np.int16):
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), np.eye(4))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v


def test_load_nifti_and_h5(tmp_path):
    _, gt = label_pair()
    for name in ("gt.nii.gz", "gt.nii"):
        write_nifti(tmp_path / name, gt)
        data, spacing = load_label_volume(tmp_path / name)
        np.testing.assert_array_equal(data, gt)
        assert spacing == (1.25, 1.25, 10.0)
    write_nifti(tmp_path / "float.nii.gz", gt, dtype=np.float32)  # integral floats are fine
    data, _ = load_label_volume(tmp_path / "float.nii.gz")
    assert data.dtype.kind == "i"
    np.testing.assert_array_equal(data, gt)
    write_h5(tmp_path / "case.h5", image=np.zeros(gt.shape, np.float32), label=gt.astype(np.uint8))
    data, spacing = load_label_volume(tmp_path / "case.h5")
    np.testing.assert_array_equal(data, gt)
    assert spacing is None


def test_load_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    bad = {}
    bad["missing"] = tmp_path / "nope.nii.gz"
    for name in ("corrupt.nii.gz", "corrupt.nii", "corrupt.h5"):
        (tmp_path / name).write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
        bad[name] = tmp_path / name
    write_h5(tmp_path / "nolabel.h5", image=np.zeros((3, 3)))
    bad["nolabel"] = tmp_path / "nolabel.h5"
    write_nifti(tmp_path / "frac.nii.gz", np.full((3, 3, 3), 1.5), dtype=np.float32)
    bad["frac"] = tmp_path / "frac.nii.gz"
    write_h5(tmp_path / "neg.h5", label=-np.ones((3, 3), np.int8))
    bad["neg"] = tmp_path / "neg.h5"
    (tmp_path / "labels.npy").write_bytes(b"x")
    bad["ext"] = tmp_path / "labels.npy"

    expected = {
        "missing": "not found",
        "corrupt.nii.gz": "cannot be read as NIfTI",
        "corrupt.nii": "cannot be read as NIfTI",
        "corrupt.h5": "cannot read",
        "nolabel": "'label'",
        "frac": "non-integer",
        "neg": "non-negative",
        "ext": "extension",
    }
    for key, path in bad.items():
        with pytest.raises(ValueError) as info:
            load_label_volume(path)
        assert str(path) in str(info.value), key
        assert expected[key] in str(info.value), key


def test_compare_volumes(tmp_path):
    pred, gt = label_pair()
    write_nifti(tmp_path / "pred.nii.gz", pred)
    write_h5(tmp_path / "gt.h5", label=gt)
    out = compare_volumes(tmp_path / "pred.nii.gz", tmp_path / "gt.h5", spacing=(10.0, 1.5, 1.5))
    assert sorted(out["classes"]) == ["1", "2", "3"]  # num_classes inferred as 4
    c1 = out["classes"]["1"]
    assert c1["hd95"] == pytest.approx(mb.hd95(pred == 1, gt == 1, (10.0, 1.5, 1.5)), abs=TOL)
    assert c1["dice"] == pytest.approx(mb.dc(pred == 1, gt == 1), abs=TOL)
    assert out["classes"]["2"]["hd95"] is None and out["classes"]["3"]["asd"] is None
    assert out["mean"]["hd95"] == pytest.approx(c1["hd95"])
    assert out["mean"]["dice"] == pytest.approx(c1["dice"] / 3)
    assert out["units"] == "mm" and out["spacing"] == [10.0, 1.5, 1.5]
    with pytest.raises(ValueError, match="pred.nii.gz: not a label map for --num-classes 3"):  # label 3 present
        compare_volumes(tmp_path / "pred.nii.gz", tmp_path / "gt.h5", num_classes=3)

    text = format_compare(out)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "Dice", "Jaccard", "HD95", "ASD"]
    assert lines[2].split() == ["2", "0.0000", "0.0000", "n/a", "n/a"]
    assert lines[4].split()[0] == "mean"
    assert lines[5] == "distances in mm, spacing 10 x 1.5 x 1.5"


def test_compare_volumes_shape_mismatch_names_both_files(tmp_path):
    write_nifti(tmp_path / "pred.nii.gz", np.zeros((4, 5, 6)))
    write_nifti(tmp_path / "gt.nii.gz", np.zeros((4, 5, 7)))
    with pytest.raises(ValueError) as info:
        compare_volumes(tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz")
    msg = str(info.value)
    for part in (str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"), "(4, 5, 6)", "(4, 5, 7)"):
        assert part in msg


def test_aggregate_counts_every_missed_and_spurious_structure() -> None:
    """Honest counts add up over volumes per class and over classes in the mean."""
    vols = [
        [cs(0.0, 0.0, False, missed=True), cs(0.0, 0.0, False, missed=True), cs(0.0, 0.0, False, spurious=True)],
        [cs(0.0, 0.0, False, missed=True), cs(0.7, 3.0, True), cs(0.0, 0.0, False, spurious=True)],
        [cs(0.9, 1.0, True), cs(0.0, 0.0, False, missed=True), cs(0.0, 0.0, False, spurious=True)],
    ]
    out = aggregate(vols, ["RV", "Myo", "LV"])
    honest = out["honest"]["per_class"]
    assert [(honest[c]["missed"], honest[c]["spurious"]) for c in ("RV", "Myo", "LV")] == [(2, 0), (2, 0), (0, 3)]
    assert (out["honest"]["mean"]["missed"], out["honest"]["mean"]["spurious"]) == (4, 3)
    assert out["paper"]["per_class"]["LV"]["hd95"] == 0.0 and honest["LV"]["hd95"] is None
    assert out["honest"]["mean"]["hd95"] == pytest.approx((1.0 + 3.0) / 2)  # classes never found are left out


def test_compare_volumes_takes_spacing_from_whichever_header_has_one(tmp_path) -> None:
    """A NIfTI prediction against an HDF5 ground truth (no spacing): distances in mm from the NIfTI
    zooms; two HDF5 files: voxels. Classes in neither file are listed as absent, not scored."""
    pred, gt = label_pair()  # shape (6, 32, 28)
    zooms = (10.0, 1.5, 0.75)
    write_nifti(tmp_path / "pred.nii.gz", pred, zooms=zooms)
    write_h5(tmp_path / "pred.h5", label=pred)
    write_h5(tmp_path / "gt.h5", label=gt)
    write_nifti(tmp_path / "gt.nii.gz", gt, zooms=zooms)
    p1, g1 = pred == 1, gt == 1
    for pred_path, gt_path in (("pred.nii.gz", "gt.h5"), ("pred.h5", "gt.nii.gz")):
        out = compare_volumes(tmp_path / pred_path, tmp_path / gt_path, num_classes=6)
        assert (out["units"], out["spacing"]) == ("mm", list(zooms))
        assert out["classes"]["1"]["hd95"] == pytest.approx(mb.hd95(p1, g1, zooms), abs=TOL)
        assert out["classes"]["1"]["asd"] == pytest.approx(mb.asd(p1, g1, zooms), abs=TOL)
        assert out["absent"] == [4, 5]
        assert format_compare(out).splitlines()[-1] == "not scored (in neither file): classes 4, 5"
    out = compare_volumes(tmp_path / "pred.h5", tmp_path / "gt.h5")
    assert (out["units"], out["spacing"], out["absent"]) == ("voxels", None, [])
    assert out["classes"]["1"]["hd95"] == pytest.approx(mb.hd95(p1, g1), abs=TOL)
    assert format_compare(out).splitlines()[-1] == "distances in voxels"


def test_label_maps_with_many_values_are_taken_for_images_only_above_the_limit(tmp_path) -> None:
    """Without --num-classes at most 32 distinct values (0..31) are a label map; 33 look like an image."""
    ramp = np.arange(33).reshape(1, 3, 11)
    write_h5(tmp_path / "labels.h5", label=np.minimum(ramp, 31))
    write_h5(tmp_path / "image.h5", label=ramp)
    out = compare_volumes(tmp_path / "labels.h5", tmp_path / "labels.h5")
    assert len(out["classes"]) == 31 and out["mean"]["dice"] == 1.0
    with pytest.raises(ValueError, match="33 distinct values .* intensity image"):
        compare_volumes(tmp_path / "image.h5", tmp_path / "labels.h5")
    assert len(compare_volumes(tmp_path / "image.h5", tmp_path / "image.h5", num_classes=33)["classes"]) == 32
