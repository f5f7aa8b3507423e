"""Inference at native resolution, run evaluation, checkpoint selection on validation, no test leak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyACDC, tiny_config
from torch import nn

import vqseg.data
import vqseg.data.acdc
import vqseg.data.phantom
import vqseg.engine.trainer as trainer
import vqseg.evaluation.evaluate as evaluate_module
from vqseg.config import ModelConfig
from vqseg.data.phantom import load_phantom_split
from vqseg.evaluation.evaluate import evaluate_run
from vqseg.inference import mean_dice, predict_volume, predict_volumes
from vqseg.io import load_checkpoint
from vqseg.models import build_model
from vqseg.run import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


class LevelClassifier(nn.Module):
    """Class c wherever the intensity is nearest c / 3; records the input sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []
        self.levels = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).view(1, 4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return -50 * (x - self.levels) ** 2


def test_predict_volume_returns_native_size_non_square():
    depth, height, width = 5, 37, 23
    image = np.zeros((depth, 1, height, width), np.float32)
    image[:, :, :, 12:] = 1.0  # right part class 3
    image[:, :, :15, :] = np.where(image[:, :, :15, :] > 0, 1.0, 1 / 3)  # top-left class 1
    model = LevelClassifier()
    pred = predict_volume(model, image, size=32, batch_size=2, device=torch.device("cpu"))
    assert pred.shape == (depth, height, width) and pred.dtype == np.uint8
    assert model.seen == [(2, 1, 32, 32), (2, 1, 32, 32), (1, 1, 32, 32)]  # resized, batched
    expected = np.rint(image[:, 0] * 3).astype(np.uint8)
    # away from the region borders the native-resolution prediction is exact
    assert (pred[:, :, 15:] == 3).all() and (pred[:, :12, :10] == 1).all() and (pred[:, 18:, :10] == 0).all()
    assert (pred == expected).mean() > 0.9


def test_predict_volumes_with_unet_restores_training_mode():
    model = build_model(ModelConfig(channels=[4, 8, 16, 32, 64], dropout=[0.0] * 5), 1, 4)
    model.train()
    volumes = load_phantom_split(tiny_config(**{"data.phantom_val": 6}), "val")
    preds = predict_volumes(model, volumes, size=32, batch_size=4, device=torch.device("cpu"))
    assert model.training
    assert [p.shape for p in preds] == [v.label.shape for v in volumes]
    assert all(p.max() < 4 for p in preds)


def test_mean_dice_is_mean_over_cases_and_foreground_classes():
    gt = np.array([[[0, 1, 2, 3]]], np.uint8)
    vol = vqseg.data.Volume("v", np.zeros((1, 1, 1, 4), np.float32), gt)
    pred = np.array([[[0, 1, 2, 2]]], np.uint8)  # class 1 perfect, class 2 Dice 2/3, class 3 missed
    assert mean_dice([pred, gt], [vol, vol], 4) == pytest.approx(((1 + 2 / 3 + 0) / 3 + 1) / 2)


# ---------------------------------------------------------------------------------------------
# evaluate_run
# ---------------------------------------------------------------------------------------------


def test_evaluate_run_writes_json_and_markdown(phantom_run: Path):
    summary = evaluate_run(phantom_run, "test", device="cpu")
    data = json.loads((phantom_run / "eval_test.json").read_text())
    assert data == json.loads(json.dumps(summary))
    best = load_checkpoint(phantom_run / "best.pt")
    assert data["split"] == "test" and data["checkpoint"] == "best" and data["units"] == "voxels"
    assert data["checkpoint_val_dice"] == best["val_dice"] and data["checkpoint_step"] == best["step"]
    assert data["num_volumes"] == 2  # data.phantom_test = 12 slices = 2 cases
    for view, extra in (("paper", {"dice_std"}), ("honest", {"dice_std", "missed", "spurious"})):
        per_class = data[view]["per_class"]
        assert list(per_class) == ["RV", "Myo", "LV"]
        for scores in per_class.values():
            assert {"dice", "jaccard", "hd95", "asd"} | extra == set(scores)
            assert 0 <= scores["dice"] <= 1
        assert {"dice", "jaccard", "hd95", "asd"} <= set(data[view]["mean"])
    markdown = (phantom_run / "eval_test.md").read_text()
    assert "test split, 2 cases" in markdown and f"step {best['step']}" in markdown
    for row in ("| RV |", "| Myo |", "| LV |", "| **mean** |", "HD95 (found)"):
        assert row in markdown


def test_evaluate_run_scores_the_predictions_it_makes(phantom_run: Path, monkeypatch):
    """Scores come from the loaded checkpoint's predictions on the requested split: here a
    predictor stand-in returns the ground truth with the RV erased in the first case."""
    seen = {}

    def fake_predict(model, volumes, how, device):
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["names"] = [v.name for v in volumes]
        preds = [v.label.copy() for v in volumes]
        preds[0][preds[0] == 1] = 0
        return preds

    monkeypatch.setattr(evaluate_module, "predict_cases", fake_predict)
    summary = evaluate_run(phantom_run, "test", checkpoint="last", device="cpu")
    last = load_checkpoint(phantom_run / "last.pt")
    assert all(torch.equal(seen["state"][k], last["predictor"][k]) for k in last["predictor"])
    assert seen["names"] == [v.name for v in load_phantom_split(tiny_config(), "test")]
    paper, honest = summary["paper"], summary["honest"]
    assert paper["per_class"]["RV"]["dice"] == pytest.approx(0.5)
    assert paper["per_class"]["Myo"]["dice"] == paper["per_class"]["LV"]["dice"] == 1.0
    assert paper["mean"]["dice"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert honest["per_class"]["RV"]["missed"] == 1 and honest["mean"]["missed"] == 1
    assert paper["per_class"]["RV"]["hd95"] == 0.0 and honest["per_class"]["RV"]["hd95"] == 0.0
    assert summary["checkpoint"] == "last" and summary["checkpoint_step"] == 6
    assert (phantom_run / "eval_test.json").is_file()


def test_evaluate_val_split_reproduces_validation_score(phantom_run: Path):
    summary = evaluate_run(phantom_run, "val", checkpoint="last", device="cpu")
    records = [json.loads(line) for line in (phantom_run / "metrics.jsonl").read_text().splitlines()]
    last_val = [r["val_dice"] for r in records if r.get("step") == 6 and "val_dice" in r]
    assert summary["paper"]["mean"]["dice"] == pytest.approx(last_val[0], abs=1e-9)
    assert (phantom_run / "eval_val.json").is_file()


def test_evaluate_rejects_non_run_folder(tmp_path):
    from vqseg.config import ConfigError

    with pytest.raises(ConfigError, match="config.yaml"):
        evaluate_run(tmp_path, "test")


def test_checkpoint_selected_on_validation(tmp_path, monkeypatch):
    """best.pt is the predictor of the step with the highest validation score, and evaluation uses it."""
    scores = iter([0.2, 0.7, 0.5])
    snapshots = {}

    def scripted_validate(cfg, method, data, device):
        step = 2 * (len(snapshots) + 1)
        snapshots[step] = {k: v.clone() for k, v in method.predictor().state_dict().items()}
        return next(scores)

    monkeypatch.setattr(trainer, "_validate", scripted_validate)
    run = trainer.train(tiny_config(**{"output_dir": str(tmp_path / "run"), "train.val_every": 2}))
    monkeypatch.undo()
    assert sorted(snapshots) == [2, 4, 6]

    best = load_checkpoint(run / "best.pt")
    assert best["step"] == 4 and best["val_dice"] == 0.7
    assert all(torch.equal(best["predictor"][k], snapshots[4][k]) for k in snapshots[4])
    last = load_checkpoint(run / "last.pt")
    assert any(not torch.equal(best["predictor"][k], last["predictor"][k]) for k in last["predictor"])
    _, predictor, _ = load_run(run, "best")
    assert all(torch.equal(predictor.state_dict()[k], snapshots[4][k]) for k in snapshots[4])

    summary = evaluate_run(run, "test", device="cpu")
    assert summary["checkpoint_step"] == 4 and summary["checkpoint_val_dice"] == 0.7
    assert json.loads((run / "summary.json").read_text())["best_step"] == 4


# ---------------------------------------------------------------------------------------------
# The test split stays out of training
# ---------------------------------------------------------------------------------------------


def test_training_never_loads_the_test_split_phantom(tmp_path, monkeypatch):
    def forbidden(cfg, split):
        raise AssertionError(f"training loaded split {split!r} through load_split")

    original = vqseg.data.phantom.load_phantom_split
    requested = []

    def guarded(cfg, split):
        requested.append(split)
        if split == "test":
            raise AssertionError("training generated the test phantoms")
        return original(cfg, split)

    monkeypatch.setattr(vqseg.data, "load_split", forbidden)
    monkeypatch.setattr(vqseg.data.phantom, "load_phantom_split", guarded)
    trainer.train(tiny_config(**{"output_dir": str(tmp_path / "run"), "train.iterations": 2, "train.val_every": 2}))
    assert requested == ["val"]


def test_training_never_reads_test_volumes_acdc(tiny_acdc: TinyACDC, tmp_path, monkeypatch):
    original = vqseg.data.acdc.read_h5_volume
    read: list[str] = []

    def recording(path, num_classes=4):
        read.append(Path(path).stem)
        return original(path, num_classes)

    monkeypatch.setattr(vqseg.data.acdc, "read_h5_volume", recording)
    monkeypatch.setattr(vqseg.data, "load_split", lambda cfg, split: pytest.fail(f"load_split({split!r})"))
    cfg = tiny_config(
        **{
            "data.dataset": "acdc",
            "data.root": str(tiny_acdc.root),
            "data.labeled_cases": 2,
            "output_dir": str(tmp_path / "run"),
            "train.iterations": 2,
            "train.val_every": 2,
        }
    )
    trainer.train(cfg)
    expected = {s for p in tiny_acdc.splits["train"] + tiny_acdc.splits["val"] for s in tiny_acdc.files[p]}
    assert set(read) == expected  # every training and validation volume, no test volume
    assert not {s for p in tiny_acdc.splits["test"] for s in tiny_acdc.files[p]} & set(read)


def test_config_disagreeing_with_dataset_is_rejected_or_evaluable(tmp_path):
    from vqseg.config import ConfigError
    from vqseg.data import DataError

    cfg = tiny_config(**{"output_dir": str(tmp_path / "run"), "train.iterations": 1, "data.num_classes": 3})
    try:
        run = trainer.train(cfg)
    except (ConfigError, DataError):
        return  # rejected at start: fine
    evaluate_run(run, "test", device="cpu")  # otherwise evaluation must rebuild the trained network


# ---------------------------------------------------------------------------------------------
# The per-case CSV contract (read by the benchmark statistics)
# ---------------------------------------------------------------------------------------------


def test_per_case_csv_contract(phantom_run: Path, monkeypatch):
    """Header then exactly these columns; one row per case x foreground class; undefined distances empty."""
    import csv

    def fake_predict(model, volumes, how, device):
        preds = [v.label.copy() for v in volumes]
        preds[1][preds[1] == 3] = 0  # LV missed in the second case
        return preds

    monkeypatch.setattr(evaluate_module, "predict_cases", fake_predict)
    evaluate_run(phantom_run, "test", device="cpu")
    lines = (phantom_run / "eval_test.csv").read_text().splitlines()
    assert lines[0] == "case,class,dice,jaccard,hd95,asd,missed,units"
    rows = list(csv.DictReader(lines))
    names = [v.name for v in load_phantom_split(tiny_config(), "test")]
    assert [(r["case"], r["class"]) for r in rows] == [(n, c) for n in names for c in ("RV", "Myo", "LV")]
    assert {r["units"] for r in rows} == {"voxels"}
    missed = rows[5]
    assert missed["missed"] == "1" and missed["dice"] == "0.0" and missed["hd95"] == "" and missed["asd"] == ""
    assert all(r["missed"] == "0" and float(r["dice"]) == 1.0 and float(r["hd95"]) == 0.0 for r in rows[:5])


def test_spacing_option_gives_mm(phantom_run: Path):
    summary = evaluate_run(phantom_run, "test", device="cpu", spacing=[5.0, 1.5, 1.5])
    assert summary["units"] == "mm"
    assert "distances in mm" in (phantom_run / "eval_test.md").read_text()
    assert (phantom_run / "eval_test.csv").read_text().splitlines()[1].endswith(",mm")
