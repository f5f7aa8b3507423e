"""Segmentation metrics for the ACDC semi-supervised evaluation protocol.

The numbers must be comparable with published SSL4MIS-style tables, which are
computed with ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``).  The
definitions are therefore reproduced exactly here (numpy + scipy.ndimage only,
so medpy is not a runtime dependency) and checked against medpy in the tests.

Two views are reported because the paper convention hides failures: SSL4MIS
scores a structure the network missed with HD95 = ASD = 0, i.e. the best
possible distance.  The "paper" view keeps that convention for comparability;
the "honest" view averages distances only over volumes where they exist and
counts missed / spurious structures instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from vqseg.data.casefiles import read_nifti
from vqseg.data.volumes import DataError

Spacing = Sequence[float] | None

_METRICS = ("dice", "jaccard", "hd95", "asd")


class EmptyMaskError(ValueError):
    """A surface distance was requested for an empty mask (medpy raises RuntimeError)."""


# ---------------------------------------------------------------------------
# Binary metrics (medpy.metric.binary semantics)
# ---------------------------------------------------------------------------


def _as_bool_pair(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    # medpy treats every non-zero value as foreground and promotes 0-d input.
    p = np.atleast_1d(np.asarray(pred).astype(bool))
    g = np.atleast_1d(np.asarray(gt).astype(bool))
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} does not match gt shape {g.shape}")
    return p, g


def _overlap_counts(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int]:
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p)), int(np.count_nonzero(g))


def _dice_from_counts(inter: int, n_pred: int, n_gt: int) -> float:
    # Two empty masks: medpy 0.5 intends 1.0 (its ZeroDivisionError branch), but
    # with numpy-scalar counts the division yields NaN plus a warning instead, and
    # medpy < 0.5 returned 0.0.  1.0 is the intended value, consistent with jaccard.
    total = n_pred + n_gt
    return 2.0 * inter / total if total else 1.0


def _jaccard_from_counts(inter: int, n_pred: int, n_gt: int) -> float:
    # Two empty masks: 1.0, as medpy 0.5 returns (older releases raised ZeroDivisionError).
    union = n_pred + n_gt - inter
    return inter / union if union else 1.0


def dice(pred: ArrayLike, gt: ArrayLike) -> float:
    """Dice coefficient as ``medpy.metric.binary.dc`` (1.0 for two empty masks)."""
    return _dice_from_counts(*_overlap_counts(*_as_bool_pair(pred, gt)))


def jaccard(pred: ArrayLike, gt: ArrayLike) -> float:
    """Jaccard index as ``medpy.metric.binary.jc`` (1.0 for two empty masks)."""
    return _jaccard_from_counts(*_overlap_counts(*_as_bool_pair(pred, gt)))


def _check_spacing(spacing: Spacing, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing {values} has {len(values)} entries, expected one per axis ({ndim})")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing {values} must contain positive finite values")
    return values


def _cropped_borders(p: np.ndarray, g: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Surface voxels of both masks, restricted to the union bounding box.

    Cropping is exact and needs no padding: scipy erodes with border_value=0 and
    everything just outside the box is background anyway (outside the volume or
    outside both masks), and every surface voxel the distance transform must
    reach lies inside the box.  It makes small structures in large volumes cheap.
    """
    if not p.any():
        raise EmptyMaskError("prediction mask is empty: surface distance is undefined")
    if not g.any():
        raise EmptyMaskError("ground-truth mask is empty: surface distance is undefined")
    union = p | g
    bounds = []
    for axis in range(union.ndim):
        nonzero = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        bounds.append(slice(nonzero[0], nonzero[-1] + 1))
    box = tuple(bounds)
    footprint = generate_binary_structure(p.ndim, connectivity)
    borders = []
    for mask in (p, g):
        cropped = mask[box]
        borders.append(cropped ^ binary_erosion(cropped, structure=footprint, iterations=1))
    return borders[0], borders[1]


def _directed_distances(
    from_border: np.ndarray, to_border: np.ndarray, spacing: tuple[float, ...] | None
) -> np.ndarray:
    """Distance of each surface voxel of ``from_border`` to the nearest one of ``to_border``."""
    return distance_transform_edt(~to_border, sampling=spacing)[from_border]


def _hd95_of(d_pred_gt: np.ndarray, d_gt_pred: np.ndarray) -> float:
    # medpy pools both directions before taking the percentile (not max of two percentiles).
    return float(np.percentile(np.hstack((d_pred_gt, d_gt_pred)), 95))


def hd95(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = None, connectivity: int = 1) -> float:
    """95th percentile Hausdorff distance as ``medpy.metric.binary.hd95``.

    Units are voxels unless ``spacing`` (one value per axis) is given.
    Raises EmptyMaskError if either mask is empty.
    """
    p, g = _as_bool_pair(pred, gt)
    sampling = _check_spacing(spacing, p.ndim)
    bp, bg = _cropped_borders(p, g, connectivity)
    return _hd95_of(_directed_distances(bp, bg, sampling), _directed_distances(bg, bp, sampling))


def asd(pred: ArrayLike, gt: ArrayLike, spacing: Spacing = None, connectivity: int = 1) -> float:
    """Average surface distance as ``medpy.metric.binary.asd``.

    Deliberately one-directional (prediction surface -> ground-truth surface),
    because that is what medpy's ``asd`` and hence the SSL4MIS tables report.
    Raises EmptyMaskError if either mask is empty.
    """
    p, g = _as_bool_pair(pred, gt)
    sampling = _check_spacing(spacing, p.ndim)
    bp, bg = _cropped_borders(p, g, connectivity)
    return float(_directed_distances(bp, bg, sampling).mean())


# ---------------------------------------------------------------------------
# Per-volume scoring and aggregation
# ---------------------------------------------------------------------------


@dataclass
class ClassScore:
    """Scores of one foreground class in one volume.

    ``dice``/``jaccard``/``hd95``/``asd`` follow the SSL4MIS convention so that
    means are comparable with published tables:

    - both masks non-empty: medpy metrics;
    - prediction empty (structure missed): 0, 0, 0, 0;
    - prediction non-empty but ground truth empty (spurious): 0, 0, 0, 0;
    - both empty: 1, 1, 0, 0 (never happens on ACDC test volumes).

    ``hd95_found``/``asd_found`` are the honest distances: None whenever they
    are undefined, instead of the flattering 0.
    """

    dice: float
    jaccard: float
    hd95: float
    asd: float
    missed: bool
    spurious: bool
    hd95_found: float | None
    asd_found: float | None


def _score_masks(p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...] | None) -> ClassScore:
    inter, n_pred, n_gt = _overlap_counts(p, g)
    if n_pred and n_gt:
        # SSL4MIS calls medpy with its default connectivity=1.
        bp, bg = _cropped_borders(p, g, connectivity=1)
        d_pred_gt = _directed_distances(bp, bg, spacing)
        h = _hd95_of(d_pred_gt, _directed_distances(bg, bp, spacing))
        a = float(d_pred_gt.mean())
        return ClassScore(
            dice=_dice_from_counts(inter, n_pred, n_gt),
            jaccard=_jaccard_from_counts(inter, n_pred, n_gt),
            hd95=h,
            asd=a,
            missed=False,
            spurious=False,
            hd95_found=h,
            asd_found=a,
        )
    both_empty = not n_pred and not n_gt
    return ClassScore(
        dice=1.0 if both_empty else 0.0,
        jaccard=1.0 if both_empty else 0.0,
        hd95=0.0,
        asd=0.0,
        missed=bool(n_gt) and not n_pred,
        spurious=bool(n_pred) and not n_gt,
        hd95_found=None,
        asd_found=None,
    )


def score_volume(
    pred_labels: ArrayLike, gt_labels: ArrayLike, num_classes: int, spacing: Spacing = None
) -> list[ClassScore]:
    """Score foreground classes ``1..num_classes-1`` of two integer label volumes.

    Labels outside ``[0, num_classes)`` raise ValueError, because silently
    ignoring them would hide a wrong ``num_classes``.
    """
    pred = np.asarray(pred_labels)
    gt = np.asarray(gt_labels)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, vol in (("prediction", pred), ("ground truth", gt)):
        if vol.size and (vol.min() < 0 or vol.max() >= num_classes):
            raise ValueError(
                f"{name} labels span [{vol.min()}, {vol.max()}], "
                f"outside [0, {num_classes}) for num_classes={num_classes}"
            )
    sampling = _check_spacing(spacing, pred.ndim)
    return [_score_masks(pred == c, gt == c, sampling) for c in range(1, num_classes)]


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.mean(found)) if found else None


def aggregate(volume_scores: list[list[ClassScore]], class_names: list[str]) -> dict:
    """Average per-volume scores: over volumes per class, then over classes.

    ``dice_std`` is the population std over volumes (ddof=0, defined for a
    single volume); in ``mean`` it is the std over volumes of the per-volume
    class-averaged Dice.  Honest distances average only the volumes where the
    structure was found and are None if it never was; honest ``missed`` and
    ``spurious`` are counts (summed over classes in ``mean``).
    """
    if not volume_scores:
        raise ValueError("aggregate needs at least one volume")
    for i, scores in enumerate(volume_scores):
        if len(scores) != len(class_names):
            raise ValueError(
                f"volume {i} has {len(scores)} class scores but {len(class_names)} class names were given"
            )

    paper: dict[str, dict] = {}
    honest: dict[str, dict] = {}
    for k, name in enumerate(class_names):
        per_vol = [scores[k] for scores in volume_scores]
        paper[name] = {m: float(np.mean([getattr(s, m) for s in per_vol])) for m in _METRICS}
        paper[name]["dice_std"] = float(np.std([s.dice for s in per_vol]))
        honest[name] = {
            "dice": paper[name]["dice"],
            "dice_std": paper[name]["dice_std"],
            "jaccard": paper[name]["jaccard"],
            "hd95": _mean_or_none([s.hd95_found for s in per_vol]),
            "asd": _mean_or_none([s.asd_found for s in per_vol]),
            "missed": sum(s.missed for s in per_vol),
            "spurious": sum(s.spurious for s in per_vol),
        }

    dice_std_mean = float(np.std([np.mean([s.dice for s in scores]) for scores in volume_scores]))
    paper_mean = {m: _mean_or_none([paper[n][m] for n in class_names]) for m in _METRICS}
    paper_mean["dice_std"] = dice_std_mean
    honest_mean = {m: _mean_or_none([honest[n][m] for n in class_names]) for m in _METRICS}
    honest_mean["dice_std"] = dice_std_mean
    honest_mean["missed"] = sum(honest[n]["missed"] for n in class_names)
    honest_mean["spurious"] = sum(honest[n]["spurious"] for n in class_names)
    return {
        "paper": {"per_class": paper, "mean": paper_mean},
        "honest": {"per_class": honest, "mean": honest_mean},
        "num_volumes": len(volume_scores),
    }


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_markdown(summary: dict) -> str:
    """Markdown table of an ``aggregate`` summary: paper columns, then honest ones."""
    header = (
        "| Class | Dice | Jaccard | HD95 | ASD | HD95 (found) | ASD (found) | #missed |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    rows = []
    paper, honest = summary["paper"], summary["honest"]
    entries = [(name, paper["per_class"][name], honest["per_class"][name]) for name in paper["per_class"]]
    entries.append(("**mean**", paper["mean"], honest["mean"]))
    for name, p, h in entries:
        rows.append(
            f"| {name} | {_fmt(p['dice'], 4)} | {_fmt(p['jaccard'], 4)} | {_fmt(p['hd95'], 2)} | "
            f"{_fmt(p['asd'], 2)} | {_fmt(h['hd95'], 2)} | {_fmt(h['asd'], 2)} | {h['missed']} |"
        )
    note = (
        f"\n\n{summary['num_volumes']} volumes. HD95/ASD: SSL4MIS convention (0 for missed structures); "
        "(found): averaged only where the structure is present in both prediction and ground truth."
    )
    return "\n".join([header, *rows]) + note


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    data, zooms, _ = read_nifti(path)  # the file's own axis order: metrics compare two files as stored
    return data, zooms


class _MissingDataset(Exception):
    """The HDF5 file is readable but lacks the SSL4MIS ``label`` dataset."""


def _read_h5(path: Path) -> tuple[np.ndarray, None]:
    import h5py

    with h5py.File(path, "r") as f:
        if not isinstance(f.get("label"), h5py.Dataset):
            raise _MissingDataset(f"no 'label' dataset (found: {sorted(f.keys())})")
        return f["label"][()], None


def load_label_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Load an integer label volume from NIfTI (.nii/.nii.gz) or SSL4MIS-style HDF5.

    Returns ``(labels as int64, spacing)``; spacing comes from the NIfTI zooms
    and is None for HDF5, which stores none.  Every failure is a DataError that
    names the file, so a CLI can report it without a traceback.
    """
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if name.endswith((".nii", ".nii.gz")):
        reader = _read_nifti
    elif name.endswith((".h5", ".hdf5")):
        reader = _read_h5
    else:
        raise DataError(f"{path}: unknown extension (expected .nii, .nii.gz, .h5 or .hdf5)")
    try:
        data, spacing = reader(path)
    except _MissingDataset as exc:
        raise DataError(f"{path}: {exc}") from None
    except DataError:
        raise
    except Exception as exc:  # loaders raise many types (OSError, EOFError, ImageFileError, zlib.error...)
        raise DataError(f"{path}: cannot read file ({type(exc).__name__}: {exc})") from None

    data = np.asarray(data)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: not a label map: labels must be integers, found non-integer values")
    elif data.dtype.kind not in "biu":
        raise DataError(f"{path}: not a label map: labels must be integers, found dtype {data.dtype}")
    if data.size and data.min() < 0:
        raise DataError(f"{path}: not a label map: labels must be non-negative, found {data.min()}")
    return data.astype(np.int64), spacing


# Without --num-classes, a file with more distinct values than this is taken for an intensity
# image (a CT or MR volume given by mistake), not a label map: scoring it would report hundreds of
# meaningless "classes". Segmentation label maps in this field have far fewer.
MAX_INFERRED_LABELS = 32


def _check_labels(path: str | Path, labels: np.ndarray, num_classes: int | None) -> np.ndarray:
    """The foreground labels of one file, refused when they cannot belong to a label map."""
    present = np.unique(labels)
    if num_classes is not None:
        if present.size and present[-1] >= num_classes:
            raise DataError(
                f"{path}: not a label map for --num-classes {num_classes}: labels span 0..{present[-1]}"
            )
    elif present.size > MAX_INFERRED_LABELS:
        raise DataError(
            f"{path}: {present.size} distinct values (0..{present[-1]}) look like an intensity image, not a label "
            f"map (more than {MAX_INFERRED_LABELS}); give --num-classes if it really holds that many classes"
        )
    return present[present > 0]


def _header_spacing(
    pred_path: str | Path, pred: tuple[float, ...] | None, gt_path: str | Path, gt: tuple[float, ...] | None
) -> tuple[float, ...] | None:
    """The files' own spacing: both headers must agree (a disagreement hints at a mismatched pair)."""
    if pred is not None and gt is not None and not np.allclose(pred, gt, rtol=1e-4):
        raise DataError(
            f"voxel spacing differs between {pred_path} {pred} and {gt_path} {gt}; give --spacing explicitly"
        )
    spacing, path = (gt, gt_path) if gt is not None else (pred, pred_path)
    if spacing is not None and not all(math.isfinite(z) and z > 0 for z in spacing):
        raise DataError(f"{path}: header spacing {spacing} is not positive; give --spacing explicitly")
    return spacing


def compare_volumes(
    pred_path: str | Path,
    gt_path: str | Path,
    spacing: Spacing = None,
    num_classes: int | None = None,
) -> dict:
    """Compare a predicted and a ground-truth label file class by class.

    Scored classes are the foreground labels present in at least one file: a class absent from
    both has nothing to score, and counting it as a perfect Dice would inflate the mean (it is
    listed under ``absent``). Distances are in mm from ``spacing``, else from the NIfTI headers
    (HDF5 stores none: voxels); ``units`` says which. Distances are the honest ones (None when a
    class is missing from either file), since one comparison should not report a miss as 0.
    """
    pred, pred_spacing = load_label_volume(pred_path)
    gt, gt_spacing = load_label_volume(gt_path)
    if pred.shape != gt.shape:
        raise DataError(
            f"shape mismatch: prediction {pred_path} has shape {pred.shape}, "
            f"ground truth {gt_path} has shape {gt.shape}"
        )
    if num_classes is not None and num_classes < 2:
        raise DataError(f"--num-classes {num_classes}: at least 2 (background and one class)")
    labels = np.union1d(_check_labels(pred_path, pred, num_classes), _check_labels(gt_path, gt, num_classes))
    if spacing is None:
        spacing = _header_spacing(pred_path, pred_spacing, gt_path, gt_spacing)
    try:
        sampling = _check_spacing(spacing, pred.ndim)
    except ValueError as err:
        raise DataError(f"--spacing: {err}") from None
    classes = {}
    for c in labels.tolist():
        s = _score_masks(pred == c, gt == c, sampling)
        classes[str(c)] = {"dice": s.dice, "jaccard": s.jaccard, "hd95": s.hd95_found, "asd": s.asd_found}
    mean = {m: _mean_or_none([cls[m] for cls in classes.values()]) for m in _METRICS}
    absent = [c for c in range(1, num_classes) if str(c) not in classes] if num_classes is not None else []
    return {
        "classes": classes,
        "mean": mean,
        "absent": absent,
        "units": "mm" if sampling else "voxels",
        "spacing": list(sampling) if sampling else None,
    }


def format_compare(result: dict) -> str:
    """Plain-text table of a ``compare_volumes`` result for terminal output, units stated."""
    lines = [f"{'class':<8}{'Dice':>10}{'Jaccard':>10}{'HD95':>10}{'ASD':>10}"]
    rows = list(result["classes"].items()) + [("mean", result["mean"])]
    for name, m in rows:
        cells = (_fmt(m["dice"], 4), _fmt(m["jaccard"], 4), _fmt(m["hd95"], 2), _fmt(m["asd"], 2))
        lines.append(f"{name:<8}" + "".join(f"{c:>10}" for c in cells))
    unit = "mm, spacing " + " x ".join(f"{z:g}" for z in result["spacing"]) if result["units"] == "mm" else "voxels"
    lines.append(f"distances in {unit}")
    if not result["classes"]:
        lines.append("no foreground label in either file: nothing to score")
    if result["absent"]:
        lines.append(f"not scored (in neither file): classes {', '.join(map(str, result['absent']))}")
    return "\n".join(lines)
