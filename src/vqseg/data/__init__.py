"""Datasets behind three entry points: the training data, the cases of one split, and the case names
of every split. Each reader module registers a ``DatasetReader`` under its ``data.dataset`` name;
importing this package registers the built-in ones."""

from __future__ import annotations

from vqseg.config import Config
from vqseg.data import acdc, cvc, phantom, prepare, vessels  # noqa: F401  (they register)
from vqseg.data.plan import plan_patch_run
from vqseg.data.volumes import DataError, SegmentationData, SliceSet, Volume
from vqseg.registry import DATASETS


def resolve_data_config(cfg: Config) -> None:
    """Fill in the data.* values a dataset dictates (a prepared one: classes, channels, preprocessing)
    and, in patch mode, what its plan gives the run (target spacing, a 3D U-Net's pooling)."""
    resolve = DATASETS[cfg.data.dataset].resolve
    if resolve is not None:
        resolve(cfg)
    plan = prepare.open_prepared(prepare.prepared_root(cfg)).info["plan"] if cfg.data.dataset == "prepared" else None
    plan_patch_run(cfg, plan, cfg.data.root if plan is not None else cfg.data.dataset)


def load_training_data(cfg: Config) -> SegmentationData:
    data = DATASETS[cfg.data.dataset].load(cfg)
    if len(data.labeled) == 0:
        raise DataError(f"data.dataset={cfg.data.dataset}: the labelled training set is empty")
    if not data.val:
        raise DataError(f"data.dataset={cfg.data.dataset}: the validation split is empty")
    return data


def load_split(cfg: Config, split: str) -> list[Volume]:
    if split not in ("val", "test"):
        raise DataError(f"split must be 'val' or 'test', got {split!r}")
    volumes = DATASETS[cfg.data.dataset].load_split(cfg, split)
    if not volumes:
        raise DataError(f"data.dataset={cfg.data.dataset}: split {split!r} is empty")
    return volumes


def split_lists(cfg: Config) -> dict[str, list[str]]:
    """The case names of the labelled, unlabelled, validation and test splits this config trains and
    scores on (a run pins them, so a split that changes later is noticed)."""
    return DATASETS[cfg.data.dataset].split_lists(cfg)


__all__ = [
    "DataError", "SegmentationData", "SliceSet", "Volume", "load_split", "load_training_data", "resolve_data_config",
    "split_lists",
]
