"""The training engine's recipe, line by line, and the inference recipe of validation and evaluation.

Spies record what the loop does at each step (which step number each hook gets, in which order,
which batch each stream feeds, which modes the networks are in, which gradient and learning rate
each parameter is stepped with, which network validation scores and which weights ``best.pt``
keeps) and compare it with the recipe computed here from first principles. Any change to a recipe
line (an off-by-one in the schedule, the EMA hook before the optimiser step, a missing
``zero_grad``, the wrong stream, validation of the student instead of the predictor...) fails here.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn
from torch.nn import functional as F

import vqseg.engine.trainer as trainer
import vqseg.evaluation.evaluate as evaluate_module
import vqseg.models.pretrained as pretrained
from vqseg.config import TrainConfig
from vqseg.data import Volume, load_training_data
from vqseg.data.phantom import load_phantom_split
from vqseg.engine.distributed import DistInfo
from vqseg.engine.sampler import InfiniteSampler
from vqseg.evaluation.evaluate import evaluate_run
from vqseg.inference import predict_probabilities, predict_volume, predict_volumes
from vqseg.io import load_checkpoint
from vqseg.methods.mean_teacher import MeanTeacher
from vqseg.run import build_run_method, load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters() if p.requires_grad]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _permutation_stream(size: int, seed: int, length: int) -> list[int]:
    """Successive torch.randperm draws of one seeded generator, concatenated."""
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < length:
        out += torch.randperm(size, generator=generator).tolist()
    return out[:length]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

ITERATIONS, VAL_EVERY, LOG_EVERY = 5, 3, 2  # 5 is a multiple of neither: the last step must still validate and log
LR, ENCODER_LR, POLY, MOMENTUM, WEIGHT_DECAY = 0.05, 0.002, 2.0, 0.8, 3e-4  # all off their defaults
LABELED_BATCH, UNLABELED_BATCH, SEED = 4, 2, 2


def _poly(base: float, step: int) -> float:
    """lr of the optimiser step numbered ``step`` (0-based): base (1 - step / T) ** power."""
    return base * (1 - step / ITERATIONS) ** POLY


@pytest.mark.parametrize("optimizer, amp", [("sgd", False), ("adamw", True)])
def test_training_loop_recipe(tmp_path, monkeypatch, optimizer: str, amp: bool):
    """Mean Teacher with its teacher as the predictor (so student and predictor differ) and the
    student's encoder as a fine-tuned pretrained backbone (so the encoder_lr group exists)."""
    cfg = tiny_config(
        **{
            "output_dir": str(tmp_path / "run"), "method.name": "mean_teacher", "seed": SEED,
            "train.iterations": ITERATIONS, "train.val_every": VAL_EVERY, "train.log_every": LOG_EVERY,
            "train.batch_size": LABELED_BATCH, "train.unlabeled_batch_size": UNLABELED_BATCH,
            "train.lr": LR, "train.encoder_lr": ENCODER_LR, "train.poly_power": POLY,
            "train.momentum": MOMENTUM, "train.weight_decay": WEIGHT_DECAY,
            "train.optimizer": optimizer, "train.amp": amp,
        }
    )
    events: list[tuple] = []
    steps: list[dict] = []  # what each training_step saw
    optim_steps: list[dict] = []  # what each optimiser step applied
    after: list[dict] = []  # what each after_step saw
    validations: list[dict] = []
    seen: dict = {}

    def backbones(module):
        return [module.student.encoder] if hasattr(module, "student") else []

    monkeypatch.setattr(pretrained, "pretrained_backbones", backbones)
    monkeypatch.setattr(MeanTeacher, "predictor", lambda self: self.teacher)

    original_prepare = MeanTeacher.prepare

    def prepare(self, data):
        seen["data"], seen["method"] = data, self
        return original_prepare(self, data)

    original_step = MeanTeacher.training_step

    def training_step(self, batch, step):
        events.append(("train", step))
        record = {
            "step": step,
            "modes": (self.training, self.student.training, self.teacher.training),
            "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
            "batch": batch,
            "params": _trainable(self),
        }
        out = original_step(self, batch, step)
        trainable = [p for p in self.parameters() if p.requires_grad]
        record["grads"] = torch.autograd.grad(out.loss, trainable, retain_graph=True, allow_unused=True)
        record["trainable"] = trainable
        steps.append(record)
        return out

    original_after = MeanTeacher.after_step

    def after_step(self, step):
        events.append(("after_step", step))
        after.append({"step": step, "params": _trainable(self)})
        original_after(self, step)

    def after_validation(self, step, score):
        events.append(("after_validation", step))
        validations[-1].update(step=step, score=score, predictor=_state(self.teacher))

    original_make = trainer.make_optimizer

    def make_optimizer(cfg_, params):
        opt = original_make(cfg_, params)
        inner = opt.step

        def step(self_, *args, **kwargs):
            events.append(("optimizer",))
            optim_steps.append({
                "grads": {id(p): None if p.grad is None else p.grad.clone()
                          for g in opt.param_groups for p in g["params"]},
                "lr": {id(p): g["lr"] for g in opt.param_groups for p in g["params"]},
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            })
            return inner(*args, **kwargs)

        opt.step = types.MethodType(step, opt)  # a bound method, as the lr scheduler expects
        seen["optimizer"] = opt
        return opt

    original_predict = trainer.predict_cases

    def spy_predict(model, volumes, how, device):
        events.append(("validate",))
        method = seen["method"]
        validations.append({"model": model, "names": [v.name for v in volumes], "size": how.image_size,
                            "amp": how.amp, "batch": how.batch_size, "student_mode": method.student.training})
        return original_predict(model, volumes, how, device)

    monkeypatch.setattr(MeanTeacher, "prepare", prepare)
    monkeypatch.setattr(MeanTeacher, "training_step", training_step)
    monkeypatch.setattr(MeanTeacher, "after_step", after_step)
    monkeypatch.setattr(MeanTeacher, "after_validation", after_validation)
    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    monkeypatch.setattr(trainer, "predict_cases", spy_predict)
    run = trainer.train(cfg)
    monkeypatch.undo()
    method, data = seen["method"], seen["data"]

    # 1. Order and numbering: step k is trained, stepped, then after_step(k); validation after steps
    #    3 and 5 (done counts), then after_validation(done).
    expected: list[tuple] = []
    for k in range(ITERATIONS):
        expected += [("train", k), ("optimizer",), ("after_step", k)]
        if (k + 1) % VAL_EVERY == 0 or k + 1 == ITERATIONS:
            expected += [("validate",), ("after_validation", k + 1)]
    assert events == expected

    # 2. Modes: every step trains the method and its student with the EMA teacher in eval mode,
    #    also the steps after a validation; autocast exactly when train.amp.
    assert [s["modes"] for s in steps] == [(True, True, False)] * ITERATIONS
    assert [s["autocast"][0] for s in steps] == [amp] * ITERATIONS
    assert not amp or all(s["autocast"][1] == torch.bfloat16 for s in steps)

    # 3. Streams: labelled batches of train.batch_size from the labelled slices (images with their
    #    own labels), unlabelled batches of train.unlabeled_batch_size from the unlabelled slices,
    #    each from its own seeded permutation stream.
    lab_stream = _permutation_stream(len(data.labeled), SEED * 1000, LABELED_BATCH * ITERATIONS)
    unl_stream = _permutation_stream(len(data.unlabeled), SEED * 1000 + 500, UNLABELED_BATCH * ITERATIONS)
    for k, s in enumerate(steps):
        b = s["batch"]
        li, ui = b.labeled_index.tolist(), b.unlabeled_index.tolist()
        assert li == lab_stream[k * LABELED_BATCH : (k + 1) * LABELED_BATCH]
        assert ui == unl_stream[k * UNLABELED_BATCH : (k + 1) * UNLABELED_BATCH]
        assert torch.equal(b.labeled, data.labeled.images[li])
        assert b.labels.dtype == torch.int64 and torch.equal(b.labels, data.labeled.labels[li].long())
        assert torch.equal(b.unlabeled, data.unlabeled.images[ui])
    assert not torch.equal(data.labeled.images[:2], data.unlabeled.images[:2])  # the two sets differ

    # 4. The optimiser: its kind and hyper-parameters, each step on exactly this step's loss gradient
    #    (zeroed before, not scaled, not clipped), each parameter at its group's poly-scheduled lr.
    opt = seen["optimizer"]
    assert type(opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    backbone = {id(p) for p in method.student.encoder.parameters()}
    trainable = steps[0]["trainable"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert not {id(p) for p in method.teacher.parameters()} & {id(p) for p in trainable}  # the teacher is not trained
    assert any(id(p) in backbone for p in trainable) and any(id(p) not in backbone for p in trainable)
    for k, (s, o) in enumerate(zip(steps, optim_steps, strict=True)):
        for group in o["groups"]:
            assert group["weight_decay"] == WEIGHT_DECAY
            if optimizer == "sgd":
                assert group["momentum"] == MOMENTUM and not group["nesterov"] and group["dampening"] == 0
        for p, grad in zip(s["trainable"], s["grads"]):
            base = ENCODER_LR if id(p) in backbone else LR
            assert o["lr"][id(p)] == pytest.approx(_poly(base, k), rel=1e-12, abs=0)
            applied = o["grads"][id(p)]
            if grad is None:
                assert applied is None or not applied.any()
            else:
                torch.testing.assert_close(applied, grad, rtol=1e-5, atol=1e-7)

    # 5. after_step(k) sees the weights the optimiser step k produced, which step k + 1 trains from.
    for k in range(ITERATIONS - 1):
        assert all(torch.equal(a, b) for a, b in zip(after[k]["params"], steps[k + 1]["params"]))
        assert not all(torch.equal(a, b) for a, b in zip(after[k]["params"], steps[k]["params"]))

    # 6. Validation: the predictor (here the teacher) on the validation cases at the training size,
    #    with the run's AMP setting, the student still in train mode; after_validation gets (done, score).
    val_names = [v.name for v in data.val]
    assert val_names == [v.name for v in load_phantom_split(cfg, "val")]
    for v in validations:
        assert v["model"] is method.teacher and v["names"] == val_names
        assert v["size"] == cfg.train.image_size and v["batch"] == cfg.eval.batch_size
        assert v["amp"] == amp and v["student_mode"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_records = [r for r in records if "val_dice" in r]
    assert [(r["step"], r["val_dice"]) for r in val_records] == [(v["step"], v["score"]) for v in validations]
    assert [v["step"] for v in validations] == [3, 5]

    # 7. Logging every log_every steps and at the last; the logged lr is the main group's, after the step.
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 5]
    for r in train_records:
        assert r["lr"] == pytest.approx(_poly(LR, r["step"]), rel=1e-12, abs=1e-15)

    # 8. best.pt holds the predictor's weights at the best validation, last.pt the final state.
    best_val = max(validations, key=lambda v: v["score"])
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == best_val["step"] and best["val_dice"] == best_val["score"]
    assert _same_state(best["predictor"], best_val["predictor"])
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == ITERATIONS and last["best"] == {"val_dice": best_val["score"], "step": best_val["step"]}
    assert _same_state(last["predictor"], _state(method.teacher))
    assert _same_state(last["method"], _state(method))
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best_step"], summary["best_val_dice"]) == (best_val["step"], best_val["score"])


def test_supervised_run_has_no_unlabeled_stream(monkeypatch, tmp_path):
    """A labelled-only method gets labelled batches only, and its checkpoint holds one stream."""
    from vqseg.methods.base import Supervised

    batches = []
    original = Supervised.training_step
    monkeypatch.setattr(Supervised, "training_step", lambda self, b, s: (batches.append(b), original(self, b, s))[1])
    cfg = tiny_config(**{"output_dir": str(tmp_path / "run"), "train.iterations": 2, "train.val_every": 2})
    run = trainer.train(cfg)
    assert len(batches) == 2 and all(b.unlabeled is None and b.unlabeled_index is None for b in batches)
    assert list(load_checkpoint(run / "last.pt")["samplers"][0]) == ["labeled"]


def test_streams_draw_each_set_from_its_own_sampler():
    cfg = tiny_config(**{"seed": 3, "train.batch_size": 4, "train.unlabeled_batch_size": 2})
    data = load_training_data(cfg)
    info = DistInfo()
    streams = trainer.Streams.for_rank(cfg, data, True, info)
    method = build_run_method(cfg, 1, 4)
    method.prepare(data)
    lab = InfiniteSampler(len(data.labeled), 4, 3000)
    unl = InfiniteSampler(len(data.unlabeled), 2, 3500)
    for _ in range(3):
        batch = streams.next_batch(data, method, torch.device("cpu"))
        li, ui = lab.next(), unl.next()
        assert torch.equal(batch.labeled_index, li) and torch.equal(batch.unlabeled_index, ui)
        assert torch.equal(batch.labeled, data.labeled.images[li])
        assert torch.equal(batch.labels, data.labeled.labels[li].long())
        assert torch.equal(batch.unlabeled, data.unlabeled.images[ui])
    assert trainer.Streams.for_rank(cfg, data, False, info).unlabeled is None


def test_frozen_encoder_batches_name_their_feature_bank_rows():
    """With a frozen encoder the bank holds the labelled slices' rows first, then the unlabelled
    ones: a labelled slice i is row i, an unlabelled slice j is row len(labelled) + j."""
    cfg = tiny_config(**{"model.name": "litemedsam", "model.encoder_mode": "frozen", "seed": 1,
                         "data.phantom_unlabeled": 12, "train.batch_size": 3, "train.unlabeled_batch_size": 5})
    data = load_training_data(cfg)
    assert len(data.labeled) != len(data.unlabeled)
    streams = trainer.Streams.for_rank(cfg, data, True, DistInfo())
    method = build_run_method(cfg, 1, 4)
    method.prepare(data)  # the bank: what Method.training_inputs points into
    for _ in range(2):
        batch = streams.next_batch(data, method, torch.device("cpu"))
        li, ui = batch.labeled_index, batch.unlabeled_index
        assert batch.labeled.shape[1] == batch.unlabeled.shape[1] == 1 + 4  # image + provenance channels
        assert torch.equal(batch.labeled[:, :1], data.labeled.images[li])
        assert torch.equal(batch.unlabeled[:, :1], data.unlabeled.images[ui])
        rows_l = batch.labeled[:, 1].flatten(1)
        rows_u = batch.unlabeled[:, 1].flatten(1)
        assert torch.equal(rows_l, li[:, None].float().expand_as(rows_l))
        assert torch.equal(rows_u, (ui + len(data.labeled))[:, None].float().expand_as(rows_u))


@pytest.mark.parametrize(
    "scores, best_step", [([0.2, 0.7, 0.5], 4), ([0.2, 0.7, 0.7], 4), ([0.6, 0.6, 0.6], 2), ([0.1, 0.2, 0.3], 6)]
)
def test_best_checkpoint_is_the_first_highest_validation(tmp_path, monkeypatch, scores, best_step):
    """A later tie does not replace the best (strictly greater only); the first validation always counts."""
    it = iter(scores)
    snapshots = {}

    def scripted(cfg, method, data, device):
        snapshots[2 * (len(snapshots) + 1)] = _state(method.predictor())
        return next(it)

    monkeypatch.setattr(trainer, "_validate", scripted)
    run = trainer.train(tiny_config(**{"output_dir": str(tmp_path / "run"), "train.val_every": 2}))
    best = load_checkpoint(run / "best.pt")
    assert best["step"] == best_step and best["val_dice"] == max(scores)
    assert _same_state(best["predictor"], snapshots[best_step])
    assert load_checkpoint(run / "last.pt")["best"] == {"val_dice": max(scores), "step": best_step}


class _Stop(KeyboardInterrupt):
    pass


def test_resume_keeps_the_best_so_far(tmp_path, monkeypatch):
    """Killed after step 4 (last.pt of step 2, best 0.9), resumed: the later, lower validations
    (0.1 at 4, 0.2 at 6) do not replace the best recorded before the interruption."""
    from vqseg.methods.base import Supervised

    cfg = tiny_config(**{"output_dir": str(tmp_path / "run"), "train.val_every": 2})
    scores = iter([0.9, 0.1, 0.2])
    monkeypatch.setattr(trainer, "_validate", lambda cfg_, method, data, device: next(scores))
    original = Supervised.after_step

    def stop_after_4th(self, step):
        original(self, step)
        if step == 3:
            raise _Stop

    with monkeypatch.context() as m:
        m.setattr(Supervised, "after_step", stop_after_4th)
        with pytest.raises(_Stop):
            trainer.train(cfg)
    run = Path(cfg.output_dir)
    assert load_checkpoint(run / "last.pt")["step"] == 2
    trainer.train(cfg, resume=True)
    assert next(scores, None) is None  # validated at 2, then at 4 and 6 after the resume
    assert load_checkpoint(run / "best.pt")["step"] == 2
    assert load_checkpoint(run / "last.pt")["best"] == {"val_dice": 0.9, "step": 2}
    assert json.loads((run / "summary.json").read_text())["best_step"] == 2


def test_validation_score_is_the_mean_over_cases_of_the_mean_over_foreground_classes():
    """3D Dice per case and foreground class, averaged over classes, then over the (here three) cases."""
    from vqseg.inference import mean_dice

    gt = np.zeros((2, 4, 4), np.uint8)
    gt[0, :2], gt[1, 2:] = 1, 2  # class 1: 8 voxels, class 2: 8 voxels
    vol = Volume("v", np.zeros((2, 1, 4, 4), np.float32), gt)
    half = gt.copy()
    half[0, 1] = 0  # class 1: 4 of 8 found -> Dice 2 * 4 / (4 + 8) = 2/3; class 2 perfect
    empty = np.zeros_like(gt)  # both classes missed: Dice 0
    assert mean_dice([gt, half, empty], [vol] * 3, 3) == pytest.approx((1 + (2 / 3 + 1) / 2 + 0) / 3)


def test_ssl4mis_training_defaults():
    """The ACDC protocol (SSL4MIS): SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly 0.9,
    30k iterations of 12 labelled + 12 unlabelled 256 x 256 slices, fp32."""
    t = TrainConfig()
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.poly_power) == ("sgd", 0.01, 0.9, 1e-4, 0.9)
    assert (t.iterations, t.batch_size, t.unlabeled_batch_size, t.image_size, t.amp) == (30000, 12, 12, 256, False)


# ---------------------------------------------------------------------------------------------
# Inference: resize to the training size, predict, softmax, resize the probabilities back, argmax
# ---------------------------------------------------------------------------------------------


class RecordingNet(nn.Module):
    """A fixed random convolution with batch norm; records its inputs, mode, grad and autocast state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv.weight.mul_(8.0)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
        self.seen: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append({
            "x": x.detach().clone(), "training": self.training, "grad": torch.is_grad_enabled(),
            "autocast": torch.is_autocast_enabled(x.device.type),
        })
        return self.bn(self.conv(x))


def test_slice_wise_inference_recipe():
    rng = np.random.default_rng(0)
    image = rng.random((3, 1, 37, 23), dtype=np.float32)  # D x C x H x W, non-square
    model = RecordingNet().eval()
    probs = predict_probabilities(model, image, size=16, batch_size=2, device=torch.device("cpu"))
    labels = predict_volume(model, image, size=16, batch_size=2, device=torch.device("cpu"))

    slices = torch.from_numpy(image)
    chunks = [slices[:2], slices[2:]]
    inputs = [F.interpolate(c, size=(16, 16), mode="bilinear", align_corners=False) for c in chunks]
    assert [s["x"].shape for s in model.seen[:2]] == [(2, 1, 16, 16), (1, 1, 16, 16)]
    for s, x in zip(model.seen[:2], inputs):
        torch.testing.assert_close(s["x"], x, rtol=0, atol=0)
    with torch.no_grad():
        expected = torch.cat([
            F.interpolate(model.bn(model.conv(x)).softmax(dim=1), size=(37, 23), mode="bilinear", align_corners=False)
            for x in inputs
        ])
    assert probs.shape == (3, 4, 37, 23) and probs.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(probs), expected, rtol=1e-5, atol=1e-6)
    # the argmax of the resized probabilities, which here differs from resizing logits or labels
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected.argmax(dim=1).numpy())
    logits_resized = torch.cat([
        F.interpolate(model.bn(model.conv(x)), size=(37, 23), mode="bilinear", align_corners=False) for x in inputs
    ]).detach()
    assert not torch.allclose(logits_resized.softmax(dim=1), expected, atol=1e-3)


@pytest.mark.parametrize("was_training, amp", [(True, False), (False, False), (True, True)])
def test_predict_volumes_predicts_in_eval_mode_without_grad_and_restores_the_mode(was_training: bool, amp: bool):
    model = RecordingNet().train(was_training)
    volumes = [Volume(f"v{i}", np.random.default_rng(i).random((2, 1, 20, 24), dtype=np.float32),
                      np.zeros((2, 20, 24), np.uint8)) for i in range(2)]
    before = _state(model)
    preds = predict_volumes(model, volumes, size=16, batch_size=8, device=torch.device("cpu"), amp=amp)
    assert [p.shape for p in preds] == [(2, 20, 24)] * 2
    assert len(model.seen) == 2
    assert all(not s["training"] and not s["grad"] and s["autocast"] == amp for s in model.seen)
    assert model.training == was_training and model.bn.training == was_training
    assert _same_state(before, _state(model))  # batch-norm statistics untouched by prediction


# ---------------------------------------------------------------------------------------------
# Evaluation: which split, which checkpoint, which spacing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [None, "val", "test"])
def test_evaluate_scores_the_requested_split_by_default_the_test_split_with_the_best_checkpoint(
    phantom_run: Path, monkeypatch, split: str | None
):
    seen = {}
    original = evaluate_module.predict_cases

    def spy(model, volumes, how, device):
        seen.update(state=_state(model), names=[v.name for v in volumes], size=how.image_size, batch=how.batch_size)
        return original(model, volumes, how, device)

    monkeypatch.setattr(evaluate_module, "predict_cases", spy)
    summary = evaluate_run(phantom_run, device="cpu", **({} if split is None else {"split": split}))
    cfg = tiny_config()
    best = load_checkpoint(phantom_run / "best.pt")
    expected_split = split or "test"
    assert summary["split"] == expected_split and summary["checkpoint"] == "best"
    assert seen["names"] == [v.name for v in load_phantom_split(cfg, expected_split)]
    assert summary["num_volumes"] == len(seen["names"])
    assert seen["size"] == cfg.train.image_size and seen["batch"] == cfg.eval.batch_size
    assert _same_state(seen["state"], best["predictor"])
    _, predictor, state = load_run(phantom_run)
    assert state["step"] == best["step"] and _same_state(_state(predictor), best["predictor"])


def test_spacing_precedence(phantom_run: Path, monkeypatch):
    """--spacing, else eval.spacing of the run's config, else each case's header, else voxels/pixels."""
    header = Volume("h", np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8), spacing=(2.0, 1.0, 1.0))
    plain3d = Volume("p", np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8))
    plain2d = Volume("q", np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 4, 4), np.uint8))
    assert evaluate_module._case_spacing(header, [5.0, 1.5, 1.5]) == ((5.0, 1.5, 1.5), "mm")
    assert evaluate_module._case_spacing(header, None) == ((2.0, 1.0, 1.0), "mm")
    assert evaluate_module._case_spacing(plain3d, None) == (None, "voxels")
    assert evaluate_module._case_spacing(plain2d, None) == (None, "pixels")

    original = evaluate_module.load_run

    def with_config_spacing(run_dir, checkpoint="best"):
        cfg, predictor, state = original(run_dir, checkpoint)
        cfg.eval.spacing = [10.0, 10.0, 10.0]
        return cfg, predictor, state

    def shifted_truth(model, volumes, how, device):
        return [np.roll(v.label, 1, axis=-1) for v in volumes]  # every boundary one voxel off

    monkeypatch.setattr(evaluate_module, "load_run", with_config_spacing)
    monkeypatch.setattr(evaluate_module, "predict_cases", shifted_truth)
    voxels = evaluate_run(phantom_run, "test", device="cpu", spacing=[1.0, 1.0, 1.0])
    config = evaluate_run(phantom_run, "test", device="cpu")
    assert voxels["units"] == config["units"] == "mm"
    hd_voxels, hd_config = voxels["paper"]["mean"]["hd95"], config["paper"]["mean"]["hd95"]
    assert hd_voxels > 0 and hd_config == pytest.approx(10 * hd_voxels)


class BandNet(nn.Module):
    """Ignores intensities: class c is most likely on the c-th vertical quarter of the training grid."""

    def __init__(self, size: int) -> None:
        super().__init__()
        band = torch.arange(size) * 4 // size
        self.logits = 6.0 * F.one_hot(band, 4).T.float()[None, :, None, :].expand(1, 4, size, size)
        self.seen: list[tuple] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((tuple(x.shape), self.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return self.logits.expand(x.shape[0], -1, -1, -1)


def test_predict_writes_the_argmax_of_the_probabilities_resized_to_the_input(phantom_run: Path, tmp_path, monkeypatch):
    """``vqseg predict``: each image through the run's predictor (eval mode, no grad) at the training
    size, the class probabilities resized to the input's size, their argmax over every class written."""
    from PIL import Image

    import vqseg.evaluation.predict as predict_module


    cfg, _, state = load_run(phantom_run)
    size = cfg.train.image_size
    net = BandNet(size).train()
    loaded = []

    def fake_load_run(run_dir, checkpoint):
        loaded.append(checkpoint)
        return cfg, net, state

    monkeypatch.setattr(predict_module, "load_run", fake_load_run)
    pixels = (np.random.default_rng(0).random((21, 45)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "slice.png")
    assert predict_module.predict_paths(phantom_run, [tmp_path / "slice.png"], tmp_path / "out", device="cpu") == (1, 0)
    assert loaded == ["best"]  # the checkpoint chosen on validation, unless told otherwise
    assert not cfg.train.amp and net.seen == [((1, 1, size, size), False, False, False)]
    probs = F.interpolate(net.logits.softmax(dim=1), size=(21, 45), mode="bilinear", align_corners=False)
    expected = probs.argmax(dim=1)[0]
    assert set(expected.unique().tolist()) == {0, 1, 2, 3}
    (written,) = (tmp_path / "out").iterdir()
    labels = np.asarray(Image.open(written))  # phantom masks are label maps: class k is stored as k
    assert np.array_equal(labels, expected.numpy())


def test_one_slice_cases_are_scored_as_images():
    """2D data: a one-slice case is scored in 2D with the in-plane spacing; volumes stay 3D."""
    image_labels, volume_labels = np.ones((1, 5, 6), np.uint8), np.ones((3, 5, 6), np.uint8)
    labels, spacing = evaluate_module._scored(image_labels, (4.0, 0.5, 0.7))
    assert labels.shape == (5, 6) and spacing == (0.5, 0.7)
    assert evaluate_module._scored(image_labels, None)[1] is None
    labels, spacing = evaluate_module._scored(volume_labels, (4.0, 0.5, 0.7))
    assert labels.shape == (3, 5, 6) and spacing == (4.0, 0.5, 0.7)
