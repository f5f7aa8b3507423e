"""Training engine: sampler, atomic checkpoints, the run folder and exact resumption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from vqseg.config import load_config, to_dict
from vqseg.engine.run_dir import RunFolderError
from vqseg.engine.sampler import InfiniteSampler
from vqseg.engine.trainer import MetricsLog, NonFiniteLossError, train
from vqseg.io import CheckpointError, load_checkpoint, save_atomic
from vqseg.methods.base import StepOutput, Supervised

pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_records(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path) if "loss" in r]


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


def test_sampler_covers_every_index_once_per_permutation():
    sampler = InfiniteSampler(size=5, batch_size=3, seed=0)
    batches = [sampler.next() for _ in range(10)]  # 30 indices = 6 permutations
    assert all(b.shape == (3,) and b.dtype == torch.int64 for b in batches)
    stream = torch.cat(batches).tolist()
    perms = [stream[i : i + 5] for i in range(0, 30, 5)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in perms)
    assert len({tuple(p) for p in perms}) > 1  # a fresh permutation each time
    # the second batch straddles the first two permutations: 2 from the first, 1 from the second
    assert batches[1].tolist()[:2] == perms[0][3:] and batches[1].tolist()[2] == perms[1][0]


def test_sampler_batch_larger_than_set():
    sampler = InfiniteSampler(size=2, batch_size=5, seed=3)
    stream = torch.cat([sampler.next() for _ in range(2)]).tolist()
    assert len(stream) == 10
    assert all(sorted(stream[i : i + 2]) == [0, 1] for i in range(0, 10, 2))


def test_sampler_seed_changes_the_stream():
    a = torch.cat([InfiniteSampler(50, 10, seed=1).next() for _ in range(1)])
    b = torch.cat([InfiniteSampler(50, 10, seed=2).next() for _ in range(1)])
    assert not torch.equal(a, b)


def test_sampler_state_round_trip_reproduces_the_stream(tmp_path):
    sampler = InfiniteSampler(size=7, batch_size=3, seed=11)
    for _ in range(4):  # stop mid-permutation
        sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(9)]
    # through a weights_only checkpoint, into a sampler with another seed and position
    save_atomic({"sampler": state}, tmp_path / "s.pt")
    restored = InfiniteSampler(size=7, batch_size=3, seed=99)
    restored.next()
    restored.load_state_dict(load_checkpoint(tmp_path / "s.pt")["sampler"])
    assert all(torch.equal(a, b) for a, b in zip(expected, [restored.next() for _ in range(9)]))


def test_sampler_state_is_a_snapshot():
    sampler = InfiniteSampler(size=4, batch_size=3, seed=0)
    state = sampler.state_dict()
    first = sampler.next()
    sampler.next()  # draws a new permutation; the saved state must not follow
    sampler.load_state_dict(state)
    assert torch.equal(sampler.next(), first)


def test_sampler_rejects_empty_set():
    with pytest.raises(ValueError, match="empty"):
        InfiniteSampler(0, 4, seed=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_save_atomic_leaves_no_tmp_file(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    save_atomic({"step": 2, "w": torch.zeros(3)}, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    state = load_checkpoint(path)
    assert state["step"] == 2 and torch.equal(state["w"], torch.zeros(3))


def test_temporary_checkpoint_name_is_unique_to_the_process(tmp_path, monkeypatch):
    """Two processes saving into one folder must never write (and rename) the same tmp file."""
    written = []
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (written.append(Path(f).name), original(obj, f)))
    save_atomic({"step": 1}, tmp_path / "last.pt")
    assert written == [f"last.pt.{os.getpid()}.tmp"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"trunc")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_load_corrupt_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_rejects_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": InfiniteSampler}, path)  # not loadable with weights_only=True
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)


def test_metrics_log_truncates_after_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, None)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    MetricsLog(path, resume_step=3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    MetricsLog(path, None)  # a fresh run starts an empty log
    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------------
# A tiny training run
# ---------------------------------------------------------------------------------------------


def test_run_folder_contents(phantom_run: Path):
    cfg = tiny_config(output_dir=str(phantom_run))
    names = {p.name for p in phantom_run.iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json", "tb"} <= names
    assert not any(name.endswith(".tmp") for name in names)
    assert load_config(phantom_run / "config.yaml") == cfg  # the resolved config, reloadable
    assert any(p.name.startswith("events.out.tfevents") for p in (phantom_run / "tb").iterdir())

    records = read_jsonl(phantom_run / "metrics.jsonl")
    train_steps = [r["step"] for r in records if "loss" in r]
    val_steps = [r["step"] for r in records if "val_dice" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6] and val_steps == [3, 6]
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in records if "val_dice" in r)
    assert all(r["loss"] > 0 and "loss_sup" in r for r in records if "loss" in r)
    # poly schedule: lr after step k is lr0 * (1 - k / T) ** 0.9
    for r in records:
        if "lr" in r:
            assert r["lr"] == pytest.approx(cfg.train.lr * (1 - r["step"] / 6) ** 0.9)

    summary = json.loads((phantom_run / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["trained_steps_this_process"] == 6
    assert summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["iterations_per_s"] > 0 and summary["peak_memory_mb"] > 0
    best_record = max((r for r in records if "val_dice" in r), key=lambda r: r["val_dice"])
    assert summary["best_val_dice"] == best_record["val_dice"]

    last = load_checkpoint(phantom_run / "last.pt")
    assert last["step"] == 6 and last["best"]["val_dice"] == summary["best_val_dice"]
    best = load_checkpoint(phantom_run / "best.pt")
    assert best["step"] == summary["best_step"] and best["val_dice"] == summary["best_val_dice"]
    assert best["config"] == to_dict(cfg)
    assert best["predictor"].keys() == last["predictor"].keys()
    assert any(k.startswith("student.") for k in last["method"])


def test_training_changes_the_weights(phantom_run: Path, tmp_path):
    cfg = tiny_config(**{"output_dir": str(tmp_path / "r"), "train.iterations": 1, "train.lr": 1e-9})
    train(cfg)
    untrained = load_checkpoint(tmp_path / "r" / "last.pt")["predictor"]
    trained = load_checkpoint(phantom_run / "last.pt")["predictor"]
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained if k.endswith("weight"))


class _Interrupted(KeyboardInterrupt):
    pass


def _interrupt_then_resume(cfg, method_class, monkeypatch) -> Path:
    """Train until the 4th optimiser step has happened (after the step-3 checkpoint), die there,
    then resume to the end; returns the run folder."""
    run = _interrupt(cfg, method_class, monkeypatch)
    train(cfg, resume=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trained_steps_this_process"] == 3  # it did resume, not retrain from scratch
    return run


def _interrupt(cfg, method_class, monkeypatch) -> Path:
    """Train until the 4th optimiser step has happened (after the step-3 checkpoint) and die there."""
    run = Path(cfg.output_dir)
    original = method_class.after_step

    def after_step(self, step):
        original(self, step)
        if step == 3:  # 0-based: the 4th step is done but not checkpointed
            raise _Interrupted

    with monkeypatch.context() as m:
        m.setattr(method_class, "after_step", after_step)
        with pytest.raises(_Interrupted):
            train(cfg)
    assert load_checkpoint(run / "last.pt")["step"] == 3
    assert not (run / "summary.json").exists()
    return run


def assert_same_run(run_a: Path, run_b: Path) -> None:
    a, b = load_checkpoint(run_a / "last.pt"), load_checkpoint(run_b / "last.pt")
    assert a["step"] == b["step"] == 6
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    for key in a["predictor"]:
        assert torch.equal(a["predictor"][key], b["predictor"][key]), key
    momenta_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momenta_a) == len(momenta_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momenta_a, momenta_b))
    assert a["scheduler"] == b["scheduler"] and a["best"] == b["best"]
    assert a["samplers"][0].keys() == b["samplers"][0].keys()
    for stream in a["samplers"][0]:
        assert torch.equal(a["samplers"][0][stream]["perm"], b["samplers"][0][stream]["perm"])
        assert a["samplers"][0][stream]["pos"] == b["samplers"][0][stream]["pos"]
    assert train_records(run_a / "metrics.jsonl") == train_records(run_b / "metrics.jsonl")
    # the log has no duplicate steps from the interrupted attempt
    assert [r["step"] for r in read_jsonl(run_b / "metrics.jsonl")] == [
        r["step"] for r in read_jsonl(run_a / "metrics.jsonl")
    ]


def test_resume_is_exact(phantom_run: Path, tmp_path, monkeypatch):
    """Run B is killed during step 4, then resumed: it must end bit-identical to run A, which
    trained 6 steps straight (the shared phantom run)."""
    run_b = _interrupt_then_resume(tiny_config(output_dir=str(tmp_path / "b")), Supervised, monkeypatch)
    assert_same_run(phantom_run, run_b)


def test_resume_is_exact_semi_supervised(tmp_path, monkeypatch):
    """Same with VQ-Seg: unlabelled stream, EMA teacher, QPM and CutMix randomness."""
    from vqseg.methods.vqseg import VQSeg

    def cfg(name):
        return tiny_config(
            **{"output_dir": str(tmp_path / name), "method.name": "vqseg", "method.foundation": "none",
               "method.codebook_size": 64}
        )

    run_a = train(cfg("a"))
    run_b = _interrupt_then_resume(cfg("b"), VQSeg, monkeypatch)
    assert "unlabeled" in load_checkpoint(run_b / "last.pt")["samplers"][0]
    assert any(k.startswith("teacher.") for k in load_checkpoint(run_b / "last.pt")["method"])
    assert_same_run(run_a, run_b)


@pytest.mark.parametrize("earlier_s", [1000.0, None])
def test_resumed_run_times_every_process(tmp_path, monkeypatch, earlier_s):
    """The summary's wall time adds the time the checkpoint recorded; a checkpoint written before
    that record existed leaves it unknown rather than counting only the last process."""
    cfg = tiny_config(output_dir=str(tmp_path / "r"))
    run = _interrupt(cfg, Supervised, monkeypatch)
    state = load_checkpoint(run / "last.pt")
    assert state["train_time_s"] > 0
    if earlier_s is None:
        del state["train_time_s"]
    else:
        state["train_time_s"] = earlier_s
    save_atomic(state, run / "last.pt")
    train(cfg, resume=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_time_this_process_s"] > 0
    if earlier_s is None:
        assert summary["wall_time_s"] is None
    else:
        assert summary["wall_time_s"] == pytest.approx(earlier_s + summary["wall_time_this_process_s"])
        assert load_checkpoint(run / "last.pt")["train_time_s"] > earlier_s


def test_resume_without_checkpoint_errors(tmp_path):
    cfg = tiny_config(output_dir=str(tmp_path / "fresh"))
    with pytest.raises(RunFolderError, match="last.pt"):
        train(cfg, resume=True)
    assert not (tmp_path / "fresh").exists()


def test_non_finite_loss_stops_training(tmp_path, monkeypatch):
    original = Supervised.training_step

    def nan_at_step_2(self, batch, step):
        out = original(self, batch, step)
        return StepOutput(out.loss * float("nan"), out.logs) if step == 1 else out

    monkeypatch.setattr(Supervised, "training_step", nan_at_step_2)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(tiny_config(output_dir=str(tmp_path / "nan")))


def test_semi_supervised_method_without_unlabeled_data(tiny_acdc, tmp_path):
    cfg = tiny_config(
        **{
            "data.dataset": "acdc",
            "data.root": str(tiny_acdc.root),
            "data.labeled_cases": 6,  # every training patient labelled
            "method.name": "vqseg",
            "method.foundation": "none",
            "output_dir": str(tmp_path / "run"),
        }
    )
    with pytest.raises(ValueError, match="unlabel"):
        train(cfg)
