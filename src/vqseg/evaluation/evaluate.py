"""``vqseg evaluate RUN_DIR``: score a run's checkpoint on a split of its own data or of any prepared
dataset (``--data``), and write a JSON + markdown summary and a per-case CSV.

Distances are in mm from each case's own header spacing when its files store one (NIfTI), in
voxels for the bundled h5 volumes and phantoms and in pixels for 2D images, unless ``--spacing``
gives one for every case (one value per axis of the stored files, in their order); the unit is
stated in every output.

A run is scored only on the split it was trained with (``split.json`` in the run folder, see
``engine/run_dir.py``); another dataset (``--data``) is matched to the run's classes by name.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from vqseg.config import Config, ConfigError, resolve_path
from vqseg.data import Volume, load_split, split_lists
from vqseg.data.casefiles import prediction_filename, stored_values, write_labels
from vqseg.data.prepare import open_prepared
from vqseg.data.volumes import DataError
from vqseg.inference import Inference, predict_cases
from vqseg.io import replace_atomically
from vqseg.metrics import ClassScore, aggregate, format_markdown, score_volume
from vqseg.registry import DATASETS
from vqseg.run import check_pinned_split, load_run, run_rules, select_device

CSV_COLUMNS = ("case", "class", "dice", "jaccard", "hd95", "asd", "missed", "units")


def parse_class_map(text: str | None) -> dict[str, str] | None:
    """``--class-map OTHER=RUN,...`` -> {other class name: run class name}, lower case."""
    if not text:
        return None
    pairs = {}
    for item in text.split(","):
        other, sep, run = item.partition("=")
        if not sep or not other.strip() or not run.strip():
            raise ConfigError(f"--class-map {text!r}: expected OTHER=RUN pairs separated by commas, got {item!r}")
        pairs[other.strip().lower()] = run.strip().lower()
    return pairs


def class_lookup(other: list[str], run: list[str], data_dir: Path, class_map: dict[str, str] | None) -> np.ndarray:
    """Other dataset's class index -> the run's, matching foreground classes by name (case-insensitive)
    or by ``class_map``; a mismatch is refused, since indices alone can swap two structures silently."""
    own = [name.lower() for name in run]
    theirs = [name.lower() for name in other]
    if class_map is None:
        if sorted(theirs) != sorted(own) or len(set(own)) != len(own):
            raise DataError(
                f"{data_dir}: its classes ({', '.join(other)}) do not match the run's ({', '.join(run)}) by name; "
                "say which is which with --class-map OTHER=RUN,..."
            )
        class_map = {name: name for name in theirs}
    unknown = sorted(set(class_map) - set(theirs)) + sorted(set(class_map.values()) - set(own))
    if unknown or set(class_map) != set(theirs) or len(set(class_map.values())) != len(own):
        raise DataError(
            f"--class-map must pair each of {data_dir}'s classes ({', '.join(other)}) with a different one of the "
            f"run's ({', '.join(run)})" + (f"; unknown names: {', '.join(unknown)}" if unknown else "")
        )
    return np.array([0, *(own.index(class_map[name]) + 1 for name in theirs)], dtype=np.uint8)


def other_dataset_volumes(
    cfg: Config, data_dir: Path, split: str, class_map: dict[str, str] | None = None
) -> list[Volume]:
    """A split of any prepared dataset, read with its own plan and the run's intensity rule, its labels
    renumbered to the run's classes (matched by name); channels must match."""
    prepared = open_prepared(data_dir)
    info = prepared.info
    if info["num_classes"] != cfg.data.num_classes:
        raise DataError(
            f"{data_dir}: has num_classes={info['num_classes']} ({', '.join(info['class_names'])}) but the run was "
            f"trained with {cfg.data.num_classes} ({', '.join(cfg.data.class_names)})"
        )
    if info["in_channels"] != cfg.data.in_channels:
        raise DataError(
            f"{data_dir}: has in_channels={info['in_channels']} but the run was trained with {cfg.data.in_channels}"
        )
    lookup = class_lookup(info["class_names"], cfg.data.class_names, data_dir, class_map)
    if not prepared.splits[split]:
        raise DataError(f"{data_dir}: split {split!r} is empty")
    volumes = prepared.volumes(split, run_rules(cfg)[0])
    for volume in volumes:
        volume.label = lookup[volume.label]
    return volumes


def _data_name(cfg: Config) -> str:
    return cfg.data.dataset if DATASETS[cfg.data.dataset].synthetic else str(resolve_path(cfg.data.root))


def _scored(labels: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """One-slice cases (2D data) are scored as images: a 3D surface of one slice is all boundary."""
    if labels.shape[0] == 1:
        return labels[0], spacing[-2:] if spacing else None
    return labels, spacing


def _case_spacing(volume: Volume, override: list[float] | None) -> tuple[tuple[float, ...] | None, str]:
    """The spacing along the volume's axes (slices first); ``override`` is in the stored file's axis
    order (NIfTI i, j, k; the bundled h5 volumes' D, H, W; an image's rows, columns)."""
    if override:
        values = tuple(override)
        if volume.image.shape[0] > 1 and len(values) != 3:
            raise ConfigError(f"--spacing {' '.join(map(str, values))}: {volume.name} is a volume; give 3 values")
        axis = volume.geometry.slice_axis if volume.geometry is not None else None
        if axis is not None:
            values = (values[axis], *(v for i, v in enumerate(values) if i != axis))
        return values, "mm"
    if volume.spacing is not None:
        return tuple(volume.spacing), "mm"
    return None, "pixels" if volume.image.shape[0] == 1 else "voxels"


def _csv_text(names: list[str], scores: list[list[ClassScore]], units: list[str], class_names: list[str]) -> str:
    """The per-case contract: one row per case and foreground class; undefined distances empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, case_scores, unit in zip(names, scores, units):
        for cls, s in zip(class_names, case_scores):
            distances = ["" if d is None else repr(d) for d in (s.hd95_found, s.asd_found)]
            writer.writerow([name, cls, repr(s.dice), repr(s.jaccard), *distances, int(s.missed), unit])
    return out.getvalue()


def eval_stem(split: str, data_dir: Path | None) -> str:
    """Output name: ``eval_<split>`` on the run's own data, ``eval_<split>_<folder>`` on another dataset."""
    return f"eval_{split}" + (f"_{Path(data_dir).name}" if data_dir else "")


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    checkpoint: str = "best",
    device: str = "auto",
    spacing: list[float] | None = None,
    data_dir: Path | None = None,
    save_predictions: bool = False,
    class_map: dict[str, str] | None = None,
) -> dict:
    """Score ``split`` (of the run's data, or of the prepared dataset ``data_dir``); files go in run_dir,
    named ``eval_<split>`` (``eval_<split>_<data folder name>`` with ``data_dir``)."""
    run_dir = Path(run_dir)
    cfg, predictor, state = load_run(run_dir, checkpoint)
    if data_dir:
        volumes = other_dataset_volumes(cfg, Path(data_dir), split, class_map)
    else:
        check_pinned_split(run_dir, split_lists(cfg), "evaluate")
        volumes = load_split(cfg, split)
    dev = select_device(device)
    predictor.to(dev)
    began = time.time()
    predictions = predict_cases(predictor, volumes, Inference.of(cfg), dev)
    predict_s = time.time() - began
    # The run's eval.spacing describes its own data; another dataset's headers describe theirs.
    override = spacing if spacing is not None or data_dir else cfg.eval.spacing
    scores, units = [], []
    for pred, vol in zip(predictions, volumes):
        case_spacing, unit = _case_spacing(vol, override)
        labels, sampling = _scored(pred, case_spacing)
        scores.append(score_volume(labels, _scored(vol.label, case_spacing)[0], cfg.data.num_classes, sampling))
        units.append(unit)
    summary = aggregate(scores, cfg.data.class_names)
    summary.update(
        split=split,
        data=str(data_dir) if data_dir else _data_name(cfg),
        checkpoint=checkpoint,
        checkpoint_step=state.get("step"),
        checkpoint_val_dice=state.get("val_dice"),
        predict_seconds=predict_s,
        total_seconds=time.time() - began,
        units=units[0] if len(set(units)) == 1 else "mixed (see the CSV)",
    )
    stem = eval_stem(split, data_dir)
    if save_predictions:
        folder = run_dir / f"predictions_{stem[len('eval_'):]}"
        folder.mkdir(exist_ok=True)
        values = stored_values(run_rules(cfg)[1], cfg.data.num_classes, cfg.data.mask_values)
        for pred, vol in zip(predictions, volumes):
            write_labels(pred, vol, folder / prediction_filename(vol), values)
        summary["predictions"] = str(folder)
    header = (
        f"# {run_dir.name}: {split} split, {len(volumes)} cases of {summary['data']}, checkpoint '{checkpoint}' "
        f"(step {state.get('step')}, chosen on validation Dice {state.get('val_dice')}); "
        f"distances in {summary['units']}\n\n"
    )
    outputs = {
        ".json": json.dumps(summary, indent=2),
        ".md": header + format_markdown(summary) + "\n",
        ".csv": _csv_text([v.name for v in volumes], scores, units, cfg.data.class_names),
    }
    for suffix, text in outputs.items():
        replace_atomically(run_dir / f"{stem}{suffix}", lambda tmp, text=text: tmp.write_text(text))
    return summary
