"""Command line: one clear error line and exit status 2 for user errors, metrics on files, help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, TinyACDC, tiny_overrides

from vqseg.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def sets(overrides: list[str]) -> list[str]:
    return [arg for text in overrides for arg in ("--set", text)]


def assert_one_error_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "error:" in lines[0] and "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert_one_error_line(capsys, "vqseg train: error:", "nope.yaml", "does not exist")


def test_unknown_config_key(capsys, tmp_path):
    assert main(["train", "--set", "train.iteratons=5", "--set", f"output_dir={tmp_path / 'r'}"]) == 2
    assert_one_error_line(capsys, "train.iteratons")
    assert not (tmp_path / "r").exists()  # rejected before anything is written


def test_unknown_key_in_config_file(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iterations: 5\nmodel:\n  chanels: [4, 8]\n")
    assert main(["train", str(path)]) == 2
    assert_one_error_line(capsys, "model.chanels")


def test_missing_data_root(capsys, tmp_path):
    missing = tmp_path / "no" / "acdc"
    args = sets(tiny_overrides(**{"data.dataset": "acdc", "data.root": str(missing), "output_dir": str(tmp_path / "r")}))
    assert main(["train", *args]) == 2
    assert_one_error_line(capsys, "data.root", str(missing))


def test_labeled_count_too_large(capsys, tiny_acdc: TinyACDC, tmp_path):
    overrides = {"data.dataset": "acdc", "data.root": str(tiny_acdc.root), "data.labeled_cases": 9}
    args = sets(tiny_overrides(**overrides, output_dir=str(tmp_path / "r")))
    assert main(["train", *args]) == 2
    assert_one_error_line(capsys, "data.labeled_cases=9", "6 patients")


def test_resume_without_checkpoint(capsys, tmp_path):
    assert main(["train", "--resume", *sets(tiny_overrides(output_dir=str(tmp_path / "r")))]) == 2
    assert_one_error_line(capsys, "--resume", "last.pt")


def test_evaluate_non_run_folder(capsys, tmp_path):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert_one_error_line(capsys, "vqseg evaluate: error:", "config.yaml")


def test_invalid_method_choice(capsys):
    assert main(["train", "--set", "method.name=vqseg", "--set", "method.perturbation=wobble"]) == 2
    assert_one_error_line(capsys, "method.perturbation", "wobble")


def test_evaluate_command(capsys, phantom_run: Path):
    assert main(["evaluate", str(phantom_run), "--split", "val", "--device", "cpu", "--spacing", "5", "1.5", "1.5"]) == 0
    out = capsys.readouterr().out
    assert "| RV |" in out and "eval_val.json" in out
    data = json.loads((phantom_run / "eval_val.json").read_text())
    assert data["units"] == "mm" and data["split"] == "val" and data["checkpoint"] == "best"


def test_evaluate_missing_checkpoint(capsys, phantom_run: Path):
    assert main(["evaluate", str(phantom_run), "--checkpoint", "step3", "--device", "cpu"]) == 2
    assert_one_error_line(capsys, "step3.pt")


def test_metrics_missing_file(capsys, tmp_path):
    gt = tmp_path / "gt.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), str(gt))
    assert main(["metrics", "--pred", str(tmp_path / "missing.nii.gz"), "--gt", str(gt)]) == 2
    assert_one_error_line(capsys, "vqseg metrics: error:", "missing.nii.gz")


@pytest.mark.parametrize("override", ["train.optimizer=adam", "model.name=resnet"])
def test_invalid_choice_in_config(capsys, tmp_path, override):
    args = sets(tiny_overrides(output_dir=str(tmp_path / "r"))) + ["--set", override]
    assert main(["train", *args]) == 2
    assert_one_error_line(capsys, override.split("=")[0])


def _nifti(path: Path, labels: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), str(path))
    return str(path)


@pytest.fixture
def label_pair(tmp_path) -> tuple[str, str]:
    gt = np.zeros((12, 10, 3), np.uint8)
    gt[2:6, 2:6, :] = 1  # 48 voxels
    gt[7:11, 3:8, :] = 2  # 60 voxels
    pred = gt.copy()
    pred[2:4, 2:6, :] = 0  # class 1: 24 of 48 found -> Dice 2*24/(24+48) = 2/3
    return _nifti(tmp_path / "pred.nii.gz", pred), _nifti(tmp_path / "gt.nii.gz", gt)


def test_metrics_prints_per_class_dice(capsys, label_pair):
    pred, gt = label_pair
    assert main(["metrics", "--pred", pred, "--gt", gt]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert set(rows) == {"1", "2", "mean"}
    assert lines[4] == "distances in mm, spacing 1 x 1 x 1"  # from the NIfTI header
    assert rows["1"][0] == "0.6667" and rows["2"][0] == "1.0000"
    assert rows["mean"][0] == f"{(2 / 3 + 1) / 2:.4f}"


def test_metrics_json(capsys, label_pair):
    pred, gt = label_pair
    assert main(["metrics", "--pred", pred, "--gt", gt, "--json", "--num-classes", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["classes"]) == {"1", "2"} and result["absent"] == [3]  # in neither file: not scored
    assert result["units"] == "mm" and result["spacing"] == [1.0, 1.0, 1.0]
    assert result["classes"]["1"]["dice"] == pytest.approx(2 / 3)
    assert result["classes"]["1"]["jaccard"] == pytest.approx(0.5)
    assert result["classes"]["2"]["dice"] == 1.0 and result["classes"]["2"]["hd95"] == 0.0
    assert result["mean"]["dice"] == pytest.approx((2 / 3 + 1) / 2)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "metrics", "demo", "benchmark"):
        assert command in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("entry", [["-m", "vqseg.cli"], ["-c", "from vqseg.cli import main; raise SystemExit(main())"]])
def test_module_entry_point(entry):
    """``python -m vqseg.cli`` (what torchrun launches) and the console-script target both run."""
    result = subprocess.run([sys.executable, *entry, "train", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout


def test_console_script_exists():
    script = Path(sys.executable).parent / "vqseg"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    assert "vqseg.cli" in script.read_text()


@pytest.mark.usefixtures("cached_acdc_reads")
def test_real_acdc_two_iterations(acdc_root: Path, tmp_path, capsys):
    run = tmp_path / "acdc_run"
    overrides = tiny_overrides(
        **{
            "data.dataset": "acdc",
            "data.root": str(acdc_root),
            "data.labeled_cases": 3,
            "train.iterations": 2,
            "train.val_every": 2,
            "output_dir": str(run),
        }
    )
    assert main(["train", *sets(overrides)]) == 0
    assert f"run folder: {run}" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 2 and 0 <= summary["best_val_dice"] <= 1
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()


def test_repo_configs_load():
    from vqseg.config import load_config

    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert REPO / "configs" / "cpu" / "own.yaml" in paths
    for path in paths:
        load_config(path)


def test_failed_start_leaves_existing_run_untouched(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *sets(tiny_overrides(**{"output_dir": str(run), "train.iterations": 1}))]) == 0
    before = (run / "config.yaml").read_text()
    bad = tiny_overrides(**{"output_dir": str(run), "data.dataset": "acdc", "data.root": str(tmp_path / "missing")})
    assert main(["train", *sets(bad)]) == 2
    assert (run / "config.yaml").read_text() == before


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["evaluate", "run", "--split", "train"], "--split"),
        (["trian"], "invalid choice"),
        (["predict", "run"], "-o/--output"),
        (["metrics", "--pred", "p.nii.gz", "--gt", "g.nii.gz", "--num-classes", "three"], "--num-classes"),
    ],
)
def test_usage_mistakes_are_one_line_with_status_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqseg") and "error:" in lines[0] and fragment in lines[0], captured.err
