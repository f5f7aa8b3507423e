"""Patch mode end to end (``train.patch_size``): every method trains and evaluates on 3D patches
(unet3d) and on 2D patches of the native slices (the 2D U-Net); the trainer's patch streams
(shapes, labels, nnU-Net's foreground share, unlabelled patches from unlabelled cases, exact
resume); padding of cases smaller than the patch; validation and ``evaluate`` by sliding windows
on each case's own grid, also through a target spacing; the one-line refusals of what patch mode
cannot do; and resize mode left as it was."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  (the first optimiser imports it lazily, ~1.7 s: paid at collection, not by a test)
import yaml
from conftest import REPO, tiny_config, tiny_overrides
from own_data_builders import write_image_folder, write_nnunet
from test_cli import assert_one_error_line, sets
from test_engine import _interrupt_then_resume, read_jsonl, train_records

import vqseg.inference as inference
import vqseg.sliding_window as sliding_window
from vqseg.cli import main
from vqseg.config import load_config
from vqseg.data import load_training_data
from vqseg.data.patches import PatchSampler
from vqseg.data.prepare import prepare
from vqseg.engine.trainer import train
from vqseg.io import load_checkpoint
from vqseg.methods import method_class
from vqseg.methods.mean_teacher import MeanTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "supervised": {},
    "mean_teacher": {},
    "unimatch": {},
    # pre-training validated after step 1, self-training from step 1: both stages in two steps
    "bcp": {"method.pretrain_iterations": 1, "train.val_every": 1},
    "cps": {},
    "vqseg": {"method.foundation": "none", "method.codebook_size": 64},
}
MODES = {
    "3d": {"model.name": "unet3d", "model.channels": [4, 8], "model.dropout": [0, 0], "train.patch_size": [4, 16, 16]},
    "2d": {"model.channels": [4, 8, 16], "model.dropout": [0, 0, 0], "train.patch_size": [16, 16]},
}
PHANTOM = (6, 80, 72)  # every phantom case: D x H x W
SMALL = {"data.phantom_labeled": 6, "data.phantom_unlabeled": 6, "data.phantom_val": 6, "data.phantom_test": 6,
         "train.iterations": 2, "train.val_every": 2, "train.batch_size": 2, "train.unlabeled_batch_size": 2}


def patch_config(output_dir: Path, mode: str = "3d", **overrides: object):
    return tiny_config(**{**SMALL, **MODES[mode], "output_dir": str(output_dir), **overrides})


class Spies:
    """What inference did: every sliding-window pass (patch, image shape), every case predicted
    (its label's shape, the prediction's shape); the resize path refuses to run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.windows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.cases: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        mean_logits, predict_case = sliding_window._mean_logits, inference.predict_case

        def spy_windows(model, image, patch_size, *args, **kwargs):
            self.windows.append((tuple(patch_size), tuple(image.shape)))
            return mean_logits(model, image, patch_size, *args, **kwargs)

        def spy_case(model, volume, how, device):
            prediction = predict_case(model, volume, how, device)
            self.cases.append((tuple(volume.label.shape), tuple(prediction.shape)))
            return prediction

        def no_resize(*args, **kwargs):
            raise AssertionError("patch mode predicted through the resize path")

        monkeypatch.setattr(sliding_window, "_mean_logits", spy_windows)
        monkeypatch.setattr(inference, "predict_case", spy_case)
        monkeypatch.setattr(inference, "predict_volume", no_resize)

    def take(self) -> tuple[list, list]:
        windows, cases = self.windows, self.cases
        self.windows, self.cases = [], []
        return windows, cases


def record_batches(monkeypatch: pytest.MonkeyPatch, name: str) -> list:
    """The batches the trainer hands the method's training_step."""
    cls, seen = method_class(name), []
    original = cls.training_step

    def spy(self, batch, step):
        seen.append(batch)
        return original(self, batch, step)

    monkeypatch.setattr(cls, "training_step", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# Every method, both patch modes, end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_and_evaluates_in_patch_mode(name, mode, tmp_path, monkeypatch, capsys):
    """Two steps on patches of the training size, validation and ``evaluate`` by sliding windows of
    the patch over whole phantom cases, each prediction on its case's own grid; config.yaml records
    the patch and, for unet3d, the pooling the plan chose for it (in-plane only: 4 slices are too
    few to pool)."""
    patch = MODES[mode]["train.patch_size"]
    spies, batches = Spies(monkeypatch), record_batches(monkeypatch, name)
    run = train(patch_config(tmp_path / "run", mode, **{"method.name": name, **METHODS[name]}))

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["patch_size"] == patch
    if mode == "3d":
        assert saved["model"]["pool"] == [[1, 2, 2]] and saved["model"]["kernels"] == [[3, 3, 3], [3, 3, 3]]
    else:
        assert saved["model"]["pool"] == [] and saved["model"]["name"] == "unet"
    assert len(batches) == 2
    for batch in batches:
        assert batch.labeled.shape == (2, 1, *patch) and batch.labels.shape == (2, *patch)
        assert batch.labels.dtype == torch.long
        assert (batch.unlabeled is None) == (name == "supervised")
        assert batch.unlabeled is None or batch.unlabeled.shape == (2, 1, *patch)
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(0 <= r["val_dice"] <= 1 for r in records if "val_dice" in r)

    slices = PHANTOM[0] if mode == "2d" else 1
    windows, cases = spies.take()
    validations = 2 if name == "bcp" else 1
    image = (1, *PHANTOM) if mode == "3d" else (1, *PHANTOM[1:])
    assert windows == [(tuple(patch), image)] * slices * validations
    assert cases == [(PHANTOM, PHANTOM)] * validations

    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    windows, cases = spies.take()
    assert windows == [(tuple(patch), image)] * slices and cases == [(PHANTOM, PHANTOM)]
    assert json.loads((run / "eval_test.json").read_text())


# ---------------------------------------------------------------------------------------------
# The trainer's patch streams
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_trainer_streams_patches_a_third_on_foreground(mode, tmp_path, monkeypatch):
    """Labelled batches: train.batch_size patches of train.patch_size with their labels, the last
    two of six forced onto foreground (nnU-Net: B - round(0.67 B)); unlabelled batches: patches of
    the unlabelled cases, without labels; every patch a crop of its case at the recorded origin,
    at the data's own resolution (2D: one slice of a case)."""
    patch = MODES[mode]["train.patch_size"]
    drawn = []
    original = PatchSampler.next
    monkeypatch.setattr(PatchSampler, "next", lambda self: drawn.append((self, original(self))) or drawn[-1][1])
    batches = record_batches(monkeypatch, "mean_teacher")
    overrides = {"method.name": "mean_teacher", "data.phantom_labeled": 12, "data.phantom_unlabeled": 12,
                 "train.batch_size": 6, "train.unlabeled_batch_size": 3}
    cfg = patch_config(tmp_path / "run", mode, **overrides)
    train(cfg)
    data = load_training_data(load_config(tmp_path / "run" / "config.yaml"))
    assert len(data.labeled.images) == len(data.unlabeled.images) == 2

    def crop(case, origin):
        d, h, w = origin
        if mode == "3d":
            return torch.as_tensor(case[:, d : d + patch[0], h : h + patch[1], w : w + patch[2]])
        return torch.as_tensor(case[:, d, h : h + patch[0], w : w + patch[1]])

    assert len(drawn) == 4 and len(batches) == 2
    for step, batch in enumerate(batches):
        (lab_sampler, lab), (unl_sampler, unl) = drawn[2 * step : 2 * step + 2]
        assert lab_sampler.labels is not None and unl_sampler.labels is None and unl.labels is None
        assert batch.labeled.shape == (6, 1, *patch) and batch.labels.shape == (6, *patch)
        assert torch.equal(batch.labeled, lab.images) and torch.equal(batch.labels, lab.labels.long())
        assert lab.forced.tolist() == [False] * 4 + [True] * 2
        assert all(batch.labels[i].any() for i in (4, 5))
        for i in range(6):
            case, origin = int(lab.cases[i]), lab.origins[i].tolist()
            assert torch.equal(lab.images[i], crop(data.labeled.images[case], origin))
            assert torch.equal(lab.labels[i], crop(torch.as_tensor(data.labeled.labels[case])[None], origin)[0])
        assert batch.unlabeled.shape == (3, 1, *patch) and torch.equal(batch.unlabeled, unl.images)
        for i in range(3):
            case, origin = int(unl.cases[i]), unl.origins[i].tolist()
            assert torch.equal(unl.images[i], crop(data.unlabeled.images[case], origin))


def test_a_resumed_patch_run_continues_the_patch_stream_exactly(tmp_path, monkeypatch):
    """Killed during step 4 and resumed from the step-3 checkpoint: the same losses at every step
    (bit for bit), the same weights, teacher and patch generators as an uninterrupted run."""

    def cfg(name: str):
        return patch_config(tmp_path / name, **{"method.name": "mean_teacher", "train.iterations": 6,
                                                "train.val_every": 3, "data.phantom_val": 6})

    run_a = train(cfg("a"))
    run_b = _interrupt_then_resume(cfg("b"), MeanTeacher, monkeypatch)
    assert train_records(run_a / "metrics.jsonl") == train_records(run_b / "metrics.jsonl")
    steps_a, steps_b = ([r["step"] for r in read_jsonl(run / "metrics.jsonl")] for run in (run_a, run_b))
    assert steps_a == steps_b  # no step logged twice by the interrupted attempt
    a, b = load_checkpoint(run_a / "last.pt"), load_checkpoint(run_b / "last.pt")
    assert a["step"] == b["step"] == 6 and a["method"].keys() == b["method"].keys()
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert a["samplers"][0].keys() == {"labeled", "unlabeled"}
    for stream in ("labeled", "unlabeled"):
        assert torch.equal(a["samplers"][0][stream]["generator"], b["samplers"][0][stream]["generator"])


# ---------------------------------------------------------------------------------------------
# Cases smaller than the patch
# ---------------------------------------------------------------------------------------------

BIG = {"train.patch_size": [8, 96, 96], "model.name": "unet3d", "model.channels": [4, 8], "model.dropout": [0, 0]}


@pytest.mark.parametrize(
    "name",
    [
        "supervised",
        "mean_teacher",
    ],
)
def test_a_case_smaller_than_the_patch_is_padded_said_once_and_predicted_at_its_shape(name, tmp_path, monkeypatch,
                                                                                     capsys):
    """6 x 80 x 72 phantoms under an 8 x 96 x 96 patch: patches centred and padded (image 0, label
    background), one stderr line saying so, and validation returns each case's own 6 x 80 x 72."""
    spies, batches = Spies(monkeypatch), record_batches(monkeypatch, name)
    run = train(patch_config(tmp_path / "run", **{**BIG, "method.name": name}))
    notes = [line for line in capsys.readouterr().err.splitlines() if "smaller than the patch" in line]
    data = load_training_data(load_config(run / "config.yaml"))
    (case,), (label,) = data.labeled.images, data.labeled.labels
    image, target = torch.zeros(1, 8, 96, 96), torch.zeros(8, 96, 96, dtype=torch.long)
    image[:, 1:7, 8:88, 12:84] = torch.as_tensor(case)  # centred: (8 - 6) // 2, (96 - 80) // 2, (96 - 72) // 2
    target[1:7, 8:88, 12:84] = torch.as_tensor(label).long()
    for batch in batches:
        assert batch.labeled.shape == (2, 1, 8, 96, 96)
        assert all(torch.equal(x, image) for x in batch.labeled) and all(torch.equal(y, target) for y in batch.labels)
    windows, cases = spies.take()
    assert windows == [((8, 96, 96), (1, *PHANTOM))] and cases == [(PHANTOM, PHANTOM)]
    assert notes == [
        "vqseg: 1 of 1 case(s) are smaller than the patch 8 x 96 x 96 along some axis: their patches are padded "
        "(image 0, label background)"
    ]


# ---------------------------------------------------------------------------------------------
# A dataset with spacing, resampled to a target spacing and predicted back on each case's grid
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnunet_prepared(tmp_path_factory) -> Path:
    """Seven 14 x 12 x 4 NIfTI cases of 1.4 x 1.5 x 6 mm (slices along the last axis), one unlabelled."""
    root = write_nnunet(tmp_path_factory.mktemp("nnunet") / "data", count=6, unlabeled=1)
    prepare(root, labeled="100%", val="1", test="1")
    return root


TARGET = {  # half again as coarse in-plane: 14 x 12 at 1.4 x 1.5 mm -> 11 x 10 at 1.75 x 1.875 mm
    "3d": {"train.patch_size": [4, 8, 8], "data.target_spacing": [6.0, 1.75, 1.875], "model.name": "unet3d",
           "model.channels": [4, 8], "model.dropout": [0, 0]},
    "2d": {"train.patch_size": [8, 8], "data.target_spacing": [1.75, 1.875], "model.channels": [4, 8, 16],
           "model.dropout": [0, 0, 0]},
}


@pytest.mark.parametrize("mode", sorted(TARGET))
def test_predictions_at_a_target_spacing_come_back_on_each_cases_grid(mode, nnunet_prepared, tmp_path, monkeypatch,
                                                                    capsys):
    spies, batches = Spies(monkeypatch), record_batches(monkeypatch, "supervised")
    calls = []
    probabilities = inference.sliding_window_probabilities
    def spy(model, image, *args, **kwargs):
        calls.append(tuple(image.shape))
        return probabilities(model, image, *args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_probabilities", spy)
    monkeypatch.setattr(inference, "predict_volume_windows", lambda *a, **k: pytest.fail("target spacing ignored"))
    overrides = {"data.dataset": "prepared", "data.root": str(nnunet_prepared), "method.name": "supervised",
                 "output_dir": str(tmp_path / "run"), **{k: v for k, v in SMALL.items() if not k.startswith("data.")},
                 **TARGET[mode]}
    run = train(tiny_config(**overrides))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["target_spacing"] == TARGET[mode]["data.target_spacing"]
    patch = TARGET[mode]["train.patch_size"]
    assert batches[0].labeled.shape == (2, 1, *patch)
    resampled = [(1, 4, 11, 10)] if mode == "3d" else [(1, 11, 10)] * 4
    own = (4, 14, 12)  # D x H x W on the case's own grid
    windows, cases = spies.take()
    assert calls == resampled and [w for _, w in windows] == resampled and cases == [(own, own)]
    calls.clear()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    windows, cases = spies.take()
    assert calls == resampled and cases == [(own, own)]


# ---------------------------------------------------------------------------------------------
# Refusals: one line through the command line, nothing written
# ---------------------------------------------------------------------------------------------

REFUSALS = {
    "frozen_encoder": ({"model.name": "litemedsam", "model.tiny": True, "train.patch_size": [16, 16]},
                       ["train.patch_size=[16, 16]", "model.name=litemedsam"]),
    "vqseg_pfa": (
        {**MODES["3d"], "method.name": "vqseg", "method.foundation": "litemedsam", "method.codebook_size": 64},
        ["method.pfa", "train.patch_size=[4, 16, 16]"],
    ),
    "3d_patch_on_unet": ({"train.patch_size": [4, 16, 16]}, ["train.patch_size=[4, 16, 16]", "model.name=unet3d"]),
    "unet3d_without_patch": ({"model.name": "unet3d", "model.channels": [4, 8], "model.dropout": [0, 0]},
                             ["train.patch_size=[]", "unet3d"]),
    # 2 x 10 values x 4 bytes x (4 x 8 x 64 x 64 + 8 x 4 x 32 x 32) voxel-channels = 12.5 MB
    "over_the_memory_budget": ({**MODES["3d"], "train.patch_size": [8, 64, 64], "train.memory_budget_mb": 10},
                               ["train.patch_size=[8, 64, 64]", "about 12 MB", "memory budget of 10 MB"]),
}


def assert_refused(capsys, out: Path, args: list[str], fragments: list[str]) -> None:
    capsys.readouterr()
    assert main(args) == 2
    assert_one_error_line(capsys, "vqseg train: error:", *fragments)
    assert not out.exists()  # not even the folder: the lock's folder is removed again


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_patch_mode_cannot_do_is_refused_in_one_line(case, tmp_path, capsys):
    overrides, fragments = REFUSALS[case]
    out = tmp_path / "run"
    assert_refused(capsys, out, ["train", *sets(tiny_overrides(**{**SMALL, "output_dir": str(out), **overrides}))],
                   fragments)


def test_a_3d_patch_on_a_2d_dataset_is_refused_in_one_line(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pictures", count=8, shape=(20, 18))
    prepare(root, labeled="100%", val="2", test="2")
    out = tmp_path / "run"
    overrides = {**SMALL, **MODES["3d"], "data.dataset": "prepared", "data.root": str(root), "output_dir": str(out)}
    overrides = {k: v for k, v in overrides.items() if not k.startswith("data.phantom")}
    assert_refused(capsys, out, ["train", *sets(tiny_overrides(**overrides))],
                   ["train.patch_size has 3 values", "is 2D", "give 2 sizes"])


# ---------------------------------------------------------------------------------------------
# Resize mode is unchanged
# ---------------------------------------------------------------------------------------------


def test_resize_mode_is_what_an_explicit_empty_patch_gives(tmp_path):
    """A resize-mode run and the same run with train.patch_size=[] given on the command line log the
    same losses bit for bit; the committed cross-commit check (benchmarks/bit_identity.py) covers
    every method in resize mode against earlier source trees."""
    runs = {}
    for name, extra in (("default", []), ("empty", ["--set", "train.patch_size=[]"])):
        runs[name] = tmp_path / name
        assert main(["train", *sets(tiny_overrides(**SMALL, output_dir=str(runs[name]))), *extra]) == 0
    assert yaml.safe_load((runs["empty"] / "config.yaml").read_text())["train"]["patch_size"] == []
    first, second = (train_records(runs[n] / "metrics.jsonl") for n in ("default", "empty"))
    assert len(first) == 2 and first == second

    script = REPO / "benchmarks" / "bit_identity.py"
    spec = importlib.util.spec_from_file_location("bit_identity", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.run) and callable(module.compare)
    assert {f"unet_{name}" for name in METHODS} <= set(module.runs())
