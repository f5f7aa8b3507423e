"""``vqseg prepare``: format and mask-encoding detection, integrity checks, splits, and every bad input
ending in one line that names the file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from own_data_builders import rotated_affine, write_image_folder, write_nnunet
from PIL import Image

from vqseg.cli import main
from vqseg.data.prepare import SPLIT_FILE, make_split, open_prepared, prepare

OWN_YAML = Path(__file__).resolve().parents[1] / "configs" / "own.yaml"


def one_error_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def split_of(root: Path) -> dict:
    return json.loads((root / SPLIT_FILE).read_text())


# ---------------------------------------------------------------------------------------------
# Mask encodings: detected per dataset, never read as empty
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("foreground", "mask_ext", "encoding"),
    [(1, "png", "binary01"), (255, "png", "binary255"), (255, "jpg", "threshold"), (255, "bmp", "binary255")],
)
def test_binary_mask_encodings_are_detected_and_decoded(tmp_path, foreground, mask_ext, encoding):
    root = write_image_folder(tmp_path / "d", foreground=foreground, mask_ext=mask_ext, shape=(40, 36))
    lines = prepare(root, val="2", test="2")
    info = split_of(root)
    assert info["label_encoding"] == encoding and info["num_classes"] == 2 and info["class_names"] == ["foreground"]
    assert any(line.startswith("mask encoding:") for line in lines)
    prepared = open_prepared(root)
    for volume in prepared.volumes("val"):
        expected = np.asarray(Image.open(prepared.cases[volume.name].label).convert("L")) >= max(foreground, 1) / 2
        assert volume.label.max() == 1  # never read as empty
        assert (volume.label[0] == expected).mean() > 0.97


def test_label_map_masks_give_classes_from_their_values(tmp_path):
    root = tmp_path / "d"
    write_image_folder(root)
    mask = root / "masks" / sorted(p.name for p in (root / "masks").iterdir())[0]
    values = np.asarray(Image.open(mask))
    Image.fromarray(np.where(values > 0, 2, 0).astype(np.uint8)).save(mask)  # classes 0, 1 and 2 in the set
    prepare(root, val="2", test="2")
    info = split_of(root)
    assert info["label_encoding"] == "labels" and info["num_classes"] == 3
    assert info["class_names"] == ["class_1", "class_2"]


def test_ambiguous_masks_are_refused_naming_a_file(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d")
    noisy = root / "masks" / "case-c02_x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (14, 12), dtype=np.uint8)).save(noisy)
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, "vqseg prepare: error:", str(noisy), "neither class indices")
    assert not (root / SPLIT_FILE).exists()


def test_a_01_mask_among_0255_masks_is_refused_not_read_empty(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", foreground=255)
    odd = root / "masks" / "case-b01_x.png"
    Image.fromarray((np.asarray(Image.open(odd)) // 255).astype(np.uint8)).save(odd)
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, str(odd), "read as empty")


def test_coloured_mask_is_refused(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d")
    mask = root / "masks" / "case-a00_x.png"
    Image.fromarray(np.stack([np.asarray(Image.open(mask)) * 255] + [np.zeros((14, 12), np.uint8)] * 2, -1)).save(mask)
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, str(mask), "coloured")


def test_grey_rgb_masks_are_accepted(tmp_path):
    root = write_image_folder(tmp_path / "d", foreground=255)
    for mask in (root / "masks").iterdir():
        grey = np.asarray(Image.open(mask))
        Image.fromarray(np.stack([grey] * 3, -1)).save(mask)
    prepare(root, val="2", test="2")
    assert split_of(root)["label_encoding"] == "binary255"


# ---------------------------------------------------------------------------------------------
# Summary, formats, intensity rule
# ---------------------------------------------------------------------------------------------


def test_summary_of_an_nnunet_dataset(tmp_path, capsys):
    root = write_nnunet(tmp_path / "nn", channels=2)
    assert main(["prepare", str(root), "--val", "1", "--test", "1"]) == 0
    out = capsys.readouterr().out
    for fragment in (
        "nnU-Net v2 raw, .nii.gz",
        "cases: 7 (6 with labels, 1 without), slices: 28",
        "channels: 2",
        "outer",
        "inner",
        "1.4 x 1.5 x 6 mm (file axis order)",
        "sliced along array axis 2",
        "channels: 2 (MR0, MR1)",
        "label maps declared in dataset.json",
        "percentiles",
    ):
        assert fragment in out, fragment
    info = split_of(root)
    assert info["format"] == "nnunet" and info["in_channels"] == 2 and info["class_names"] == ["outer", "inner"]
    plan = info["plan"]
    assert info["intensity"] == "percentile"
    assert {k: plan[k] for k in ("slice_axis", "intensity")} == {"slice_axis": 2, "intensity": "percentile"}
    assert plan["3d"]["spacing"] == pytest.approx([6.0, 1.4, 1.5]) and plan["3d"]["patch_size"] == [4, 14, 12]
    assert plan["2d"]["spacing"] == pytest.approx([1.4, 1.5]) and plan["2d"]["patch_size"] == [14, 12]
    assert "plan 2d: patch 14 x 12, batch 2" in out
    assert "plan 3d: patch 4 x 14 x 12 (slice axis first), batch 2" in out and "6 x 1.4 x 1.5 mm (anisotropic)" in out
    assert info["fingerprint"]["median_spacing"] == pytest.approx([1.4, 1.5, 6.0])
    assert info["fingerprint"]["shapes"]["pat000"] == [14, 12, 4]
    assert "pat006" in info["unlabeled"]  # an image without a label, its own group: unlabelled training data
    volume = open_prepared(root).volumes("val")[0]
    assert volume.image.shape == (4, 2, 14, 12)  # slices along the largest spacing (the last axis)
    assert volume.spacing == pytest.approx((6.0, 1.4, 1.5))
    assert 0.0 <= volume.image.min() and volume.image.max() <= 1.0


def test_grayscale_8bit_images_are_divided_by_255(tmp_path):
    root = write_image_folder(tmp_path / "d", rgb=False)
    prepare(root, val="2", test="2")
    info = split_of(root)
    assert info["in_channels"] == 1 and info["intensity"] == "divide255"
    prepared = open_prepared(root)
    volume = prepared.volumes("val")[0]
    raw = np.asarray(Image.open(prepared.cases[volume.name].images[0]))
    np.testing.assert_allclose(volume.image[0, 0], raw / 255.0, rtol=1e-6)


def test_nnunet_2d_png_dataset(tmp_path):
    root = tmp_path / "nn2d"
    folder = write_image_folder(tmp_path / "src", foreground=1, rgb=False)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, image in enumerate(sorted((folder / "images").iterdir())):
        (root / "imagesTr" / f"c{i}_0000.png").write_bytes(image.read_bytes())
        (root / "labelsTr" / f"c{i}.png").write_bytes((folder / "masks" / image.name).read_bytes())
    spec = {"channel_names": {"0": "grey"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(spec))
    prepare(root, val="2", test="2")
    info = split_of(root)
    assert info["format"] == "nnunet" and info["class_names"] == ["lesion"] and info["in_channels"] == 1
    assert open_prepared(root).volumes("val")[0].image.shape[:2] == (1, 1)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def test_same_arguments_same_split_and_no_silent_overwrite(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d", count=12, unlabeled=2)
    args = ["prepare", str(root), "--labeled", "50%", "--val", "2", "--test", "25%", "--seed", "3"]
    assert main(args) == 0
    first = (root / SPLIT_FILE).read_text()
    assert main(args) == 0 and "already up to date" in capsys.readouterr().out
    assert (root / SPLIT_FILE).read_text() == first
    assert main([*args[:-1], "4"]) == 2
    one_error_line(capsys, str(root / SPLIT_FILE), "--force")
    assert (root / SPLIT_FILE).read_text() == first
    assert main([*args[:-1], "4", "--force"]) == 0
    assert (root / SPLIT_FILE).read_text() != first
    split = split_of(root)
    assert len(split["test"]) == 3 and len(split["val"]) == 2 and len(split["labeled"]) == 4
    names = [n for k in ("labeled", "unlabeled", "val", "test") for n in split[k]]
    assert sorted(names) == sorted(set(names)) and len(names) == 14
    assert {"case-m12_x", "case-n13_x"} <= set(split["unlabeled"])  # unlabeled/ images


def test_group_keeps_related_cases_together(tmp_path):
    from vqseg.data.imagefolder import list_cases

    cases = list_cases(write_image_folder(tmp_path / "d", count=16))
    key = {name: name[-3] for name in cases}  # r"(\d)_x$": case-a00_x and case-k10_x share key "0"
    splits = []
    for seed in range(5):
        split = make_split(cases, labeled="2", val="25%", test="25%", seed=seed, group=r"(\d)_x$")
        where = {n: k for k, names in split.items() for n in names}
        for name in cases:
            assert where[name] == where[[m for m in cases if key[m] == key[name]][-1]], name
        splits.append(split)
    assert any(s != splits[0] for s in splits[1:])  # the seed matters; the groups hold for every seed


def _two_phase_patients(root: Path, patients: int = 10) -> Path:
    """Image folder of patients with a labelled end-diastole frame and an unlabelled end-systole one."""
    write_image_folder(root / "src", count=patients, unlabeled=patients)
    (root / "d" / "images").mkdir(parents=True)
    (root / "d" / "masks").mkdir()
    (root / "d" / "unlabeled").mkdir()
    images = sorted((root / "src" / "images").iterdir())
    extra = sorted((root / "src" / "unlabeled").iterdir())
    for i, (image, other) in enumerate(zip(images, extra)):
        (root / "d" / "images" / f"patient{i:02d}_ED.png").write_bytes(image.read_bytes())
        (root / "d" / "masks" / f"patient{i:02d}_ED.png").write_bytes((root / "src" / "masks" / image.name).read_bytes())
        (root / "d" / "unlabeled" / f"patient{i:02d}_ES.png").write_bytes(other.read_bytes())
    return root / "d"


def test_unlabelled_frames_of_validation_and_test_patients_never_train(tmp_path, capsys):
    root = _two_phase_patients(tmp_path)
    assert main(["prepare", str(root), "--labeled", "2", "--val", "2", "--test", "2", "--group", r"patient(\d+)_"]) == 0
    out = capsys.readouterr().out
    split = split_of(root)
    held_out = {n.split("_")[0] for k in ("val", "test") for n in split[k]}
    assert len(held_out) == 4
    for name in split["unlabeled"] + split["labeled"]:
        assert name.split("_")[0] not in held_out, name  # no frame of a val/test patient trains
    assert sorted(split["left_out"]) == sorted(f"{p}_ES" for p in held_out)
    assert len(split["unlabeled"]) == 6 + 4  # ES of the 6 training patients + ED of the 4 unlabelled ones
    assert "4 case(s) without a label left out" in out
    prepared = open_prepared(root)  # a consistent file: left-out cases are in no split
    assert not set(split["left_out"]) & {n for names in prepared.splits.values() for n in names}


def test_without_group_label_less_cases_are_unlabelled_training_data(tmp_path):
    root = _two_phase_patients(tmp_path, patients=6)
    prepare(root, labeled="2", val="1", test="1")
    split = split_of(root)
    assert {f"patient{i:02d}_ES" for i in range(6)} <= set(split["unlabeled"]) and split["left_out"] == []


def test_group_regex_that_misses_a_case_is_an_error(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d")
    assert main(["prepare", str(root), "--group", r"patient(\d+)"]) == 2
    one_error_line(capsys, "--group", "case-a00_x")


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing written
# ---------------------------------------------------------------------------------------------


def _break(root: Path, how: str) -> str:
    """Damage an image-folder dataset; returns the fragment the error must contain."""
    image, mask = root / "images" / "case-b01_x.png", root / "masks" / "case-b01_x.png"
    if how == "image without mask":
        mask.unlink()
        return str(image)
    if how == "mask without image":
        image.unlink()
        return str(mask)
    if how == "mask of another size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
        return str(mask)
    if how == "zero-byte image":
        image.write_bytes(b"")
        return str(image)
    if how == "unreadable mask":
        mask.write_bytes(b"not a png at all")
        return str(mask)
    if how == "two files one name":
        (root / "images" / "case-b01_x.jpg").write_bytes(image.read_bytes())
        return "case-b01_x"
    if how == "grey image among RGB":
        Image.fromarray(np.zeros((14, 12), np.uint8)).save(image)
        return str(image)
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["image without mask", "mask without image", "mask of another size", "zero-byte image", "unreadable mask",
     "two files one name", "grey image among RGB"],
)
def test_bad_image_folder_inputs(tmp_path, capsys, how):
    root = write_image_folder(tmp_path / "d")
    fragment = _break(root, how)
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, "vqseg prepare: error:", fragment)
    assert not (root / SPLIT_FILE).exists()


def test_empty_and_missing_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["prepare", str(tmp_path / "empty")]) == 2
    one_error_line(capsys, str(tmp_path / "empty"), "neither")
    (tmp_path / "e2" / "images").mkdir(parents=True)
    (tmp_path / "e2" / "masks").mkdir()
    assert main(["prepare", str(tmp_path / "e2")]) == 2
    one_error_line(capsys, str(tmp_path / "e2" / "images"), "no images")
    assert main(["prepare", str(tmp_path / "nowhere")]) == 2
    one_error_line(capsys, str(tmp_path / "nowhere"), "does not exist")


def test_bad_nnunet_inputs(tmp_path, capsys):
    root = write_nnunet(tmp_path / "nn")
    label = root / "labelsTr" / "pat001.nii.gz"
    nib.save(nib.Nifti1Image(np.full((14, 12, 4), 3, np.uint8), rotated_affine()), label)
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, str(label), "outside the declared labels")

    nib.save(nib.Nifti1Image(np.zeros((14, 12, 4), np.uint8), rotated_affine((1.4, 1.5, 5.0))), label)
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, str(label), "geometry")

    nib.save(nib.Nifti1Image(np.zeros((14, 12, 4), np.uint8), rotated_affine()), label)
    image = root / "imagesTr" / "pat002_0000.nii.gz"
    nan = np.zeros((14, 12, 4), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, rotated_affine()), image)
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, str(image), "NaN")

    image.unlink()
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, str(root / "labelsTr" / "pat002.nii.gz"), "label without an image")

    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "x": 2}
    (root / "dataset.json").write_text(json.dumps(spec))
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, str(root / "dataset.json"), "labels")
    assert not (root / SPLIT_FILE).exists()


def test_missing_channel_file_is_named(tmp_path, capsys):
    root = write_nnunet(tmp_path / "nn", channels=2)
    (root / "imagesTr" / "pat001_0000.nii.gz").unlink()
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, "pat001_0000.nii.gz", "channel file missing")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--labeled", "9"], "--labeled"),
        (["--labeled", "lots"], "--labeled"),
        (["--val", "0"], "--val"),
        (["--val", "50%", "--test", "50%"], "no labelled case for training"),
    ],
)
def test_bad_split_arguments(tmp_path, capsys, args, fragment):
    root = write_image_folder(tmp_path / "d", count=8)
    assert main(["prepare", str(root), *args]) == 2
    one_error_line(capsys, fragment)


@pytest.mark.parametrize("damage", ["missing case", "overlap", "unlabelled case in val", "no split file"])
def test_split_file_is_checked_when_training(tmp_path, capsys, damage):
    root = write_image_folder(tmp_path / "d")
    prepare(root, val="2", test="2")
    split = split_of(root)
    unlabelled = root / "unlabeled" / "extra.png"
    if damage == "missing case":
        split["val"].append("ghost")
    elif damage == "overlap":
        split["test"].append(split["labeled"][0])
    elif damage == "unlabelled case in val":
        unlabelled.parent.mkdir()
        unlabelled.write_bytes(next((root / "images").iterdir()).read_bytes())
        split["val"].append("extra")
    (root / SPLIT_FILE).write_text(json.dumps(split))
    if damage == "no split file":
        (root / SPLIT_FILE).unlink()
    expected = {"missing case": "names case 'ghost'", "overlap": "in both", "unlabelled case in val": "has no label",
                "no split file": f"vqseg prepare {root}"}[damage]
    args = ["train", str(OWN_YAML), "--set", f"data.root={root}", "--set", f"output_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    one_error_line(capsys, "vqseg train: error:", expected)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The plan: one slicing axis for every file of a dataset
# ---------------------------------------------------------------------------------------------


def _volume_dataset(root: Path, zooms_per_case: list[tuple[float, ...]], shape=(8, 8, 8)) -> Path:
    """nnU-Net cases whose label marks one voxel column per axis, so a transposed read shows."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i, zooms in enumerate(zooms_per_case):
        label = np.zeros(shape, np.uint8)
        label[1:4, 2, 5] = 1  # along axis 0 only
        label[6, 0:6, 1] = 1  # along axis 1 only
        image = (rng.normal(100, 5, shape) + 200 * label).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.diag([*zooms, 1.0])), root / "imagesTr" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, np.diag([*zooms, 1.0])), root / "labelsTr" / f"c{i}.nii.gz")
    spec = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_every_volume_of_a_dataset_is_sliced_along_the_plans_axis(tmp_path, capsys):
    zooms = [(0.9, 0.9, 0.8), (0.7, 0.7, 1.0), (0.7, 0.7, 1.0), (0.72, 0.7, 1.0), (0.7, 0.7, 1.0), (0.7, 0.7, 1.02)]
    root = _volume_dataset(tmp_path / "mixed", zooms)
    assert main(["prepare", str(root), "--val", "1", "--test", "1"]) == 0
    out = capsys.readouterr().out
    assert split_of(root)["plan"]["slice_axis"] == 2
    assert "note: 1 case(s) have their largest spacing on another axis: c0 (0.9 x 0.9 x 0.8)" in out
    prepared = open_prepared(root)
    for split in ("labeled", "val", "test"):
        for volume in prepared.volumes(split):
            stored = np.asarray(nib.load(prepared.cases[volume.name].label).dataobj)
            assert volume.geometry.slice_axis == 2, volume.name  # c0 too: per file it would be axis 1
            np.testing.assert_array_equal(volume.label, np.moveaxis(stored, 2, 0))


def test_a_label_is_read_along_its_images_axis_whatever_its_own_header(tmp_path):
    root = _volume_dataset(tmp_path / "cube", [(1.0, 1.0, 1.0)] * 4)
    label = root / "labelsTr" / "c0.nii.gz"
    stored = np.asarray(nib.load(label).dataobj)
    nib.save(nib.Nifti1Image(stored, np.diag([1.0, 1.0004, 1.0, 1.0])), label)  # 4th-decimal header noise
    prepare(root, labeled="100%", val="1", test="1")
    prepared = open_prepared(root)
    volume = next(v for s in ("labeled", "val", "test") for v in prepared.volumes(s) if v.name == "c0")
    np.testing.assert_array_equal(volume.label, np.moveaxis(stored, 2, 0))  # not transposed against the image


def test_slice_axis_ignores_header_float_noise():
    from vqseg.data.casefiles import slice_axis

    assert slice_axis((1.0, 1.0, 1.0)) == 2
    assert slice_axis((1.0, 1.00001, 1.0)) == 2  # equal within the tolerance: the last axis
    assert slice_axis((5.0, 1.0, 1.0)) == 0 and slice_axis((1.0, 5.0, 1.0)) == 1
    assert slice_axis((0.9, 0.9, 0.8)) == 1


# ---------------------------------------------------------------------------------------------
# Grey-level label maps (0/128/255) are not binary masks
# ---------------------------------------------------------------------------------------------


def _grey_level_masks(root: Path, ext: str = "png") -> Path:
    """Three classes stored as 0/128/255, the middle class small (as optic cup in disc)."""
    write_image_folder(root, count=8, shape=(40, 36))
    for mask in sorted((root / "masks").iterdir()):
        values = np.asarray(Image.open(mask))
        grey = np.where(values > 0, 255, 0).astype(np.uint8)
        grey[18:21, 16:19] = 128
        mask.unlink()
        Image.fromarray(grey).save(mask.with_suffix(f".{ext}"))
    return root


def test_a_three_level_png_label_map_is_refused_naming_its_values(tmp_path, capsys):
    root = _grey_level_masks(tmp_path / "d")
    assert main(["prepare", str(root)]) == 2
    one_error_line(capsys, "grey levels [0, 128, 255]", "--mask-values 0,128,255")
    assert not (root / SPLIT_FILE).exists()


def test_mask_values_read_grey_levels_as_classes_and_predictions_keep_them(tmp_path):
    from vqseg.data.casefiles import stored_values

    root = _grey_level_masks(tmp_path / "d")
    prepare(root, val="2", test="2", mask_values=[0, 255, 128])
    info = split_of(root)
    assert info["label_encoding"] == "values" and info["num_classes"] == 3 and info["mask_values"] == [0, 255, 128]
    prepared = open_prepared(root)
    volume = prepared.volumes("val")[0]
    stored = np.asarray(Image.open(prepared.cases[volume.name].label))
    np.testing.assert_array_equal(volume.label[0], np.select([stored == 255, stored == 128], [1, 2], 0))
    np.testing.assert_array_equal(stored_values("values", 3, [0, 255, 128])[volume.label[0]], stored)


def test_jpeg_masks_with_compression_noise_are_still_thresholded(tmp_path):
    root = write_image_folder(tmp_path / "d", foreground=255, mask_ext="jpg", shape=(40, 36))
    prepare(root, val="2", test="2")
    assert split_of(root)["label_encoding"] == "threshold"
