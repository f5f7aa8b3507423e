"""The training loop, top to bottom: data streams, method step, optimiser, validation, checkpoints.

One run folder holds everything: ``config.yaml`` (resolved), ``last.pt`` (full state and the
resolved config, atomic), ``best.pt`` (predictor weights chosen on validation), ``metrics.jsonl``,
TensorBoard events and ``summary.json`` (time, throughput, peak memory). Every check that can
refuse a start (folder lock, a used folder, a resume under other settings, data, model) runs
before the first byte is written, so a refused start leaves the folder as it was.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqseg.config import Config, ConfigError, UserError, resume_conflicts, save_config, to_dict
from vqseg.data import DataError, SegmentationData, load_training_data, resolve_data_config, split_lists
from vqseg.data.patches import PatchSampler
from vqseg.data.volumes import CaseSet, SliceSet
from vqseg.engine.checkpoint import rng_state, set_rng_state
from vqseg.engine.distributed import (
    DistInfo,
    average_gradients,
    barrier,
    broadcast_state,
    init_distributed,
    shutdown,
)
from vqseg.engine.run_dir import (
    RunFolderError,
    check_output_dir,
    clear_run,
    existing_run_files,
    run_folder_lock,
)
from vqseg.engine.sampler import InfiniteSampler
from vqseg.inference import Inference, mean_dice, predict_cases
from vqseg.io import load_checkpoint, load_weights, replace_atomically, save_atomic
from vqseg.methods import method_class
from vqseg.methods.base import Batch, Method, StepOutput
from vqseg.progress import progress_bar
from vqseg.run import SPLIT_NAME, build_run_method, check_pinned_split, pin_split, select_device

# What a resume needs from last.pt; a file without these is not a training checkpoint.
_RESUME_KEYS = ("method", "optimizer", "scheduler", "samplers", "rng", "step", "best", "config")


class NonFiniteLossError(UserError):
    """The loss became NaN or Inf: almost always too high a learning rate for the data."""


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter] | list[dict]) -> torch.optim.Optimizer:
    """``params``: parameters, or groups with their own ``lr`` (``Method.parameter_groups``)."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    raise ValueError(f"train.optimizer={t.optimizer!r}; choose sgd or adamw")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Streams:
    """Where the next labelled and unlabelled batches come from; part of the resumable state.

    Resize mode: indices of the resized slices. Patch mode (``train.patch_size``): patches drawn
    from the cases (``data/patches.py``), a share forced onto foreground.
    """

    labeled: InfiniteSampler | PatchSampler
    unlabeled: InfiniteSampler | PatchSampler | None

    @classmethod
    def for_rank(cls, cfg: Config, data: SegmentationData, uses_unlabeled: bool, info: DistInfo) -> Streams:
        """Each process draws its share of the global batch from its own seeded stream."""
        t = cfg.train
        seed = cfg.seed * 1000 + info.rank

        def stream(cases: SliceSet | CaseSet, batch: int, seed: int) -> InfiniteSampler | PatchSampler:
            if isinstance(cases, SliceSet):
                return InfiniteSampler(len(cases), batch, seed)
            return PatchSampler(cases.images, cases.labels, t.patch_size, batch, seed, t.foreground_oversample)

        streams = cls(
            stream(data.labeled, t.batch_size // info.world_size, seed),
            stream(data.unlabeled, t.unlabeled_batch_size // info.world_size, seed + 500) if uses_unlabeled else None,
        )
        notes = [s.padding_note() for s in (streams.labeled, streams.unlabeled) if isinstance(s, PatchSampler)]
        if info.is_main and any(notes):  # one line for the run: cases smaller than the patch are padded
            print(f"vqseg: {next(n for n in notes if n)}", file=sys.stderr, flush=True)
        return streams

    def next_batch(self, data: SegmentationData, method: Method, device: torch.device) -> Batch:
        """The next slices or patches, as the method's networks take them (``Method.training_inputs``)."""
        if isinstance(self.labeled, PatchSampler):
            patches = self.labeled.next()
            batch = Batch(labeled=patches.images.to(device), labels=patches.labels.to(device).long())
            if self.unlabeled is not None:
                batch.unlabeled = self.unlabeled.next().images.to(device)
            return batch
        li = self.labeled.next()
        batch = Batch(
            labeled=method.training_inputs(data.labeled.images[li].to(device, non_blocking=True), li, "labeled"),
            labels=data.labeled.labels[li].to(device, non_blocking=True).long(),
            labeled_index=li,
        )
        if self.unlabeled is not None:
            ui = self.unlabeled.next()
            images = data.unlabeled.images[ui].to(device, non_blocking=True)
            batch.unlabeled = method.training_inputs(images, ui, "unlabeled")
            batch.unlabeled_index = ui
        return batch

    def state_dict(self) -> dict:
        return {"labeled": self.labeled.state_dict(), **({"unlabeled": self.unlabeled.state_dict()} if self.unlabeled else {})}

    def load_state_dict(self, state: dict) -> None:
        self.labeled.load_state_dict(state["labeled"])
        if self.unlabeled is not None:
            self.unlabeled.load_state_dict(state["unlabeled"])


def optimization_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: Batch,
    step: int,
    amp: bool,
    info: DistInfo,
) -> StepOutput:
    """One update: the method's loss under autocast, backward, gradient averaging across processes,
    the optimiser step, then the method's own after-step work (e.g. the EMA teacher)."""
    with torch.autocast(batch.labeled.device.type, dtype=torch.bfloat16, enabled=amp):
        out = method.training_step(batch, step)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    average_gradients(params, info)
    optimizer.step()
    method.after_step(step)
    return out


def _step_of(line: str) -> float:
    """A line half-written when the job was killed counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """Append-only JSON lines; on resume, entries after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Train into ``cfg.output_dir``: a fresh run needs an unused folder (or ``overwrite``, which
    removes the old run's files once every start-up check has passed); ``resume`` continues last.pt."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it: choose one")
    device = select_device(cfg.train.device)
    dist_info = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    try:
        with ExitStack() as stack:
            return _train(cfg, resume, overwrite, device, dist_info, stack)
    finally:
        shutdown(dist_info)


def _claim_run_folder(
    cfg: Config, resume: bool, overwrite: bool, device: torch.device, info: DistInfo, stack: ExitStack
) -> dict[str, Any] | None:
    """Lock the folder (rank 0), refuse a used folder or a resume under other settings; returns
    the checkpoint to resume from. Rank 0's refusal is raised on every rank, so none waits forever."""
    run_dir = Path(cfg.output_dir)
    error: UserError | None = None
    state = None
    try:
        if info.is_main:
            stack.enter_context(run_folder_lock(run_dir))
            found = existing_run_files(run_dir)
            if found and not resume and not overwrite:
                raise RunFolderError(
                    f"output_dir={run_dir} already holds a run ({', '.join(found)}); continue it with --resume, "
                    "replace it with --overwrite, or choose another output_dir"
                )
        if resume:
            state = load_checkpoint(run_dir / "last.pt", device, required=_RESUME_KEYS)
            _check_resume_config(state["config"], cfg, run_dir / "last.pt")
            if info.is_main:
                check_pinned_split(run_dir, split_lists(cfg), "train --resume")
            if len(state["samplers"]) != info.world_size:  # each process owns its data stream
                raise ConfigError(
                    f"--resume: {run_dir / 'last.pt'} was written by {len(state['samplers'])} process(es); "
                    f"resume with as many, not {info.world_size}"
                )
    except UserError as err:
        error = err
    _raise_shared(error, info)
    return state


def _check_resume_config(saved: dict[str, Any], cfg: Config, checkpoint: Path) -> None:
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        new = to_dict(cfg)
        shown = ", ".join(f"{key} ({_lookup(saved, key)!r} -> {_lookup(new, key)!r})" for key in conflicts[:6])
        more = f" and {len(conflicts) - 6} more" if len(conflicts) > 6 else ""
        raise ConfigError(
            f"--resume: {checkpoint} was trained with other settings: {shown}{more}; resume with the saved "
            "settings, or start a fresh run (--overwrite, or another output_dir)"
        )


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "(absent)"
        tree = tree[part]
    return tree


def _raise_shared(error: UserError | None, info: DistInfo) -> None:
    """Every rank raises the first rank's error (rank 0 owns the folder checks)."""
    if info.enabled:
        import torch.distributed as dist

        errors: list[UserError | None] = [None] * info.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def _train(
    cfg: Config, resume: bool, overwrite: bool, device: torch.device, info: DistInfo, stack: ExitStack
) -> Path:
    t = cfg.train
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    run_dir = Path(cfg.output_dir)
    checkpoint_path = run_dir / "last.pt"
    check_output_dir(run_dir)
    if resume and not checkpoint_path.is_file():
        raise RunFolderError(f"--resume: {checkpoint_path} does not exist")
    for name, size in (("train.batch_size", t.batch_size), ("train.unlabeled_batch_size", t.unlabeled_batch_size)):
        if size % info.world_size:
            raise ConfigError(f"{name}={size} must be divisible by the {info.world_size} processes")
    resolve_data_config(cfg)  # before the resume check: a prepared dataset fills in data.* values
    state = _claim_run_folder(cfg, resume, overwrite, device, info, stack)

    torch.manual_seed(cfg.seed)
    data = load_training_data(cfg)
    _check_against_data(cfg, data)
    if method_uses_unlabeled(cfg) and len(data.unlabeled) == 0:
        raise DataError(f"method {cfg.method.name} needs unlabelled images but the unlabelled training set is empty")
    method = build_run_method(cfg, data.in_channels, data.num_classes).to(device)
    method.prepare(data)  # e.g. a frozen encoder's feature bank, built from the cache
    broadcast_state(method, info)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, method.parameter_groups())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - it / t.iterations) ** t.poly_power
    )
    streams = Streams.for_rank(cfg, data, method.uses_unlabeled, info)
    torch.manual_seed(cfg.seed * 7919 + info.rank)  # augmentation/dropout randomness differs per rank

    start_step, best, earlier_s = 0, {"val_dice": -1.0, "step": -1}, 0.0
    if state is not None:
        load_weights(method, state["method"], checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        streams.load_state_dict(state["samplers"][info.rank])
        set_rng_state(state["rng"][info.rank])
        start_step, best = state["step"], state["best"]
        earlier_s = state.get("train_time_s")  # None: written before the time was recorded
    if info.is_main:  # only now, the state loaded: a start that fails must leave the folder as it was
        if overwrite:
            clear_run(run_dir)
        replace_atomically(run_dir / "config.yaml", lambda tmp: save_config(cfg, tmp))
        if not resume or not (run_dir / SPLIT_NAME).is_file():  # fresh, or begun before splits were pinned
            pin_split(run_dir, cfg.data.dataset, split_lists(cfg))

    log = MetricsLog(run_dir / "metrics.jsonl", start_step if resume else None) if info.is_main else None
    # Closed by the stack on any exit, so an error line starts on a line of its own after the bar.
    writer = stack.enter_context(_tensorboard(run_dir, start_step + 1 if resume else None)) if info.is_main else None
    bar = stack.enter_context(progress_bar(t.iterations, cfg.method.name, disable=not info.is_main, initial=start_step))
    began, step_times, saved_step = time.time(), [], start_step
    method.train()
    for step in range(start_step, t.iterations):
        tick = time.perf_counter()
        batch = streams.next_batch(data, method, device)
        out = optimization_step(method, optimizer, params, batch, step, t.amp, info)
        scheduler.step()
        step_times.append(time.perf_counter() - tick)
        done = step + 1
        bar.update(1)

        validating = done % t.val_every == 0 or done == t.iterations
        # Checked sparsely (a host sync), and always before a checkpoint could save broken weights.
        if (done % t.log_every == 0 or validating) and not torch.isfinite(out.loss):
            kept = f"{checkpoint_path} keeps step {saved_step}" if saved_step else "no checkpoint was written"
            raise NonFiniteLossError(
                f"loss became {out.loss.item()} at step {done} (checked every train.log_every={t.log_every} steps "
                f"and before each checkpoint); try a lower learning rate than train.lr={t.lr:g}; {kept}"
            )
        if info.is_main and (done % t.log_every == 0 or done == t.iterations):
            record = {"step": done, "lr": scheduler.get_last_lr()[0], "loss": out.loss.item(), **_scalars(out.logs)}
            log.write(record)
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, done)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)  # the bar redraws on its own interval

        if validating:
            broadcast_state(method, info)  # batch-norm statistics are per rank; validate rank 0's
            if info.is_main:
                score = _validate(cfg, method, data, device)
                method.after_validation(done, score)
                log.write({"step": done, "val_dice": score})
                writer.add_scalar("val/dice", score, done)
                if score > best["val_dice"]:
                    best = {"val_dice": score, "step": done}
                    save_atomic(
                        {"predictor": method.predictor().state_dict(), "step": done, "val_dice": score, "config": to_dict(cfg)},
                        run_dir / "best.pt",
                    )
                bar.write(f"step {done}: val Dice {score:.4f} (best {best['val_dice']:.4f} at {best['step']})")
            train_time_s = None if earlier_s is None else earlier_s + time.time() - began
            _save_state(checkpoint_path, cfg, method, optimizer, scheduler, streams, done, best, train_time_s, info)
            saved_step = done

    if info.is_main:
        elapsed = time.time() - began
        median_step = sorted(step_times)[len(step_times) // 2] if step_times else math.nan
        summary = {
            "iterations": t.iterations,
            "trained_steps_this_process": len(step_times),
            # every step the run kept, over all its processes (a resumed run's earlier ones included)
            "wall_time_s": None if earlier_s is None else earlier_s + elapsed,
            "wall_time_this_process_s": elapsed,
            "median_step_s": median_step,
            "iterations_per_s": 1.0 / median_step if step_times else math.nan,
            "peak_memory_mb": peak_memory_mb(device),
            "device": str(device),
            "world_size": info.world_size,
            "best_val_dice": best["val_dice"],
            "best_step": best["step"],
        }
        replace_atomically(run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    barrier(info)
    return run_dir


def method_uses_unlabeled(cfg: Config) -> bool:
    return method_class(cfg.method.name).uses_unlabeled


def _check_against_data(cfg: Config, data: SegmentationData) -> None:
    """Evaluation and predict rebuild the network and preprocessing from config.yaml, so it must describe
    the data truthfully (``settings``: what a prepared dataset dictates beyond classes and channels)."""
    dictated = {"num_classes": data.num_classes, "in_channels": data.in_channels, **data.settings}
    for key, found in dictated.items():
        if getattr(cfg.data, key) != found:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} but the {cfg.data.dataset} data has {found}")
    if len(cfg.data.class_names) != data.num_classes - 1:
        raise ConfigError(
            f"data.class_names={cfg.data.class_names} must name the {data.num_classes - 1} foreground classes"
        )


def _tensorboard(run_dir: Path, purge_step: int | None):
    """On resume, events from steps after the checkpoint (run again now) are purged, not duplicated."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)


def _scalars(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()}


def _validate(cfg: Config, method: Method, data: SegmentationData, device: torch.device) -> float:
    predictions = predict_cases(method.predictor(), data.val, Inference.of(cfg), device)
    return mean_dice(predictions, data.val, data.num_classes)


def _save_state(
    path,
    cfg: Config,
    method,
    optimizer,
    scheduler,
    streams: Streams,
    step: int,
    best: dict,
    train_time_s: float | None,
    info: DistInfo,
) -> None:
    """Every rank's sampler and RNG state is gathered so a resumed multi-process run is exact too;
    the resolved config is stored so a resume can refuse settings that would change the run."""
    local = {
        "samplers": streams.state_dict(),
        "rng": rng_state(),
    }
    gathered = [local]
    if info.enabled:
        import torch.distributed as dist

        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, local)
    if info.is_main:
        save_atomic(
            {
                "method": method.state_dict(),
                "predictor": method.predictor().state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "samplers": [g["samplers"] for g in gathered],
                "rng": [g["rng"] for g in gathered],
                "step": step,
                "best": best,
                "train_time_s": train_time_s,
                "config": to_dict(cfg),
            },
            path,
        )
    barrier(info)
