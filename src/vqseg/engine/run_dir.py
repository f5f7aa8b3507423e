"""The run folder's ownership: one training process at a time, and a finished run is never
overwritten by accident.

Two ``vqseg train`` processes on one folder would interleave ``metrics.jsonl`` and leave
checkpoints and configs from different runs side by side, so training holds an exclusive
``flock`` on ``train.lock`` in the folder for its whole duration; the lock file names its holder
(PID, host, start time) for the error the second process prints. The kernel drops the lock when
the holder dies, even by ``kill -9``, so a stale file never blocks a later run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vqseg.config import UserError
from vqseg.io import replace_atomically

LOCK_NAME = "train.lock"
# The case lists the run was trained and is scored on (nnU-Net keeps splits_final.json for this).
SPLIT_NAME = "split.json"
SPLIT_KEYS = ("labeled", "unlabeled", "val", "test")
# Files whose presence means the folder holds (part of) a run; a fresh start refuses them.
RUN_MARKERS = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json")
# What --overwrite removes: the markers, the pinned split, TensorBoard events and evaluations of the
# old weights. Other files (a benchmark's train.log, the user's notes) are left alone.
_RUN_OUTPUT_GLOBS = (*RUN_MARKERS, SPLIT_NAME, "tb", "eval_*.json", "eval_*.md", "eval_*.csv")


class RunFolderError(UserError):
    """The run folder is unusable: below a file, locked by another process, or holding a run."""


def check_output_dir(run_dir: Path) -> None:
    """Refuse an output_dir that is, or lies below, a file: mkdir would fail with a traceback."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise RunFolderError(f"output_dir={run_dir}: {folder} is a file, not a folder")
            return


def existing_run_files(run_dir: Path) -> list[str]:
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's outputs so a fresh run does not mix with them (``--overwrite``)."""
    for pattern in _RUN_OUTPUT_GLOBS:
        for path in run_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold the folder's exclusive lock; folders created here are removed again if left empty."""
    check_output_dir(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"output_dir={run_dir} cannot be created ({err.strerror})") from None
    lock_path = run_dir / LOCK_NAME
    try:
        fd = _acquire(lock_path, run_dir)
        try:
            os.ftruncate(fd, 0)
            holder = f"PID {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.write(fd, holder.encode())
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # while still held: a waiting process then sees a new inode
            os.close(fd)
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote something, keep it
                break


def _acquire(lock_path: Path, run_dir: Path) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            raise RunFolderError(
                f"output_dir={run_dir} is in use by another vqseg train ({holder}); "
                "wait for it to finish or choose another output_dir"
            ) from None
        try:
            same_file = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and flock: retry


class SplitChangedError(UserError):
    """The data's split is no longer the one a run was trained on: its test set may hold training cases."""


def _digest(lists: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps({k: lists[k] for k in SPLIT_KEYS}, sort_keys=True).encode()).hexdigest()


def pin_split(run_dir: Path, dataset: str, lists: dict[str, list[str]]) -> None:
    """Store the case lists of every split in the run folder (atomically, with their hash)."""
    content = {"dataset": dataset, "sha256": _digest(lists), **{k: list(lists[k]) for k in SPLIT_KEYS}}
    replace_atomically(run_dir / SPLIT_NAME, lambda tmp: tmp.write_text(json.dumps(content, indent=1) + "\n"))


def check_pinned_split(run_dir: Path, lists: dict[str, list[str]], what: str) -> bool:
    """Refuse (one line) when the data's split differs from the one pinned at the run's start.

    Returns False for a run folder written before splits were pinned: nothing to check (said on one line).
    """
    path = run_dir / SPLIT_NAME
    if not path.is_file():
        print(f"vqseg {what}: note: {run_dir} has no {SPLIT_NAME} (trained before runs pinned their split): "
              "the data's split cannot be checked against the run's", file=sys.stderr, flush=True)
        return False
    try:
        pinned = json.loads(path.read_text())
        changed = [k for k in SPLIT_KEYS if list(pinned[k]) != list(lists[k])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SplitChangedError(f"{path}: cannot be read as the run's pinned split ({err})") from None
    if changed:
        parts = []
        for key in changed:
            added, removed = set(lists[key]) - set(pinned[key]), set(pinned[key]) - set(lists[key])
            parts.append(f"{key!r} ({len(added)} case(s) added, {len(removed)} removed)")
        raise SplitChangedError(
            f"{path}: the data's split is not the one this run was trained on: {', '.join(parts)} changed "
            "(prepared again with another seed, or cases added); its test cases may have been trained on: "
            "restore the split file, or train a new run"
        )
    return True
