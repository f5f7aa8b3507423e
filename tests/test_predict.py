"""``vqseg predict``: outputs in the input's exact geometry, the same labels as ``evaluate``, a
self-describing run folder, and per-case failures that write nothing and stop nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import _Threads
from own_data_builders import own_config, rotated_affine, write_image_folder, write_nnunet
from PIL import Image

from vqseg.cli import main
from vqseg.data.prepare import prepare
from vqseg.engine.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nn_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-iteration run on a 3D nnU-Net dataset whose files carry qform and sform (rotated affine)."""
    base = tmp_path_factory.mktemp("nn")
    root = write_nnunet(base / "data", count=5)
    for path in (root / "imagesTr").iterdir():
        img = nib.load(path)
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=2)
        nib.save(img, path)
    prepare(root, val="1", test="1")
    with _Threads():
        run = train(own_config(root, base / "run", **{"method.name": "supervised"}))
    return root, run


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-iteration run on an RGB image folder with 0/255 masks."""
    base = tmp_path_factory.mktemp("folder")
    root = write_image_folder(base / "data", count=8, foreground=255, shape=(20, 18))
    prepare(root, val="2", test="2")
    with _Threads():
        run = train(own_config(root, base / "run", **{"method.name": "supervised"}))
    return root, run


def test_nifti_output_has_the_input_geometry_exactly(nn_run, tmp_path, capsys):
    root, run = nn_run
    source = root / "imagesTr" / "pat000_0000.nii.gz"
    # a second input sliced along its first axis (largest spacing first), outside the dataset
    other = tmp_path / "in" / "scan.nii"
    other.parent.mkdir()
    data = np.asarray(nib.load(source).dataobj).transpose(2, 0, 1)
    zooms = (6.0, 1.4, 1.5)
    img = nib.Nifti1Image(data, rotated_affine(zooms))
    img.set_qform(img.affine, code=1)
    nib.save(img, other)
    assert main(["predict", str(run), str(source), str(other), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pat000: 14x12x4 ->" in out and "scan: 4x14x12 ->" in out
    for given, written in ((source, tmp_path / "out" / "pat000.nii.gz"), (other, tmp_path / "out" / "scan.nii")):
        a, b = nib.load(given), nib.load(written)
        assert b.shape == a.shape
        assert np.array_equal(b.affine, a.affine)
        assert np.array_equal(b.header.get_qform(), a.header.get_qform())
        assert np.array_equal(b.header.get_sform(), a.header.get_sform())
        assert int(b.header["qform_code"]) == int(a.header["qform_code"])
        assert int(b.header["sform_code"]) == int(a.header["sform_code"])
        assert b.header.get_zooms() == a.header.get_zooms()
        assert b.get_data_dtype() == np.uint8 and np.asarray(b.dataobj).max() < 3


def test_predict_gives_the_labels_evaluate_scores(nn_run, tmp_path):
    root, run = nn_run
    assert main(["evaluate", str(run), "--split", "test", "--device", "cpu", "--save-predictions"]) == 0
    saved = sorted((run / "predictions_test").iterdir())
    assert len(saved) == 1
    case = saved[0].name[: -len(".nii.gz")]
    assert main(["predict", str(run), str(root / "imagesTr" / f"{case}_0000.nii.gz"), "-o", str(tmp_path)]) == 0
    predicted = np.asarray(nib.load(tmp_path / saved[0].name).dataobj)
    assert np.array_equal(predicted, np.asarray(nib.load(saved[0]).dataobj))
    assert predicted.shape == nib.load(root / "labelsTr" / saved[0].name).shape


def test_probabilities_match_the_labels(nn_run, tmp_path):
    root, run = nn_run
    source = root / "imagesTr" / "pat001_0000.nii.gz"
    assert main(["predict", str(run), str(source), "-o", str(tmp_path), "--probabilities"]) == 0
    saved = np.load(tmp_path / "pat001_probabilities.npz")
    probs = saved["probabilities"]
    assert probs.shape == (3, 14, 12, 4) and list(saved["class_names"]) == ["background", "outer", "inner"]
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(axis=0), np.asarray(nib.load(tmp_path / "pat001.nii.gz").dataobj))


def test_failed_cases_write_nothing_and_the_others_go_through(nn_run, tmp_path, capsys):
    root, run = nn_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(root / "imagesTr" / "pat002_0000.nii.gz", inputs / "good.nii.gz")
    (inputs / "empty.nii.gz").write_bytes(b"")
    two = np.asarray(nib.load(root / "imagesTr" / "pat002_0000.nii.gz").dataobj)
    for c in range(2):  # an nnU-Net case with two channels, for a one-channel run
        nib.save(nib.Nifti1Image(two, rotated_affine()), inputs / f"multi_{c:04d}.nii.gz")
    assert main(["predict", str(run), str(inputs), "-o", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 3 and "Traceback" not in captured.err
    assert str(inputs / "empty.nii.gz") in errors[0] or str(inputs / "empty.nii.gz") in errors[1]
    assert any(str(inputs / "multi_0000.nii.gz") in e and "2 channel(s)" in e for e in errors)
    assert "2 case(s) failed" in errors[-1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]
    assert "good: 14x12x4 ->" in captured.out


def test_run_folder_without_model(nn_run, tmp_path, capsys):
    root, run = nn_run
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")
    assert main(["predict", str(bare), str(root / "imagesTr"), "-o", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "no model" in captured.err and str(bare) in captured.err
    assert not (tmp_path / "out").exists()


def test_copied_run_folder_predicts_without_the_data(nn_run, tmp_path):
    root, run = nn_run
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, copy)
    source = tmp_path / "case.nii.gz"
    shutil.copy(root / "imagesTr" / "pat003_0000.nii.gz", source)
    moved = root.with_name("moved-away")
    root.rename(moved)  # the training data is gone
    try:
        assert main(["predict", str(copy), str(source), "-o", str(tmp_path / "out")]) == 0
    finally:
        moved.rename(root)
    assert (tmp_path / "out" / "case.nii.gz").is_file()


def test_2d_masks_overlays_and_channel_mismatch(folder_run, tmp_path, capsys):
    root, run = folder_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    rgb = np.asarray(Image.open(next((root / "images").iterdir())))
    Image.fromarray(rgb).save(inputs / "frame 1.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(inputs / "grey.png")  # one channel, the run has three
    assert main(["predict", str(run), str(inputs), "-o", str(tmp_path / "out"), "--overlay"]) == 2
    err = capsys.readouterr().err
    assert str(inputs / "grey.png") in err and "1 channel(s) but the run was trained on 3" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frame 1.png", "frame 1_overlay.png"]
    mask = Image.open(tmp_path / "out" / "frame 1.png")
    assert mask.size == (18, 20) and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}  # written in the training masks' encoding
    overlay = Image.open(tmp_path / "out" / "frame 1_overlay.png")
    assert overlay.size == (18, 20) and overlay.mode == "RGB"


def test_output_never_overwrites_an_input(folder_run, tmp_path, capsys):
    root, run = folder_run
    image = tmp_path / "x.png"
    shutil.copy(next((root / "images").iterdir()), image)
    before = image.read_bytes()
    assert main(["predict", str(run), str(image), "-o", str(tmp_path)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert image.read_bytes() == before


def test_overlay_on_a_volume_is_reported_not_silently_skipped(nn_run, tmp_path, capsys):
    root, run = nn_run
    source = root / "imagesTr" / "pat001_0000.nii.gz"
    assert main(["predict", str(run), str(source), "-o", str(tmp_path), "--overlay"]) == 0
    assert "no overlay: --overlay is for 2D images" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pat001.nii.gz"]
