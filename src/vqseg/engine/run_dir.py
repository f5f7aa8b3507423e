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
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vqseg.config import UserError
from vqseg.run import SPLIT_NAME

LOCK_NAME = "train.lock"
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
