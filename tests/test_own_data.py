"""Your own data end to end on folders built from the shared ACDC and CVC files, as a user would have
them: CVC frames as PNG with arbitrary names and 0/1 masks, and ACDC patients as an nnU-Net raw
dataset of NIfTI volumes with a rotated, shifted, anisotropic affine. Prepare, a short
semi-supervised training, evaluate (also cross-dataset), predict, and the geometry round trip.
Every method builds and steps on prepared data (synthetic, so that part runs without the data too).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import _Threads
from own_data_builders import own_config, rotated_affine, write_image_folder
from PIL import Image

from vqseg.cli import main
from vqseg.data.prepare import SPLIT_FILE, prepare
from vqseg.engine.trainer import train
from vqseg.methods import available_methods

pytestmark = pytest.mark.usefixtures("one_thread")

ACDC_PATIENTS = (1, 2, 3, 4, 5)
OWN_YAML = Path(__file__).resolve().parents[1] / "configs" / "own.yaml"
ACDC_ZOOMS = (1.5625, 1.5625, 10.0)


@pytest.fixture(scope="module")
def shared_data() -> Path:
    import os

    root = Path(os.environ.get("VQSEG_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    if not (root / "acdc" / "splits.json").is_file() or not (root / "cvc-clinicdb" / "splits.json").is_file():
        pytest.skip(f"shared ACDC/CVC data not found at {root} (set VQSEG_DATA)")
    return root


@pytest.fixture(scope="module")
def acdc_nnunet(shared_data, tmp_path_factory) -> Path:
    """ACDC patients' end-diastole volumes as nnU-Net NIfTI (H x W x D, slices along the last axis), with
    the second phase of patient 5 as an image without a label."""
    root = tmp_path_factory.mktemp("acdc") / "Dataset027_ACDC"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    volumes = sorted((shared_data / "acdc" / "volumes").glob("patient00[1-5]_frame*.h5"))
    for path in volumes:
        with h5py.File(path, "r") as f:
            image, label = f["image"][()], f["label"][()]
        image = (image[:, ::4, ::4] * 800).astype(np.int16).transpose(1, 2, 0)  # MRI-like raw values, 1/4 size
        label = label[:, ::4, ::4].transpose(1, 2, 0).astype(np.uint8)
        name = path.stem.replace("_frame", "_")
        affine = rotated_affine(ACDC_ZOOMS)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}_0000.nii.gz")
        if not (name.startswith("patient005") and not name.endswith("01")):
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
    spec = {
        "channel_names": {"0": "cineMRI"},
        "labels": {"background": 0, "RV": 1, "MLV": 2, "LVC": 3},
        "numTraining": len(volumes),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def cvc_folder(shared_data: Path, root: Path, frames: range, foreground: int) -> Path:
    """CVC frames as PNG with arbitrary names; masks re-encoded with foreground value ``foreground``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for frame in frames:
        name = f"polyp {frame:04d}-{'abcdefgh'[frame % 8]}"
        image = Image.open(shared_data / "cvc-clinicdb" / "images" / f"{frame}.jpg").resize((64, 64))
        image.save(root / "images" / f"{name}.png")
        mask = np.asarray(Image.open(shared_data / "cvc-clinicdb" / "masks" / f"{frame}.jpg").convert("L").resize((64, 64)))
        Image.fromarray(((mask > 127) * foreground).astype(np.uint8)).save(root / "masks" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def cvc_01(shared_data, tmp_path_factory) -> Path:
    return cvc_folder(shared_data, tmp_path_factory.mktemp("cvc") / "polyps", range(1, 21), 1)


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_nnunet_acdc_end_to_end(acdc_nnunet, tmp_path, capsys):
    root = acdc_nnunet
    assert main(["prepare", str(root), "--labeled", "2", "--val", "2", "--test", "2", "--group", r"patient(\d+)"]) == 0
    out = capsys.readouterr().out
    assert "nnU-Net v2 raw" in out and "RV" in out and "1.56 x 1.56 x 10 mm (file axis order)" in out
    assert "sliced along array axis 2" in out
    split = json.loads((root / SPLIT_FILE).read_text())
    where = {name: k for k in ("labeled", "unlabeled", "val", "test") for name in split[k]}
    labelled = [p.name[: -len(".nii.gz")] for p in (root / "labelsTr").iterdir()]
    for patient in ACDC_PATIENTS:  # both phases of a patient stay together
        assert len({where[n] for n in labelled if n.startswith(f"patient{patient:03d}")}) == 1
    # the image without a label trains unlabelled with its patient, or is left out with it
    assert where.get("patient005_13", "left out") == ("unlabeled" if where["patient005_01"] in ("labeled", "unlabeled")
                                                       else "left out")
    assert split["val"] and split["test"] and len(split["labeled"]) >= 2

    with _Threads():
        run = train(own_config(root, tmp_path / "run", **{"method.name": "mean_teacher"}))
    saved = (run / "config.yaml").read_text()
    assert "class_names:\n  - RV\n  - MLV\n  - LVC" in saved and "intensity: percentile" in saved

    assert main(["evaluate", str(run), "--split", "test", "--device", "cpu", "--save-predictions"]) == 0
    assert "distances in mm" in capsys.readouterr().out
    summary = json.loads((run / "eval_test.json").read_text())
    assert summary["units"] == "mm" and summary["num_volumes"] == 2
    table = rows(run / "eval_test.csv")
    assert {r["class"] for r in table} == {"RV", "MLV", "LVC"} and len(table) == 6
    assert {r["units"] for r in table} == {"mm"}

    case = split["test"][0]
    source = root / "imagesTr" / f"{case}_0000.nii.gz"
    assert main(["predict", str(run), str(source), "-o", str(tmp_path / "pred")]) == 0
    given, written = nib.load(source), nib.load(tmp_path / "pred" / f"{case}.nii.gz")
    assert written.shape == given.shape and np.array_equal(written.affine, given.affine)
    assert written.header.get_zooms() == given.header.get_zooms()
    assert np.array_equal(
        np.asarray(written.dataobj), np.asarray(nib.load(run / "predictions_test" / f"{case}.nii.gz").dataobj)
    )


def test_image_folder_cvc_end_to_end_and_cross_dataset(cvc_01, shared_data, tmp_path, capsys):
    root = cvc_01
    assert main(["prepare", str(root), "--labeled", "4", "--val", "4", "--test", "4"]) == 0
    out = capsys.readouterr().out
    assert "binary masks with values 0/1" in out and "none stored: distances are in pixels" in out
    with _Threads():
        run = train(own_config(root, tmp_path / "run", **{"method.name": "unimatch"}))

    assert main(["evaluate", str(run), "--device", "cpu", "--save-predictions"]) == 0
    table = rows(run / "eval_test.csv")
    assert len(table) == 4 and {r["units"] for r in table} == {"pixels"}
    first = table[0]["case"]
    assert main(["predict", str(run), str(root / "images" / f"{first}.png"), "-o", str(tmp_path / "pred")]) == 0
    predicted = np.asarray(Image.open(tmp_path / "pred" / f"{first}.png"))
    assert predicted.shape == (64, 64)
    assert np.array_equal(predicted, np.asarray(Image.open(run / "predictions_test" / f"{first}.png")))

    # the same run scores another dataset: other frames, masks stored 0/255 instead of 0/1
    other = cvc_folder(shared_data, tmp_path / "other polyps", range(400, 412), 255)
    prepare(other, val="4", test="4")
    assert main(["evaluate", str(run), "--data", str(other), "--split", "test", "--device", "cpu"]) == 0
    cross = rows(run / "eval_test_other polyps.csv")
    assert len(cross) == 4 and all(r["case"].startswith("polyp 04") for r in cross)
    assert (run / "eval_test.csv").read_text().count("\n") == 5  # the run's own results are untouched


def test_cross_dataset_with_other_classes_is_refused(acdc_nnunet, cvc_01, tmp_path, capsys):
    prepare(cvc_01, val="4", test="4", force=True)
    with _Threads():
        run = train(own_config(cvc_01, tmp_path / "run", **{"method.name": "supervised"}))
    if not (acdc_nnunet / SPLIT_FILE).is_file():
        prepare(acdc_nnunet, val="2", test="2")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(acdc_nnunet), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(acdc_nnunet) in err[0] and "num_classes=4" in err[0]


# ---------------------------------------------------------------------------------------------
# Every method on prepared data; settings come from the dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    root = write_image_folder(tmp_path_factory.mktemp("tiny") / "data", count=8, unlabeled=2, shape=(20, 18))
    prepare(root, labeled="2", val="2", test="2")
    return root


METHOD_SETTINGS = {"vqseg": {"method.foundation": "none", "method.codebook_size": 64}}


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_on_prepared_data(tiny_prepared, tmp_path, method):
    cfg = own_config(tiny_prepared, tmp_path / method, **{"method.name": method, **METHOD_SETTINGS.get(method, {})})
    run = train(cfg)
    assert (run / "best.pt").is_file()
    saved = (run / "config.yaml").read_text()
    assert "in_channels: 3" in saved and "label_encoding: binary01" in saved and "- foreground" in saved


def test_unprepared_folder_and_contradicting_settings(tiny_prepared, tmp_path, capsys):
    raw = write_image_folder(tmp_path / "raw")
    args = ["train", str(OWN_YAML), "--set", f"data.root={raw}", "--set", f"output_dir={tmp_path / 'r'}"]
    assert main(args) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and f"vqseg prepare {raw}" in line
    args = ["train", str(OWN_YAML), "--set", f"data.root={tiny_prepared}", "--set", "data.num_classes=3",
            "--set", f"output_dir={tmp_path / 'r'}"]
    assert main(args) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "data.num_classes=3" in line and "has 2" in line
    assert not (tmp_path / "r").exists()


def test_the_cpu_preset_for_own_data_trains_on_a_prepared_folder(tiny_prepared, tmp_path):
    """configs/cpu/own.yaml: frozen LiteMedSAM (a tiny random stand-in here) on any prepared folder."""
    from vqseg.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "cpu" / "own.yaml"
    cfg = load_config(path)
    assert (cfg.model.name, cfg.model.encoder_mode, cfg.train.device) == ("litemedsam", "frozen", "cpu")
    assert cfg.train.iterations <= 1500  # a schedule that fits two cores (README: its cost)
    small = {"data.root": str(tiny_prepared), "output_dir": str(tmp_path / "run"), "model.tiny": True,
             "train.iterations": 2, "train.val_every": 2, "train.image_size": 32, "train.batch_size": 2}
    run = train(load_config(path, [f"{k}={json.dumps(v)}" for k, v in small.items()]))
    assert (run / "best.pt").is_file()
