"""``vqseg predict``: outputs in the input's exact geometry, the same labels as ``evaluate``, a
self-describing run folder, and per-case failures that write nothing and stop nothing else."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import _Threads
from own_data_builders import ZOOMS, own_config, rotated_affine, write_image_folder, write_nnunet
from PIL import Image
from torch import nn

import vqseg.evaluation.evaluate as evaluate_module
import vqseg.evaluation.predict as predict_module
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
    Image.fromarray(np.zeros((14, 12, 3), np.uint8)).save(inputs / "colour.png")  # RGB, for a one-channel run
    assert main(["predict", str(run), str(inputs), "-o", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 3 and "Traceback" not in captured.err
    assert str(inputs / "empty.nii.gz") in errors[0] or str(inputs / "empty.nii.gz") in errors[1]
    assert any(str(inputs / "colour.png") in e and "3 channel(s)" in e for e in errors)
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


# ---------------------------------------------------------------------------------------------
# A stand-in predictor whose answer is known by hand, so written files are checked voxel by voxel
# against numpy on the input array, not against the project's own readers and writers.
# ---------------------------------------------------------------------------------------------

LEVELS = np.array([0, 1, 2, 3, 4, 6, 7, 8, 9, 10], np.float32)


class ThresholdNet(nn.Module):
    """Class 1 where the first channel of the normalised input is above 0.5; counts the slices it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.slices = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.slices += x.shape[0]
        return torch.cat([torch.zeros_like(x[:, :1]), (x[:, :1] - 0.5) * 100], dim=1)


def stub_run(monkeypatch, tmp_path: Path, image_size: int, **data: object) -> ThresholdNet:
    """Make ``predict`` and ``evaluate`` load a two-class run with ``data`` settings and the ThresholdNet.

    Slices of odd sizes h x w at an ``image_size`` that is an odd multiple of both come back exactly:
    the bilinear resize back samples the very pixels that the resize up placed on the input's pixels.
    """
    values = dict(num_classes=2, class_names=["fg"], in_channels=1, intensity="minmax", label_encoding="labels")
    overrides = {f"data.{key}": value for key, value in {**values, **data}.items()}
    overrides.update({"model.channels": [4, 8], "model.dropout": [0.0, 0.0], "train.image_size": image_size})
    cfg = own_config(tmp_path, tmp_path / "run", **overrides)
    net = ThresholdNet()
    for module in (predict_module, evaluate_module):
        monkeypatch.setattr(module, "load_run", lambda run_dir, checkpoint="best": (cfg, net, {}))
    return net


def predict(tmp_path: Path, *inputs: Path, out: str = "out", **options: object) -> tuple[int, int]:
    """``predict_paths`` with the stub run, on the CPU, into ``tmp_path / out``: (written, failed)."""
    return predict_module.predict_paths(tmp_path / "run", list(inputs), tmp_path / out, device="cpu", **options)


def levels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random grey levels 0..10 without 5, with 0 and 10 present: min-max scaling divides by 10 and no
    voxel sits on the threshold, so the expected labels are ``levels > 5``; random, so any flip or
    transpose shows."""
    data = np.random.default_rng(seed).choice(LEVELS, size=shape)
    data.flat[0], data.flat[-1] = 0, 10
    return data


def read_back(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize(
    "shape, zooms, slice_axis, sliced",
    [
        ((3, 5, 7), ZOOMS, 0, 0),  # the run's axis wins over the header's largest spacing (the last)
        ((3, 5, 7), ZOOMS, 1, 1),
        ((3, 5, 7), ZOOMS, 2, 2),
        ((5, 5, 5), ZOOMS, 0, 0),  # square slices: an in-plane transpose keeps the shape, not the voxels
        ((5, 5, 5), ZOOMS, 1, 1),
        ((5, 5, 5), ZOOMS, 2, 2),
        ((3, 5, 7), (1.0, 3.0, 1.2), None, 1),  # no plan: the largest spacing chooses
        ((5, 5, 5), (2.0, 1.0, 1.0), None, 0),
    ],
)
def test_labels_are_voxel_exact_along_any_slicing_axis(tmp_path, monkeypatch, shape, zooms, slice_axis, sliced):
    """Every voxel of the written file against numpy: a flip or transpose, in plane or of the slice axis, shows."""
    in_plane = [n for axis, n in enumerate(shape) if axis != sliced]
    net = stub_run(monkeypatch, tmp_path, math.lcm(*in_plane), slice_axis=slice_axis)
    data = levels(shape)
    nib.save(nib.Nifti1Image(data, rotated_affine(zooms)), tmp_path / "scan.nii.gz")
    assert predict(tmp_path, tmp_path / "scan.nii.gz") == (1, 0)
    assert net.slices == shape[sliced]
    written = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert np.array_equal(written.affine, nib.load(tmp_path / "scan.nii.gz").affine)
    assert np.array_equal(np.asarray(written.dataobj), (data > 5).astype(np.uint8))


def test_predict_and_evaluate_each_write_the_labels_computed_by_hand(tmp_path, monkeypatch):
    """Not only the same as each other: a slicing bug shared by both would pass that comparison."""
    root = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    affine, truth = rotated_affine((1.0, 4.0, 1.2)), {}  # sliced along the middle axis
    for i in range(3):
        data = levels((3, 5, 7), seed=i)
        truth[f"c{i}"] = (data > 5).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, affine), root / "imagesTr" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(truth[f"c{i}"], affine), root / "labelsTr" / f"c{i}.nii.gz")
    spec = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "fg": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    prepare(root, val="1", test="1")
    stub_run(monkeypatch, tmp_path, math.lcm(3, 7), slice_axis=1)
    (tmp_path / "run").mkdir()
    summary = evaluate_module.evaluate_run(tmp_path / "run", "test", device="cpu", data_dir=root, save_predictions=True)
    (saved,) = (tmp_path / "run" / "predictions_test_data").iterdir()
    case = saved.name[: -len(".nii.gz")]
    assert np.array_equal(read_back(saved), truth[case])
    assert summary["honest"]["per_class"]["fg"]["dice"] == 1.0
    image = root / "imagesTr" / f"{case}_0000.nii.gz"
    assert predict(tmp_path, image) == (1, 0)
    assert np.array_equal(read_back(tmp_path / "out" / saved.name), truth[case])


def test_label_volume_keeps_the_geometry_but_not_the_display_and_scaling_fields(tmp_path, monkeypatch):
    """A CT header (window -1000..3000, description, stored values scaled by 2 and shifted by 5) must not
    make viewers window the labels or readers rescale them; the geometry stays the input's."""
    stub_run(monkeypatch, tmp_path, math.lcm(5, 7))
    stored = levels((3, 5, 7)).astype(np.int16)
    img = nib.Nifti1Image(stored, rotated_affine((2.0, 1.0, 1.0)))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=2)
    header = img.header
    header.set_slope_inter(2, 5)
    header["cal_min"], header["cal_max"], header["descrip"] = -1000, 3000, b"CT abdomen 120 kV"
    header.set_intent("t test", (3.0,))
    header.set_xyzt_units("mm", "sec")
    nib.save(img, tmp_path / "ct.nii.gz")
    given = nib.load(tmp_path / "ct.nii.gz")
    assert given.dataobj.slope == 2 and given.dataobj.inter == 5  # the input really is scaled
    assert predict(tmp_path, tmp_path / "ct.nii.gz") == (1, 0)
    path = tmp_path / "out" / "ct.nii.gz"
    assert path.read_bytes()[8] == 4  # gzip header XFL 4: the fastest compression level
    written = nib.load(path)
    assert np.array_equal(np.asarray(written.dataobj), (stored > 5).astype(np.uint8))  # min-max ignores 2x + 5
    assert written.get_data_dtype() == np.uint8 and written.dataobj.slope == 1 and written.dataobj.inter == 0
    out = written.header
    assert out["cal_min"] == 0 and out["cal_max"] == 0 and out["descrip"] == b"vqseg prediction"
    assert out.get_intent() == ("label", (), "") and int(out["intent_code"]) == 1002
    assert np.array_equal(out.get_qform(), given.header.get_qform()) and int(out["qform_code"]) == 1
    assert np.array_equal(out.get_sform(), given.header.get_sform()) and int(out["sform_code"]) == 2
    assert out.get_zooms() == given.header.get_zooms() and out.get_xyzt_units() == ("mm", "sec")


def test_probabilities_are_computed_only_when_asked_for(tmp_path, monkeypatch):
    """Without --probabilities, labels come from the chunked argmax: a 512 x 512 x 300 CT with 14
    classes would otherwise hold 4.4 GB of float32 probabilities."""
    stub_run(monkeypatch, tmp_path, math.lcm(5, 7))
    data = levels((3, 5, 7))
    nib.save(nib.Nifti1Image(data, rotated_affine((2.0, 1.0, 1.0))), tmp_path / "scan.nii")
    full = predict_module.predict_case_probabilities
    calls = []
    monkeypatch.setattr(predict_module, "predict_case_probabilities", lambda *args: calls.append(1) or full(*args))
    for probabilities in (False, True):
        out = f"out{probabilities}"
        assert predict(tmp_path, tmp_path / "scan.nii", out=out, probabilities=probabilities) == (1, 0)
        assert np.array_equal(read_back(tmp_path / out / "scan.nii"), (data > 5).astype(np.uint8))
        assert len(calls) == int(probabilities)
    saved = np.load(tmp_path / "outTrue" / "scan_probabilities.npz")["probabilities"]
    assert np.array_equal(saved.argmax(axis=0), (data > 5))


def grey_frame(path: Path, seed: int) -> np.ndarray:
    """A 5 x 7 8-bit frame whose pixels are never near 127.5 (the stub's threshold after / 255)."""
    pixels = np.random.default_rng(seed).choice(np.array([0, 40, 100, 160, 220, 255], np.uint8), size=(5, 7))
    Image.fromarray(pixels).save(path)
    return pixels


def test_numbered_frames_for_a_one_channel_run_are_cases_of_their_own(tmp_path, monkeypatch, capsys):
    """``video_0000.png``... are frames, not the channels of one image, when the run has one channel."""
    stub_run(monkeypatch, tmp_path, math.lcm(5, 7), intensity="divide255")
    (tmp_path / "in").mkdir()
    frames = {f"video_{i:04d}": grey_frame(tmp_path / "in" / f"video_{i:04d}.png", i) for i in range(3)}
    assert predict(tmp_path, tmp_path / "in") == (3, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{name}.png" for name in frames]
    for name, pixels in frames.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}.png")), (pixels > 127).astype(np.uint8))
    assert "error" not in capsys.readouterr().err


def test_channel_files_holding_the_runs_channels_are_one_case(tmp_path, monkeypatch):
    """nnU-Net's ``imagesTs/``: ``case_0000``, ``case_0001`` for a two-channel run are one case, in channel order."""
    stub_run(monkeypatch, tmp_path, math.lcm(5, 7), in_channels=2)
    (tmp_path / "in").mkdir()
    first, second = levels((3, 5, 7), seed=1), levels((3, 5, 7), seed=2)
    for c, data in enumerate((first, second)):
        nib.save(nib.Nifti1Image(data, rotated_affine((2.0, 1.0, 1.0))), tmp_path / "in" / f"case_{c:04d}.nii.gz")
    assert predict(tmp_path, tmp_path / "in") == (1, 0)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case.nii.gz"]
    assert np.array_equal(read_back(tmp_path / "out" / "case.nii.gz"), (first > 5).astype(np.uint8))  # channel 0 first


def test_channel_files_that_do_not_fit_the_run_fail_one_by_one(tmp_path, monkeypatch, capsys):
    """Three channel files for a two-channel run: each fails naming its own file; nothing is written."""
    stub_run(monkeypatch, tmp_path, math.lcm(5, 7), in_channels=2)
    (tmp_path / "in").mkdir()
    for c in range(3):
        nib.save(nib.Nifti1Image(levels((3, 5, 7), seed=c), np.eye(4)), tmp_path / "in" / f"case_{c:04d}.nii.gz")
    assert predict(tmp_path, tmp_path / "in") == (0, 3)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 3
    for c, line in enumerate(errors):
        assert f"case_{c:04d}.nii.gz: 1 channel(s) but the run was trained on 2" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_collect_cases_groups_only_files_that_hold_the_runs_channels(tmp_path):
    """Numbered files are one case only when, numbered from _0000 without a gap, they hold the run's
    channels between them; every other file is a case of its own under its full stem."""
    grey, rgb = np.zeros((5, 7), np.uint8), np.zeros((5, 7, 3), np.uint8)
    for name in ("case_0000", "case_0001", "gap_0000", "gap_0002"):
        nib.save(nib.Nifti1Image(np.zeros((3, 5, 7), np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    for i in range(3):
        Image.fromarray(grey).save(tmp_path / f"band_{i:04d}.png")  # one grey file per channel
        Image.fromarray(rgb).save(tmp_path / f"clip_{i:04d}.png")  # colour video frames
    Image.fromarray(rgb).save(tmp_path / "road_0000.png")  # nnU-Net's one RGB file per 2D case

    def cases(channels: int) -> dict[str, list[str]]:
        found = predict_module.collect_cases([tmp_path], channels)
        return {case.name: [p.name for p in case.images] for case in found}

    one, two, three = cases(1), cases(2), cases(3)
    assert one["road_0000"] == ["road_0000.png"] and "case" not in one and "gap" not in one
    assert one["clip_0001"] == ["clip_0001.png"] and one["band_0002"] == ["band_0002.png"]
    assert two["case"] == ["case_0000.nii.gz", "case_0001.nii.gz"]
    assert "gap" not in two and two["gap_0002"] == ["gap_0002.nii.gz"]  # numbered with a gap: not channels
    assert three["band"] == ["band_0000.png", "band_0001.png", "band_0002.png"] and three["road"] == ["road_0000.png"]
    assert three["clip_0000"] == ["clip_0000.png"] and "clip" not in three
    assert len(one) == 11 and len(two) == 10 and len(three) == 9
