"""Reading and writing the files of a user's own dataset: 2D images (PIL) and NIfTI volumes (nibabel).

Shared by both dataset formats (image folder, nnU-Net v2 raw), by ``vqseg prepare``, training,
``evaluate`` and ``predict``, so a case is read the same way everywhere.

Geometry: a NIfTI volume is never reoriented. Slices are taken along one array axis for every
file of a dataset: the plan's (``vqseg prepare`` chooses it once from the dataset's median spacing,
``data/plan.py``), else the axis with the largest spacing of the case's first image file; a label
file and further channel files are always read along their image's axis, so they can never be
transposed against it. A prediction is moved back to the input's axis order and written with the
input's own affine and header, so it overlays the input exactly in any viewer.

Intensity rules (``data.intensity``), applied per case and channel so the network sees roughly
[0, 1] as with the bundled data: ``divide255`` (8-bit images), ``percentile`` (clip to the 0.5 and
99.5 percentiles, then min-max: NIfTI and 16-bit or float images), ``minmax`` (the bundled ACDC
volumes' own preprocessing). ``auto`` resolves to the bundled dataset's rule.

Label encodings (``data.label_encoding``): ``labels`` (values are class indices), ``binary01``,
``binary255``, ``threshold`` (values near 0 and near the dataset's maximum, e.g. JPEG-compressed
binary masks: foreground is at least half the maximum) and ``values`` (grey levels such as
0/128/255 that the user mapped to classes, ``vqseg prepare --mask-values``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from vqseg.data.volumes import DataError, Geometry, Volume, check_volume
from vqseg.io import replace_atomically

if TYPE_CHECKING:
    import nibabel as nib

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
INTENSITY_RULES = ("divide255", "percentile", "minmax")
LABEL_ENCODINGS = ("labels", "binary01", "binary255", "threshold", "values")
# What ``auto`` means for the bundled datasets (their readers normalise on their own).
_BUNDLED = {
    "acdc": ("minmax", "labels"), "phantom": ("minmax", "labels"), "vessels": ("minmax", "labels"),
    "cvc": ("divide255", "threshold"),
}
_GREY_MODES = ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1")


def suffix_of(path: Path) -> str | None:
    """The supported file ending of ``path`` (lower case), or None."""
    name = path.name.lower()
    return next((s for s in NIFTI_SUFFIXES + IMAGE_SUFFIXES if name.endswith(s)), None)


def stem_of(path: Path) -> str:
    suffix = suffix_of(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def is_nifti(path: Path) -> bool:
    return suffix_of(path) in NIFTI_SUFFIXES


@dataclass
class Case:
    """One case's files: one image file per channel group (nnU-Net ``_0000``, ``_0001``...) and its label."""

    name: str
    images: list[Path]
    label: Path | None = None


@dataclass
class Raw:
    """An array as stored, in D x C x H x W order, with what is needed to write a result back.

    ``spacing`` follows the array (slice axis first); ``zooms`` is the header's, in file axis order.
    """

    array: np.ndarray
    spacing: tuple[float, ...] | None
    geometry: Geometry
    zooms: tuple[float, ...] | None = None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")


# Spacings within this fraction of the largest count as equal: header floats (0.9 vs 0.90001)
# must not decide the slicing plane.
SPACING_TOLERANCE = 0.01


def slice_axis(zooms: tuple[float, ...], tolerance: float = SPACING_TOLERANCE) -> int:
    """The axis with the largest spacing; spacings within ``tolerance`` (relative) of it are ties,
    and ties go to the last such axis (NIfTI's usual slice axis, nnU-Net's choice too)."""
    z = np.asarray(zooms, dtype=float)
    return int(np.flatnonzero(z >= z.max() * (1 - tolerance))[-1])


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], nib.Nifti1Image]:
    """The one NIfTI reader: the array in the file's own axis order (never reoriented), the zooms of
    those axes and the image (affine, header); any failure is a DataError naming the file."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError...)
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from None
    return data, tuple(float(z) for z in img.header.get_zooms()[: data.ndim]), img


def _read_nifti(path: Path, axis: int | None) -> Raw:
    data, zooms, img = read_nifti(path)
    geometry = Geometry(path, tuple(data.shape), None, img.affine.copy(), img.header.copy())
    if data.ndim == 2:
        return Raw(data[None, None], (1.0, *zooms), geometry, zooms)
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 2D or 3D volume, got shape {data.shape} (store one channel per file)")
    axis = slice_axis(zooms) if axis is None else axis
    geometry.slice_axis = axis
    spacing = (zooms[axis], *(z for i, z in enumerate(zooms) if i != axis))
    return Raw(np.moveaxis(data, axis, 0)[:, None], spacing, geometry, zooms)


def _read_picture(path: Path, mask: bool) -> Raw:
    try:
        with Image.open(path) as img:
            img.load()
            if mask:
                array = _mask_array(img, path)
            elif img.mode in _GREY_MODES:
                array = np.asarray(img.convert("L") if img.mode in ("LA", "1") else img)[..., None]
            else:
                array = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err})") from None
    if mask:
        return Raw(array[None, None], None, Geometry(path, tuple(array.shape)))
    return Raw(array.transpose(2, 0, 1)[None], None, Geometry(path, tuple(array.shape[:2])))


def _mask_array(img: Image.Image, path: Path) -> np.ndarray:
    """Palette masks give their indices; RGB masks must be grey (equal channels), else they are refused."""
    if img.mode == "LA":
        img = img.convert("L")
    if img.mode == "P" or img.mode in _GREY_MODES:
        return np.asarray(img).astype(np.int64)
    rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    if not (rgb == rgb[..., :1]).all():
        raise DataError(f"{path}: mask is coloured (its RGB channels differ); store masks as grey label maps")
    return rgb[..., 0]


def read_file(path: Path, mask: bool = False, axis: int | None = None) -> Raw:
    """Read one image or label file; every failure is a DataError naming the file.

    ``axis``: the array axis a 3D volume is sliced along (None: its own largest spacing).
    """
    _check_file(path)
    return _read_nifti(path, axis) if is_nifti(path) else _read_picture(path, mask)


def _same_geometry(a: Raw, b: Raw) -> bool:
    if a.array.shape[0] != b.array.shape[0] or a.array.shape[-2:] != b.array.shape[-2:]:
        return False
    if (a.geometry.affine is None) != (b.geometry.affine is None):
        return False
    return a.geometry.affine is None or bool(np.allclose(a.geometry.affine, b.geometry.affine, atol=1e-3))


def check_geometry(reference: Raw, other: Raw, what: str) -> None:
    """nnU-Net's integrity rule: same shape, and for NIfTI the same affine (spacing, origin, direction)."""
    if not _same_geometry(reference, other):
        raise DataError(
            f"{other.geometry.source}: {what} shape {other.geometry.shape} or geometry (affine) differs from "
            f"{reference.geometry.source} (shape {reference.geometry.shape})"
        )


def read_images(case: Case, axis: int | None = None) -> Raw:
    """All image files of a case, stacked as channels, checked to share one geometry; every
    channel is sliced along ``axis`` (None: the first file's own largest spacing)."""
    first = read_file(case.images[0], axis=axis)
    parts = [first, *(read_file(path, axis=first.geometry.slice_axis) for path in case.images[1:])]
    for part in parts[1:]:
        check_geometry(parts[0], part, "channel")
    array = np.concatenate([p.array for p in parts], axis=1) if len(parts) > 1 else parts[0].array
    if not np.isfinite(array).all():
        raise DataError(f"{case.images[0]}: image contains NaN or Inf intensities")
    return Raw(array, first.spacing, first.geometry, first.zooms)


def normalise(array: np.ndarray, rule: str, source: Path) -> np.ndarray:
    """Apply an intensity rule per channel over the whole case; returns float32."""
    if rule == "divide255":
        if array.dtype != np.uint8:
            raise DataError(
                f"{source}: data.intensity=divide255 expects 8-bit images like the training data, got {array.dtype}"
            )
        return array.astype(np.float32) / 255.0
    if rule not in ("percentile", "minmax"):
        raise DataError(f"data.intensity={rule!r} is unknown; choose from {list(INTENSITY_RULES)}")
    x = array.astype(np.float32)
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        channel = x[:, c]
        low, high = np.percentile(channel, (0.5, 99.5)) if rule == "percentile" else (channel.min(), channel.max())
        channel = np.clip(channel, low, high)
        out[:, c] = (channel - low) / (high - low) if high > low else 0.0
    return out


def decode_labels(
    raw: np.ndarray, encoding: str, num_classes: int, mask_max: int, source: Path, mask_values: list[int] | None = None
) -> np.ndarray:
    """Stored mask values -> class indices; anything that does not fit the encoding is refused."""
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        raise DataError(f"{source}: label holds non-integer values")
    values = np.unique(raw).astype(np.int64)
    if encoding == "threshold":
        top = int(values.max()) if values.size else 0
        if 0 < top < mask_max / 2:
            raise DataError(
                f"{source}: mask values reach only {top}, under half the dataset's mask maximum {mask_max}: "
                "it would read as empty"
            )
        return (raw >= mask_max / 2).astype(np.uint8)
    if encoding == "values":
        if not mask_values:
            raise DataError(f"{source}: label encoding 'values' needs the mask values of each class (--mask-values)")
        outside = sorted(set(values.tolist()) - set(mask_values))
        if outside:
            raise DataError(f"{source}: mask values {outside[:5]} are not among --mask-values {mask_values}")
        lookup = np.zeros(max(mask_values) + 1, np.uint8)
        lookup[mask_values] = np.arange(len(mask_values))
        return lookup[raw.astype(np.int64)]
    if encoding == "binary255":
        allowed, scale = {0, 255}, 255
    elif encoding in ("labels", "binary01"):
        allowed, scale = set(range(num_classes)), 1
    else:
        raise DataError(f"data.label_encoding={encoding!r} is unknown; choose from {list(LABEL_ENCODINGS)}")
    outside = sorted(set(values.tolist()) - allowed)
    if outside:
        raise DataError(f"{source}: label values {outside[:5]} are outside the declared labels {sorted(allowed)}")
    return (raw // scale).astype(np.uint8)


def read_case(
    case: Case,
    intensity: str,
    encoding: str,
    num_classes: int,
    mask_max: int = 255,
    with_label: bool = True,
    axis: int | None = None,
    mask_values: list[int] | None = None,
) -> Volume:
    """One case as a Volume: channels stacked, intensities normalised, labels decoded and checked.

    ``axis``: the plan's slicing axis for 3D volumes (None: the case's own largest spacing); the
    label is read along the image's axis whatever its own header says.
    """
    raw = read_images(case, axis)
    image = normalise(raw.array, intensity, case.images[0])
    label = None
    if with_label and case.label is not None:
        stored = read_file(case.label, mask=True, axis=raw.geometry.slice_axis)
        check_geometry(raw, stored, "label")
        label = decode_labels(stored.array[:, 0], encoding, num_classes, mask_max, case.label, mask_values)
        check_volume(image, label, num_classes, case.label)
    return Volume(case.name, image, label, raw.spacing, raw.geometry)


# ---------------------------------------------------------------------------------------------
# Writing results
# ---------------------------------------------------------------------------------------------


def prediction_filename(volume: Volume) -> str:
    """The input's name: NIfTI keeps its ending; 2D images become PNG (lossless); stacks without a header NIfTI."""
    source = volume.geometry.source if volume.geometry is not None else None
    if source is not None and is_nifti(source):
        return volume.name + suffix_of(source)
    return volume.name + (".png" if volume.image.shape[0] == 1 else ".nii.gz")


def resolved_rules(dataset: str, intensity: str, encoding: str) -> tuple[str, str]:
    """A run's (intensity rule, label encoding) with ``auto`` replaced by the bundled dataset's rule."""
    default_intensity, default_encoding = _BUNDLED.get(dataset, ("percentile", "labels"))
    return (
        default_intensity if intensity == "auto" else intensity,
        default_encoding if encoding == "auto" else encoding,
    )


def to_input_order(array: np.ndarray, geometry: Geometry | None) -> np.ndarray:
    """A slice stack (D first, any trailing axes) -> the input file's own axis order.

    NIfTI: the slice axis goes back where it came from; a 2D picture or 2D NIfTI drops D.
    """
    if geometry is not None and geometry.affine is not None:
        return array[0] if geometry.slice_axis is None else np.moveaxis(array, 0, geometry.slice_axis)
    return array[0] if array.shape[0] == 1 else array


def write_labels(labels: np.ndarray, volume: Volume, path: Path, values: np.ndarray | None = None) -> None:
    """Write predicted labels (D x H x W) in the input's geometry: NIfTI with its affine and header, else
    PNG with class k stored as ``values[k]`` (default: k)."""
    data = to_input_order(labels, volume.geometry).astype(np.uint8)
    if is_nifti(path):
        payload = _label_nifti(data, volume.geometry).to_bytes()
        if path.name.lower().endswith(".gz"):
            payload = gzip.compress(payload, compresslevel=1)  # label maps compress well even at the fastest level
        replace_atomically(path, lambda tmp: tmp.write_bytes(payload))
        return
    if data.ndim != 2:
        raise DataError(f"{path}: a {labels.shape[0]}-slice prediction cannot be written as a 2D image")
    stored = data.astype(np.int64) if values is None else values[data]
    picture = Image.fromarray(stored.astype(np.uint8), mode="L")
    replace_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def _label_nifti(data: np.ndarray, geometry: Geometry | None) -> nib.Nifti1Image:
    """A uint8 label image with the input's geometry (qform/sform and their codes, zooms, units kept) but
    none of its display or intensity fields: a viewer would otherwise window the labels like the input
    (``cal_max=3000``) or a reader rescale them (``scl_slope``); the intent says it is a label map."""
    import nibabel as nib

    if geometry is None or geometry.header is None:
        img = nib.Nifti1Image(data, np.eye(4))
    else:  # affine None: the header's own qform/sform (and their codes) are kept as they are
        img = nib.Nifti1Image(data, None, header=geometry.header.copy())
    header = img.header
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    header.set_intent("label")
    header["cal_min"] = header["cal_max"] = 0
    header["descrip"] = b"vqseg prediction"
    return img


def stored_values(encoding: str, num_classes: int, mask_values: list[int] | None = None) -> np.ndarray:
    """Class index -> the value written for it: predicted masks use the training masks' own encoding
    (0/255 stays 0/255, grey levels given by ``--mask-values`` stay those levels)."""
    if encoding == "values" and mask_values:
        return np.asarray(mask_values, dtype=np.int64)
    scale = 255 if encoding in ("binary255", "threshold") else 1
    return np.arange(num_classes, dtype=np.int64) * scale


# Class colours chosen to stand out on grey (MRI, CT) and on red (endoscopy) images alike.
_PALETTE = np.array(
    [[0, 0, 0], [0, 255, 0], [255, 255, 0], [0, 160, 255], [255, 0, 255], [0, 255, 255], [255, 128, 0],
     [128, 0, 255], [255, 255, 255], [128, 255, 128]],
    np.float32,
)


def write_overlay(labels: np.ndarray, volume: Volume, path: Path) -> None:
    """The (normalised) input with each class tinted and its outline drawn opaque, to check a 2D case by eye."""
    from scipy.ndimage import binary_erosion

    image = volume.image[0]
    rgb = np.repeat(image[:1], 3, axis=0) if image.shape[0] != 3 else image
    rgb = np.clip(rgb.transpose(1, 2, 0) * 255.0, 0, 255)
    label = labels[0]
    colour = _PALETTE[label % len(_PALETTE)]
    inside = (label > 0)[..., None]
    outline = (label > 0) & ~binary_erosion(label > 0, iterations=max(1, min(label.shape) // 128))
    blended = np.where(inside, 0.6 * rgb + 0.4 * colour, rgb)
    blended[outline] = colour[outline]
    picture = Image.fromarray(blended.astype(np.uint8), mode="RGB")
    replace_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_probabilities(probabilities: np.ndarray, volume: Volume, path: Path, class_names: list[str]) -> None:
    """Class probabilities (D x K x H x W) as ``probabilities``: classes first, then the input's own axes."""
    array = np.moveaxis(to_input_order(np.moveaxis(probabilities, 1, -1), volume.geometry), -1, 0)
    names = np.array(["background", *class_names])

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, probabilities=array.astype(np.float32, copy=False), class_names=names)

    replace_atomically(path, save)
