"""nnU-Net v2 raw datasets, read as they are.

Layout::

    DATA_DIR/
      dataset.json   {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "RV": 1, ...},
                      "file_ending": ".nii.gz", "numTraining": N}
      imagesTr/      CASE_0000.nii.gz (+ CASE_0001... for further channels)
      labelsTr/      CASE.nii.gz (cases without one are unlabelled training data)
      imagesTs/      (optional) cases to predict

Class names come from ``labels`` (sorted by value, background left out); region-based labels
(lists of values) are not supported and are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vqseg.data.casefiles import IMAGE_SUFFIXES, NIFTI_SUFFIXES, Case
from vqseg.data.volumes import DataError

CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")


def is_nnunet(root: Path) -> bool:
    return (root / "dataset.json").is_file()


def read_dataset_json(root: Path) -> dict:
    """``dataset.json`` checked: channel names, labels 0..K-1 with background 0, a supported file ending."""
    path = root / "dataset.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a JSON object")
    channels = spec.get("channel_names") or spec.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise DataError(f"{path}: 'channel_names' is missing or empty")
    labels = spec.get("labels")
    if isinstance(labels, dict) and "ignore" in labels:
        raise DataError(f"{path}: the 'ignore' label (sparse annotation) is not supported")
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise DataError(f"{path}: 'labels' must map names to integer values (region-based labels are not supported)")
    values = sorted(labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise DataError(f"{path}: 'labels' must use the values 0..K-1 once each with K >= 2, got {values}")
    ending = spec.get("file_ending")
    if ending not in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        raise DataError(f"{path}: 'file_ending' {ending!r} is not supported; use one of {list(NIFTI_SUFFIXES + IMAGE_SUFFIXES)}")
    names = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    try:
        channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
    except ValueError:
        raise DataError(f"{path}: 'channel_names' keys must be channel indices 0, 1, ...") from None
    return {
        "channels": len(channels), "channel_names": channel_names, "class_names": names[1:], "num_classes": len(names),
        "file_ending": ending,
    }


def group_channel_files(files: list[Path], ending: str, folder: Path) -> dict[str, list[Path]]:
    """``CASE_0000``, ``CASE_0001``... -> case name -> its channel files in order; gaps are refused."""
    channels: dict[str, dict[int, Path]] = {}
    for path in files:
        match = CHANNEL_FILE.match(path.name[: -len(ending)])
        if not match:
            raise DataError(f"{path}: image names must end in _0000{ending} (one file per channel)")
        channels.setdefault(match.group(1), {})[int(match.group(2))] = path
    cases = {}
    for name, found in sorted(channels.items()):
        for index in range(max(found) + 1):
            if index not in found:
                raise DataError(f"{folder / f'{name}_{index:04d}{ending}'}: channel file missing for case {name}")
        cases[name] = [found[i] for i in range(len(found))]
    return cases


def list_cases(root: Path, spec: dict, folder: str = "imagesTr") -> dict[str, Case]:
    """Cases of ``imagesTr`` with their ``labelsTr`` label where there is one."""
    ending = spec["file_ending"]
    images = root / folder
    if not images.is_dir():
        raise DataError(f"{images}: folder is missing (nnU-Net raw layout: imagesTr/, labelsTr/, dataset.json)")
    files = sorted(p for p in images.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    if not files:
        raise DataError(f"{images}: no images ending in {ending}")
    grouped = group_channel_files(files, ending, images)
    labels_dir = root / "labelsTr"
    labels = (
        {p.name[: -len(ending)]: p for p in labels_dir.iterdir() if p.name.endswith(ending)} if labels_dir.is_dir() else {}
    )
    for name, path in sorted(labels.items()):
        if name not in grouped:
            raise DataError(f"{path}: label without an image {name}_0000{ending} in {images}")
    return {name: Case(name, paths, labels.get(name)) for name, paths in grouped.items()}
