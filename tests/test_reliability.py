"""Issue 11, through the command line: every user error is one line with exit status 2 and no
traceback, a refused start leaves the run folder byte-for-byte as it was, two processes cannot
share a run folder, and ``vqseg metrics`` scores only what is there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, TinyACDC, _Threads, tiny_overrides
from test_cli import assert_one_error_line, sets
from test_cvc import write_cvc

from vqseg.cli import main
from vqseg.io import load_checkpoint
from vqseg.methods.base import StepOutput, Supervised

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below the folder with its content hash: any change, addition or removal shows."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_error_after_progress(capsys, *fragments: str) -> str:
    """A failure during training: the progress bar's lines, then the one error line on its own."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == errors[0] and errors[0].startswith("vqseg train: error:"), err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def train_args(run: Path, **overrides: object) -> list[str]:
    return ["train", *sets(tiny_overrides(output_dir=str(run), **overrides))]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4), trained through the CLI; tests use copies."""
    run = tmp_path_factory.mktemp("reliability") / "run"
    with _Threads():
        assert main(train_args(run, **{"train.iterations": 4, "train.val_every": 2})) == 0
    return run


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def copy_args(run: Path, *extra: str, **overrides: object) -> list[str]:
    """The copied run's own settings (so a resume is allowed), plus changes."""
    return [*train_args(run, **{"train.iterations": 4, "train.val_every": 2, **overrides}), *extra]


# ---------------------------------------------------------------------------------------------
# 1. Tracebacks instead of one line
# ---------------------------------------------------------------------------------------------


def _damage(path: Path, kind: str) -> None:
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "malicious":  # a pickled callable: only an unsafe load would import and run it
        torch.save({"method": {}, "payload": os.system}, path)
    elif kind == "not_a_dict":
        torch.save(torch.ones(3), path)


@pytest.mark.parametrize("kind, fragment", [
    ("truncated", "truncated or corrupt"), ("empty", "empty (0 bytes)"),
    ("malicious", "not a weights-only checkpoint"), ("not_a_dict", "not a vqseg checkpoint"),
])
def test_damaged_last_checkpoint_on_resume(capsys, run_copy: Path, kind: str, fragment: str):
    _damage(run_copy / "last.pt", kind)
    before = snapshot(run_copy)
    assert main(copy_args(run_copy, "--resume")) == 2
    assert_one_error_line(capsys, "vqseg train: error:", str(run_copy / "last.pt"), fragment)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("kind", ["truncated", "empty", "malicious"])
def test_damaged_best_checkpoint_on_evaluate(capsys, run_copy: Path, kind: str):
    _damage(run_copy / "best.pt", kind)
    before = snapshot(run_copy)
    assert main(["evaluate", str(run_copy), "--split", "val", "--device", "cpu"]) == 2
    assert_one_error_line(capsys, "vqseg evaluate: error:", str(run_copy / "best.pt"))
    assert snapshot(run_copy) == before


def _add_stray_key(state: dict) -> dict:
    """Weights of another model version: one entry the current model does not have."""
    return {**state, "head.stray_weight": torch.zeros(2)}


def test_mismatched_weights_on_evaluate_and_resume(capsys, run_copy: Path):
    best, last = run_copy / "best.pt", run_copy / "last.pt"
    state = torch.load(best, weights_only=True)
    torch.save({**state, "predictor": _add_stray_key(state["predictor"])}, best)
    resume = torch.load(last, weights_only=True)
    torch.save({**resume, "method": _add_stray_key(resume["method"])}, last)
    before = snapshot(run_copy)
    assert main(["evaluate", str(run_copy), "--split", "val", "--device", "cpu"]) == 2
    assert_one_error_line(capsys, "vqseg evaluate: error:", str(best), "does not fit the model", "head.stray_weight")
    assert main(copy_args(run_copy, "--resume")) == 2
    assert_one_error_line(capsys, "vqseg train: error:", str(last), "does not fit the model", "head.stray_weight")
    assert snapshot(run_copy) == before


def test_resume_checkpoint_without_training_state(capsys, run_copy: Path):
    shutil.copy(run_copy / "best.pt", run_copy / "last.pt")  # a predictor-only file
    assert main(copy_args(run_copy, "--resume")) == 2
    assert_one_error_line(capsys, "last.pt", "not a vqseg training checkpoint", "optimizer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(capsys, tmp_path: Path, phantom_run: Path):
    assert main(train_args(tmp_path / "r", **{"train.device": "cuda"})) == 2
    assert_one_error_line(capsys, "vqseg train: error:", "train.device=cuda", "no CUDA device")
    assert not (tmp_path / "r").exists()
    assert main(["evaluate", str(phantom_run), "--device", "cuda"]) == 2
    assert_one_error_line(capsys, "vqseg evaluate: error:", "--device=cuda")


@pytest.mark.parametrize("log_every, nan_from, stop_step, kept_step", [
    (1, 4, 5, 4),  # caught at the next logged step; last.pt keeps the step-4 checkpoint
    (5, 2, 4, 2),  # not a logged step, but a checkpoint step: caught before saving broken weights
])
def test_non_finite_loss(capsys, tmp_path: Path, monkeypatch, log_every, nan_from, stop_step, kept_step):
    original = Supervised.training_step

    def diverging(self, batch, step):
        out = original(self, batch, step)
        return StepOutput(out.loss * float("nan"), out.logs) if step >= nan_from else out

    monkeypatch.setattr(Supervised, "training_step", diverging)
    run = tmp_path / "nan"
    assert main(train_args(run, **{"train.val_every": 2, "train.log_every": log_every})) == 2
    assert_error_after_progress(
        capsys, f"at step {stop_step}", "lower learning rate", "train.lr=0.01", f"keeps step {kept_step}"
    )
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == kept_step
    assert all(torch.isfinite(v).all() for v in last["predictor"].values() if v.is_floating_point())


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.unlabeled_batch_size=0", "train.unlabeled_batch_size"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.image_size=8", "train.image_size"),
    ("train.momentum=1", "train.momentum"),
    ("train.weight_decay=-1e-4", "train.weight_decay"),
    ("train.poly_power=-1", "train.poly_power"),
    ("train.num_threads=-2", "train.num_threads"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.spacing=[1, 0, 1]", "eval.spacing[1]"),
    ("aug.scale=[1.2, 0.8]", "aug.scale"),
    ("aug.gamma=[0, 1.5]", "aug.gamma[0]"),
    ("aug.rotate_deg=-5", "aug.rotate_deg"),
    ("aug.noise_std=-0.1", "aug.noise_std"),
    ("aug.blur_prob=1.5", "aug.blur_prob"),
    ("aug.cutmix_prob=-0.5", "aug.cutmix_prob"),
    ("pdcr.patch_sizes=[5, 4]", "pdcr.patch_sizes[1]"),
    ("pdcr.tau=0", "pdcr.tau"),
    ("pdcr.cross_weight=-1", "pdcr.cross_weight"),
    ("pdcr.unlabeled_threshold=2", "pdcr.unlabeled_threshold"),
    ("pdcr.cross_layer=[encoder.downs.2]", "pdcr.cross_layer"),
    ("pdcr.layers=[{name: encoder.downs.2, num_samples: 0}]", "pdcr.layers[0].num_samples"),
    ("pdcr.layers=[{name: encoder.downs.2, weight: -1}]", "pdcr.layers[0].weight"),
    ("model.channels=[4, 0, 16, 32, 64]", "model.channels[1]"),
    ("model.dropout=[0, 0, 0, 0, 1]", "model.dropout[4]"),
    ("model.dropout=[0.1, 0.1]", "model.dropout"),
    ("data.num_classes=1", "data.num_classes"),
    ("data.phantom_val=0", "data.phantom_val"),
    ("seed=-1", "seed"),
])
def test_out_of_range_settings(capsys, tmp_path: Path, override: str, key: str):
    assert main([*train_args(tmp_path / "r"), "--set", override]) == 2
    line = assert_one_error_line(capsys, "vqseg train: error:")
    assert f"{key}=" in line or f"{key} " in line, line
    assert not (tmp_path / "r").exists()


def test_output_dir_below_a_file(capsys, tmp_path: Path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    assert main(train_args(blocker / "run")) == 2
    assert_one_error_line(capsys, f"output_dir={blocker / 'run'}", f"{blocker} is a file")
    assert blocker.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# 2. Splits checked for every dataset
# ---------------------------------------------------------------------------------------------


def cvc_args(root: Path, run: Path) -> list[str]:
    overrides = {"data.dataset": "cvc", "data.root": str(root), "data.num_classes": 2, "data.in_channels": 3,
                 "data.class_names": ["polyp"], "data.labeled_cases": 2, "train.image_size": 16}
    return train_args(run, **overrides)


@pytest.mark.parametrize("change, fragment", [
    (lambda s: "{train: [1, 2]", "not valid JSON"),
    (lambda s: {**s, "sequence_of_frame": {k: v for k, v in s["sequence_of_frame"].items() if k != "3"}},
     "frames [3] are missing from 'sequence_of_frame'"),
    (lambda s: {**s, "train": [*s["train"][:-1], "frame8"]}, "'train' must be a list of integer frame ids"),
    (lambda s: {**s, "sequence_of_frame": {**s["sequence_of_frame"], "x1": 1}}, "keys must be integer frame ids"),
    (lambda s: {**s, "test": [11, 12, 3]}, "frames [3] appear in more than one split"),
    (lambda s: {**s, "val": [9, 10, 9]}, "'val' lists a frame twice"),
])
def test_cvc_bad_splits(capsys, tmp_path: Path, change, fragment: str):
    root = tmp_path / "cvc"
    splits = write_cvc(root)
    changed = change(splits)
    (root / "splits.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    assert main(cvc_args(root, tmp_path / "r")) == 2
    assert_one_error_line(capsys, str(root / "splits.json"), fragment)
    assert not (tmp_path / "r").exists()


def test_acdc_labeled_order_shorter_than_labeled_cases(capsys, tiny_acdc: TinyACDC, tmp_path: Path):
    tiny_acdc.write_splits(labeled_order=[4, 2])
    overrides = {"data.dataset": "acdc", "data.root": str(tiny_acdc.root), "data.labeled_cases": 3}
    assert main(train_args(tmp_path / "r", **overrides)) == 2
    assert_one_error_line(capsys, "data.labeled_cases=3", "labeled_order lists only 2 patients")


# ---------------------------------------------------------------------------------------------
# 3. Run folders cannot be corrupted
# ---------------------------------------------------------------------------------------------


def test_fresh_train_into_a_used_folder_refuses(capsys, run_copy: Path):
    before = snapshot(run_copy)
    assert main(copy_args(run_copy)) == 2
    assert_one_error_line(capsys, f"output_dir={run_copy}", "already holds a run", "--resume", "--overwrite")
    assert snapshot(run_copy) == before


def test_overwrite_starts_clean(capsys, run_copy: Path):
    (run_copy / "eval_test.json").write_text("{}")  # scores of the old weights: must go
    (run_copy / "notes.txt").write_text("mine")  # not a run output: kept
    assert main(copy_args(run_copy, "--overwrite", **{"train.iterations": 2})) == 0
    assert not (run_copy / "eval_test.json").exists() and (run_copy / "notes.txt").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # two train records and one validation, none from the old run
    assert load_checkpoint(run_copy / "last.pt")["step"] == 2
    assert len(list((run_copy / "tb").iterdir())) == 1
    assert not list(run_copy.glob("*.lock")) and not list(run_copy.glob("*.tmp"))


def test_overwrite_that_fails_to_start_keeps_the_old_run(capsys, run_copy: Path, tmp_path: Path):
    before = snapshot(run_copy)
    bad_data = {"data.dataset": "acdc", "data.root": str(tmp_path / "missing")}
    assert main(copy_args(run_copy, "--overwrite", **bad_data)) == 2
    assert_one_error_line(capsys, "data.root")
    assert snapshot(run_copy) == before


def test_resume_and_overwrite_together(capsys, run_copy: Path):
    before = snapshot(run_copy)
    assert main(copy_args(run_copy, "--resume", "--overwrite")) == 2
    assert_one_error_line(capsys, "--resume", "--overwrite")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("overrides, keys", [
    ({"seed": 1}, ["seed (0 -> 1)"]),
    ({"train.iterations": 8}, ["train.iterations (4 -> 8)"]),
    ({"model.channels": [4, 8, 16, 32, 32]}, ["model.channels"]),
    ({"method.name": "mean_teacher"}, ["method.name ('supervised' -> 'mean_teacher')"]),
    ({"train.val_every": 1, "aug.flip": False}, ["aug.flip", "train.val_every"]),
])
def test_resume_with_changed_settings_refuses(capsys, run_copy: Path, overrides: dict, keys: list[str]):
    before = snapshot(run_copy)
    assert main(copy_args(run_copy, "--resume", **overrides)) == 2
    assert_one_error_line(capsys, "--resume", "other settings", *keys)
    assert snapshot(run_copy) == before  # config.yaml included: nothing is written before the checks


def test_resume_allows_settings_that_do_not_change_results(capsys, run_copy: Path):
    free = {"train.num_threads": 1, "train.log_every": 2, "eval.batch_size": 3}
    assert main(copy_args(run_copy, "--resume", **free)) == 0


class _Killed(KeyboardInterrupt):
    pass


def test_tensorboard_purges_steps_rerun_after_resume(capsys, tmp_path: Path, monkeypatch):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run = tmp_path / "run"
    original = Supervised.after_step

    def dies_in_step_6(self, step):
        original(self, step)
        if step == 5:  # steps 1-5 logged, step 4 checkpointed: step 5 will run again
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(Supervised, "after_step", dies_in_step_6)
        with pytest.raises(_Killed):
            main(train_args(run, **{"train.val_every": 2}))
    assert main([*train_args(run, **{"train.val_every": 2}), "--resume"]) == 0
    files = sorted((run / "tb").iterdir(), key=lambda p: p.stat().st_mtime)
    first, resumed = ([e for e in EventFileLoader(str(f)).Load()] for f in files)
    assert [e.step for e in first if e.summary.value and e.summary.value[0].tag == "train/loss"] == [1, 2, 3, 4, 5]
    # TensorBoard drops earlier events from this step on when it meets a START session log
    starts = [e.step for e in resumed if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [5]
    assert [e.step for e in resumed if e.summary.value and e.summary.value[0].tag == "train/loss"] == [5, 6]


def test_two_processes_cannot_share_a_run_folder(tmp_path: Path):
    """A real second ``vqseg train`` on the folder of a running one stops with one line naming the
    folder and the holder; the first run's files stay its own. Killing the holder (kill -9) frees
    the folder: the kernel drops the lock, the stale lock file blocks nobody."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "vqseg.cli"]
    first = subprocess.Popen(
        [*cmd, *train_args(run, **{"train.iterations": 100000, "train.val_every": 50, "seed": 1})],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        lock = run / "train.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().startswith("PID")):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = subprocess.run(
            [*cmd, *train_args(run, **{"seed": 2})], capture_output=True, text=True, timeout=120, env=env
        )
        assert first.poll() is None  # still training: the refusal was the lock's
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert lines[0].startswith("vqseg train: error:")
    assert str(run) in lines[0] and f"PID {first.pid}" in lines[0] and "in use" in lines[0]
    assert "seed: 1" in (run / "config.yaml").read_text()  # the second run wrote nothing
    # temporary files carry their writer's PID: the killed holder may leave one mid-write, the second run none
    assert all(f.name.endswith(f".{first.pid}.tmp") for f in run.glob("*.tmp"))
    # the holder is gone: a new run may take the folder (its stale lock file is reused)
    assert main(train_args(run, **{"train.iterations": 1}) + ["--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------
# 4. vqseg metrics scores only what is there
# ---------------------------------------------------------------------------------------------


def nifti(path: Path, data: np.ndarray, zooms: tuple[float, ...] = (1.0, 1.0, 1.0), dtype=np.uint8) -> str:
    image = nib.Nifti1Image(data.astype(dtype), np.eye(4))
    image.header.set_zooms(zooms)
    nib.save(image, str(path))
    return str(path)


def boxes(*labels: int) -> np.ndarray:
    """A 3D label map with one box per label, at fixed places (label k at rows 3k..3k+2)."""
    volume = np.zeros((20, 8, 3), np.uint8)
    for k in labels:
        volume[3 * (k - 1) : 3 * (k - 1) + 3, 2:6, :] = k
    return volume


def metrics_json(capsys, *args: str) -> dict:
    assert main(["metrics", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_metrics_class_in_neither_file_is_not_scored(capsys, tmp_path: Path):
    pred = nifti(tmp_path / "pred.nii.gz", boxes(1, 5))
    gt = nifti(tmp_path / "gt.nii.gz", boxes(1, 3))
    result = metrics_json(capsys, "--pred", pred, "--gt", gt)
    assert list(result["classes"]) == ["1", "3", "5"]  # 2 and 4 are in neither file
    assert [result["classes"][c]["dice"] for c in ("1", "3", "5")] == [1.0, 0.0, 0.0]
    assert result["mean"]["dice"] == pytest.approx(1 / 3)  # was 0.60 with classes 2 and 4 scored 1.0
    result = metrics_json(capsys, "--pred", pred, "--gt", gt, "--num-classes", "7")
    assert list(result["classes"]) == ["1", "3", "5"] and result["absent"] == [2, 4, 6]
    assert result["mean"]["dice"] == pytest.approx(1 / 3)


def test_metrics_refuses_an_intensity_image_as_prediction(capsys, tmp_path: Path):
    image = np.random.default_rng(0).integers(0, 1001, (20, 8, 3))
    pred = nifti(tmp_path / "image.nii.gz", image, dtype=np.int16)
    gt = nifti(tmp_path / "gt.nii.gz", boxes(1, 2))
    assert main(["metrics", "--pred", pred, "--gt", gt]) == 2
    assert_one_error_line(capsys, "vqseg metrics: error:", pred, "intensity image", "--num-classes")
    assert main(["metrics", "--pred", nifti(tmp_path / "k.nii.gz", np.arange(32).reshape(4, 8, 1)), "--gt",
                 nifti(tmp_path / "g.nii.gz", np.zeros((4, 8, 1)))]) == 0  # 32 values: still a label map
    capsys.readouterr()


@pytest.mark.parametrize("data, args, fragment", [
    (boxes(1, 3), ["--num-classes", "3"], "not a label map for --num-classes 3: labels span 0..3"),
    (boxes(1).astype(np.float32) * 0.5, [], "non-integer"),
])
def test_metrics_refuses_what_is_not_a_label_map(capsys, tmp_path: Path, data, args, fragment):
    pred = nifti(tmp_path / "pred.nii.gz", data, dtype=data.dtype)
    gt = nifti(tmp_path / "gt.nii.gz", boxes(1, 2))
    assert main(["metrics", "--pred", pred, "--gt", gt, *args]) == 2
    assert_one_error_line(capsys, "vqseg metrics: error:", pred, fragment)


def test_metrics_spacing_from_header_override_and_units(capsys, tmp_path: Path):
    gt_labels = boxes(1)
    pred_labels = np.roll(gt_labels, 2, axis=0)  # shifted 2 voxels along the first axis
    zooms = (2.5, 1.0, 1.0)
    pred, gt = nifti(tmp_path / "p.nii.gz", pred_labels, zooms), nifti(tmp_path / "g.nii.gz", gt_labels, zooms)
    header = metrics_json(capsys, "--pred", pred, "--gt", gt)
    assert header["units"] == "mm" and header["spacing"] == [2.5, 1.0, 1.0]
    assert header["classes"]["1"]["hd95"] == pytest.approx(5.0)  # 2 voxels x 2.5 mm
    given = metrics_json(capsys, "--pred", pred, "--gt", gt, "--spacing", "1", "1", "1")
    assert given["spacing"] == [1.0, 1.0, 1.0] and given["classes"]["1"]["hd95"] == pytest.approx(2.0)
    assert main(["metrics", "--pred", pred, "--gt", gt]) == 0
    assert "distances in mm, spacing 2.5 x 1 x 1" in capsys.readouterr().out

    for name, labels in (("p.h5", pred_labels), ("g.h5", gt_labels)):
        with h5py.File(tmp_path / name, "w") as f:
            f["label"] = labels
    voxels = metrics_json(capsys, "--pred", str(tmp_path / "p.h5"), "--gt", str(tmp_path / "g.h5"))
    assert voxels["units"] == "voxels" and voxels["spacing"] is None
    assert voxels["classes"]["1"]["hd95"] == pytest.approx(2.0)
    assert main(["metrics", "--pred", str(tmp_path / "p.h5"), "--gt", str(tmp_path / "g.h5")]) == 0
    assert "distances in voxels" in capsys.readouterr().out


def test_metrics_headers_that_disagree_or_bad_spacing(capsys, tmp_path: Path):
    pred = nifti(tmp_path / "p.nii.gz", boxes(1), (1.0, 1.0, 1.0))
    gt = nifti(tmp_path / "g.nii.gz", boxes(1), (2.5, 1.0, 1.0))
    assert main(["metrics", "--pred", pred, "--gt", gt]) == 2
    assert_one_error_line(capsys, "voxel spacing differs", pred, gt, "--spacing")
    assert main(["metrics", "--pred", pred, "--gt", gt, "--spacing", "1", "1"]) == 2
    assert_one_error_line(capsys, "--spacing", "one per axis")
