"""Dataset readers behind two entry points: the training data, and the cases of one split."""

from __future__ import annotations

import importlib
from typing import Callable

from vqseg.config import Config
from vqseg.data.volumes import DataError, SegmentationData, SliceSet, Volume

# dataset name -> (module, training-data reader, split reader, split lists: the case names of every
# split, without reading images)
_READERS = {
    "acdc": ("vqseg.data.acdc", "load_acdc", "load_acdc_split", "acdc_split_lists"),
    "phantom": ("vqseg.data.phantom", "load_phantom", "load_phantom_split", "phantom_split_lists"),
    "cvc": ("vqseg.data.cvc", "load_cvc", "load_cvc_split", "cvc_split_lists"),
    # any `vqseg prepare`d folder
    "prepared": ("vqseg.data.prepare", "load_prepared", "load_prepared_split", "prepared_split_lists"),
}


def _reader(cfg: Config, which: int) -> Callable:
    if cfg.data.dataset not in _READERS:
        raise DataError(f"data.dataset={cfg.data.dataset!r} is unknown; choose from {sorted(_READERS)}")
    entry = _READERS[cfg.data.dataset]
    return getattr(importlib.import_module(entry[0]), entry[which])


def resolve_data_config(cfg: Config) -> None:
    """Fill in the data.* values a prepared dataset dictates (classes, channels, preprocessing)."""
    if cfg.data.dataset == "prepared":
        from vqseg.data.prepare import adopt_prepared_settings

        adopt_prepared_settings(cfg)


def load_training_data(cfg: Config) -> SegmentationData:
    data = _reader(cfg, 1)(cfg)
    if len(data.labeled) == 0:
        raise DataError(f"data.dataset={cfg.data.dataset}: the labelled training set is empty")
    if not data.val:
        raise DataError(f"data.dataset={cfg.data.dataset}: the validation split is empty")
    return data


def load_split(cfg: Config, split: str) -> list[Volume]:
    if split not in ("val", "test"):
        raise DataError(f"split must be 'val' or 'test', got {split!r}")
    volumes = _reader(cfg, 2)(cfg, split)
    if not volumes:
        raise DataError(f"data.dataset={cfg.data.dataset}: split {split!r} is empty")
    return volumes


def split_lists(cfg: Config) -> dict[str, list[str]]:
    """The case names of the labelled, unlabelled, validation and test splits this config trains and
    scores on (a run pins them, so a split that changes later is noticed)."""
    return _reader(cfg, 3)(cfg)


__all__ = [
    "DataError", "SegmentationData", "SliceSet", "Volume", "load_split", "load_training_data", "resolve_data_config",
    "split_lists",
]
