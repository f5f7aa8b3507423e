"""``splits.json`` files, read and checked the same way for every dataset.

A split file decides what is trained on and what is scored, so anything odd in it (not JSON, an
empty split, ids that are not integers, a case in two splits) stops the run with the file named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqseg.data.volumes import DataError

SPLITS = ("train", "val", "test")


def read_splits(path: Path, unit: str) -> dict[str, Any]:
    """The file's mapping, with ``train``/``val``/``test`` as non-empty, disjoint lists of integer ids
    (``unit`` names what an id stands for in messages, e.g. "patient")."""
    if not path.is_file():
        raise DataError(f"{path}: split file is missing (expected train/val/test {unit} lists)")
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(splits, dict):
        raise DataError(f"{path}: must hold a JSON object with train/val/test lists")
    for key in SPLITS:
        if not splits.get(key):
            raise DataError(f"{path}: split {key!r} is missing or empty")
        check_ids(path, key, splits[key], unit)
    sets = {key: set(splits[key]) for key in SPLITS}
    overlap = (sets["train"] & sets["val"]) | (sets["train"] & sets["test"]) | (sets["val"] & sets["test"])
    if overlap:
        raise DataError(f"{path}: {unit}s {sorted(overlap)} appear in more than one split")
    return splits


def check_ids(path: Path, key: str, ids: Any, unit: str) -> None:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{path}: {key!r} must be a list of integer {unit} ids, got {str(ids)[:80]}")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: {key!r} lists a {unit} twice")
