"""ACDC cardiac MRI as preprocessed by SSL4MIS: one HDF5 file per patient and phase.

Files are ``patientNNN_frameFF.h5`` with datasets ``image`` (D x H x W) and ``label``; the second
phase is ``frame02`` in SSL4MIS lists and the original frame number in ACDC's own naming, so a
patient's files are found by pattern rather than by a fixed frame number.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from vqseg.config import Config, resolve_path
from vqseg.data.sets import training_set
from vqseg.data.splits import check_ids, read_splits
from vqseg.data.volumes import DataError, DatasetReader, SegmentationData, Volume, check_volume
from vqseg.registry import DATASETS

NUM_CLASSES = 4
CLASS_NAMES = ["RV", "Myo", "LV"]
_FRAME = re.compile(r"patient(\d{3})_frame(\d{2})\.h5$")


def read_h5_volume(path: Path, num_classes: int = NUM_CLASSES) -> Volume:
    """Read and validate one SSL4MIS-style volume; every failure names the file."""
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise DataError(f"{path}: missing dataset(s) {missing}; found {sorted(f.keys())}")
            image = np.asarray(f["image"][()])
            label = np.asarray(f["label"][()])
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err})") from None
    if image.ndim == 2:
        image, label = image[None], label[None]
    if image.ndim != 3:
        raise DataError(f"{path}: image must be D x H x W, got shape {image.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.mod(label, 1) == 0):
            raise DataError(f"{path}: label holds non-integer values")
    label = label.astype(np.int64)
    check_volume(image, label, num_classes, path)
    return Volume(path.stem, image.astype(np.float32)[:, None], label.astype(np.uint8))


def patient_files(root: Path, patient: int) -> list[Path]:
    files = sorted(
        (p for p in (root / "volumes").glob(f"patient{patient:03d}_frame*.h5") if _FRAME.search(p.name)),
        key=lambda p: int(_FRAME.search(p.name).group(2)),
    )
    if not files:
        raise DataError(f"{root / 'volumes'}: no volume files for patient {patient:03d} (patient{patient:03d}_frameNN.h5)")
    return files


def load_splits(root: Path) -> dict:
    path = root / "splits.json"
    splits = read_splits(path, "patient")
    splits.setdefault("labeled_order", splits["train"])
    check_ids(path, "labeled_order", splits["labeled_order"], "patient")
    outside = sorted(set(splits["labeled_order"]) - set(splits["train"]))
    if outside:
        raise DataError(f"{path}: labeled_order lists patients {outside} that are not in the train split")
    return splits


def labeled_patients(splits: dict, labeled_cases: int | list[int]) -> list[int]:
    """A count takes the first patients of the published labelled order; a list names them."""
    train = list(splits["train"])
    if isinstance(labeled_cases, int):
        if not 1 <= labeled_cases <= len(train):
            raise DataError(
                f"data.labeled_cases={labeled_cases} but the training split has {len(train)} patients"
            )
        order = splits["labeled_order"]
        if labeled_cases > len(order):  # taking fewer than asked would silently change the experiment
            raise DataError(
                f"data.labeled_cases={labeled_cases} but splits.json's labeled_order lists only {len(order)} "
                "patients; extend labeled_order or name the patients as a list"
            )
        return list(order[:labeled_cases])
    if len(set(labeled_cases)) != len(labeled_cases):
        raise DataError(f"data.labeled_cases lists a patient twice: {labeled_cases}")
    unknown = sorted(set(labeled_cases) - set(train))
    if unknown:
        raise DataError(f"data.labeled_cases names patients {unknown} that are not in the training split")
    if not labeled_cases:
        raise DataError("data.labeled_cases is an empty list")
    return list(labeled_cases)


def load_volumes(root: Path, patients: list[int]) -> list[Volume]:
    return [read_h5_volume(path) for pid in patients for path in patient_files(root, pid)]


def _root(cfg: Config) -> Path:
    root = resolve_path(cfg.data.root)
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist")
    return root


def load_acdc_split(cfg: Config, split: str) -> list[Volume]:
    root = _root(cfg)
    return load_volumes(root, load_splits(root)[split])


def _patients(cfg: Config) -> tuple[Path, dict[str, list[int]]]:
    """The patients of each split: labelled (``data.labeled_cases``), unlabelled, val, test."""
    root = _root(cfg)
    splits = load_splits(root)
    labeled = labeled_patients(splits, cfg.data.labeled_cases)
    unlabeled = [p for p in splits["train"] if p not in labeled]
    return root, {"labeled": labeled, "unlabeled": unlabeled, "val": splits["val"], "test": splits["test"]}


def acdc_split_lists(cfg: Config) -> dict[str, list[str]]:
    return {split: [f"patient{p:03d}" for p in patients] for split, patients in _patients(cfg)[1].items()}


def load_acdc(cfg: Config) -> SegmentationData:
    root, patients = _patients(cfg)
    return SegmentationData(
        labeled=training_set(load_volumes(root, patients["labeled"]), cfg, keep_labels=True),
        unlabeled=training_set(load_volumes(root, patients["unlabeled"]), cfg, keep_labels=False),
        val=load_volumes(root, patients["val"]),
        num_classes=NUM_CLASSES,
        class_names=CLASS_NAMES,
        in_channels=1,
    )


DATASETS.register("acdc")(DatasetReader(load_acdc, load_acdc_split, acdc_split_lists))
