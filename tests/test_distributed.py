"""Two CPU processes under torchrun (gloo): both finish, rank 0 writes the run folder, and the
explicit gradient all-reduce keeps the ranks' parameters bit-identical although each rank draws
its own batches and augmentations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from vqseg.io import load_checkpoint

pytestmark = pytest.mark.slow

# Launched by torchrun in each process: records every rank's parameters each time the trainer
# synchronises state before validation (i.e. *before* rank 0's weights are broadcast, so equality
# comes from the gradient averaging alone), then runs the real ``python -m vqseg.cli`` entry point.
WRAPPER = textwrap.dedent(
    """
    import os, runpy, sys
    import torch
    import vqseg.engine.trainer as trainer

    out = os.environ["VQSEG_TEST_PARAMS"]
    original = trainer.broadcast_state
    calls = []

    def recording(module, info):
        calls.append(None)
        if len(calls) > 1:  # the first call is the start-of-training broadcast
            params = {k: v.detach().clone() for k, v in module.named_parameters()}
            torch.save(params, os.path.join(out, f"rank{info.rank}_sync{len(calls) - 1}.pt"))
        original(module, info)

    trainer.broadcast_state = recording
    sys.argv = ["vqseg", *sys.argv[1:]]
    runpy.run_module("vqseg.cli", run_name="__main__", alter_sys=True)
    """
)


def test_two_process_training(tmp_path: Path):
    run = tmp_path / "run"
    params = tmp_path / "params"
    params.mkdir()
    script = tmp_path / "launch.py"
    script.write_text(WRAPPER)
    overrides = tiny_overrides(**{"output_dir": str(run), "train.iterations": 4, "train.val_every": 2})
    env = {
        **os.environ,
        "VQSEG_TEST_PARAMS": str(params),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), "train", *[arg for o in overrides for arg in ("--set", o)],
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 4
    assert summary["trained_steps_this_process"] == 4
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 4 and len(last["samplers"]) == len(last["rng"]) == 2  # every rank's stream
    # each rank draws its own batches (2 per rank of the global 4)
    assert not torch.equal(last["samplers"][0]["labeled"]["perm"], last["samplers"][1]["labeled"]["perm"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # logged once, by rank 0
    assert [r["step"] for r in records if "val_dice" in r] == [2, 4]
    assert len(list((run / "tb").iterdir())) == 1
    assert (run / "best.pt").is_file() and (run / "config.yaml").is_file()
    assert result.stdout.count("run folder:") == 2  # both ranks returned from train()

    for sync in (1, 2):  # before validation at steps 2 and 4
        rank0 = torch.load(params / f"rank0_sync{sync}.pt", weights_only=True)
        rank1 = torch.load(params / f"rank1_sync{sync}.pt", weights_only=True)
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks after step {2 * sync}"
    step2 = torch.load(params / "rank0_sync1.pt", weights_only=True)
    step4 = torch.load(params / "rank0_sync2.pt", weights_only=True)
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)  # the ranks did train
    final = {k.removeprefix("student."): v for k, v in last["method"].items()}
    for key, value in step4.items():
        assert torch.equal(final[key.removeprefix("student.")], value)
