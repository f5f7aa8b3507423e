"""File output that is never half-written, and checkpoints that load with ``weights_only=True``.

At the bottom of the package (data, modules, engine and evaluation all write files): a killed job
leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vqseg.errors import UserError


class CheckpointError(UserError):
    """A checkpoint file that is missing, empty, truncated, corrupt or not a weights-only vqseg checkpoint."""


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write next to the target, then rename: a killed job never leaves a truncated file.

    The temporary name carries the process id, so two writers never share (and clobber) one.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: Path) -> None:
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load a checkpoint dict holding at least the ``required`` entries; any failure is one
    CheckpointError naming the file (torch's own messages span lines and advise unsafe loading)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file was not written completely")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {path} is not a weights-only checkpoint: it is corrupt or holds Python objects, "
            "which are refused because loading them could run arbitrary code"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, OSError... for damaged files
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a vqseg checkpoint")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a vqseg training checkpoint: it lacks {missing}")
    return state


def load_weights(module: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """``module.load_state_dict(state)`` with a mismatch reported as one CheckpointError naming the
    file: torch lists every missing and unexpected key over many lines. A mismatch means the file
    was written by another version of the code or for another config."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        detail = lines[0] if lines else str(err)
        if len(detail) > 200:
            detail = detail[:200] + "..."
        raise CheckpointError(
            f"checkpoint {path} does not fit the model its config builds ({detail}); it was written by "
            "another version of vqseg or for another model: retrain, or evaluate it with the version that wrote it"
        ) from None
