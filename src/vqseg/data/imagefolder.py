"""2D image-folder datasets, read as they are: ``images/`` + ``masks/`` matched by file stem.

Layout::

    DATA_DIR/
      images/    any.png | .jpg | .jpeg | .bmp | .tif(f), RGB or grayscale
      masks/     same stems, any of those endings
      unlabeled/ (optional) images without masks: unlabelled training data

The mask encoding is detected once per dataset (``detect_encoding``) and refused when unclear,
so a 0/1 mask is never read as empty by a 0/255 threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqseg.data.casefiles import IMAGE_SUFFIXES, Case, stem_of, suffix_of
from vqseg.data.volumes import DataError

# Masks whose largest value is below this are label maps (class indices); above, binary encodings.
MAX_LABEL_MAP_VALUE = 63
# For JPEG-compressed binary masks: at most this fraction of the brighter pixels may lie in the
# middle band (a quarter to three quarters of the maximum); CVC-ClinicDB's masks have 2 %.
MAX_MIDDLE_FRACTION = 0.05
# Lossless masks are read as soft binary masks (thresholded) only with at least this many distinct
# in-between values (anti-aliased edges); fewer are grey levels of a label map, e.g. 0/128/255.
MIN_SOFT_VALUES = 8
# Up to this many distinct values, a lossless mask that fits no encoding is named a label map.
MAX_GREY_LEVELS = 16
LOSSY_SUFFIXES = (".jpg", ".jpeg")


def is_image_folder(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


def _by_stem(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or suffix_of(path) not in IMAGE_SUFFIXES:
            continue
        stem = stem_of(path)
        if stem in files:
            raise DataError(f"{path}: two files share the name {stem!r} ({files[stem].name}); names must be unique")
        files[stem] = path
    return files


def list_cases(root: Path) -> dict[str, Case]:
    """Every case: images with their masks, then ``unlabeled/`` images (label None)."""
    images, masks = _by_stem(root / "images"), _by_stem(root / "masks")
    if not images:
        raise DataError(f"{root / 'images'}: no images found (endings {', '.join(IMAGE_SUFFIXES)})")
    for stem, mask in masks.items():
        if stem not in images:
            raise DataError(f"{mask}: mask without an image of the same name in {root / 'images'}")
    cases = {}
    for stem, image in images.items():
        if stem not in masks:
            raise DataError(
                f"{image}: image without a mask in {root / 'masks'} (put images without masks in {root / 'unlabeled'})"
            )
        cases[stem] = Case(stem, [image], masks[stem])
    if (root / "unlabeled").is_dir():
        for stem, image in _by_stem(root / "unlabeled").items():
            if stem in cases:
                raise DataError(f"{image}: the name {stem!r} is also used in {root / 'images'}")
            cases[stem] = Case(stem, [image], None)
    return cases


def _is_lossy(path: Path) -> bool:
    return suffix_of(path) in LOSSY_SUFFIXES


def detect_encoding(
    values: dict[Path, tuple[np.ndarray, np.ndarray]], mask_values: list[int] | None = None
) -> tuple[str, int, int, str]:
    """Decide how the masks store labels from every mask's (values, counts).

    Returns (encoding, number of classes, mask maximum, a sentence for the summary). Rules, in order:
    ``mask_values`` given (the user's grey level of each class, background first) -> ``values``;
    only {0, 1} -> ``binary01``; only {0, 255} -> ``binary255``; largest value <= 63 -> ``labels``
    (classes 0..max); largest value >= 128 with at most 5 % of the brighter pixels in the middle
    band, and either lossy (JPEG) files or many distinct in-between values (soft edges) ->
    ``threshold`` at half the maximum. A few grey levels such as 0/128/255 in lossless files are a
    label map whose class order only the user knows: refused, naming the values, unless
    ``mask_values`` says which is which.
    """
    total: dict[int, int] = {}
    for vals, counts in values.values():
        for v, c in zip(vals.tolist(), counts.tolist()):
            total[int(v)] = total.get(int(v), 0) + int(c)
    present = set(total)
    top = max(present)
    if mask_values:
        return _declared_values(values, mask_values)
    if present <= {0, 1}:
        return "binary01", 2, 1, "binary masks with values 0/1"
    if present <= {0, 255}:
        return "binary255", 2, 255, "binary masks with values 0/255"
    if top <= MAX_LABEL_MAP_VALUE:
        return "labels", top + 1, top, f"label maps with class indices 0..{top}"
    if present <= {0, 1, 255}:  # mostly 0/255 with some 0/1 masks: those would read as empty
        odd = next(p for p, (vals, _) in values.items() if vals.max() == 1)
        raise DataError(
            f"{odd}: mask values reach only 1, under half the dataset's mask maximum 255: it would read as empty; "
            "store every mask with the same foreground value"
        )
    between = [v for v in present if 0 < v < top]
    lossy = any(_is_lossy(path) for path in values)
    if top >= 128 and (lossy or len(between) >= MIN_SOFT_VALUES):
        middle = sum(c for v, c in total.items() if top / 4 < v < 3 * top / 4)
        bright = sum(c for v, c in total.items() if v > top / 4)
        if middle <= MAX_MIDDLE_FRACTION * bright:
            return (
                "threshold",
                2,
                top,
                f"binary masks with in-between values (e.g. JPEG), thresholded at {top / 2:g} "
                f"({100 * middle / bright:.1f} % of the bright pixels lie in the middle band)",
            )
    worst = max(values, key=lambda p: np.sum(values[p][1][(values[p][0] > 0) & (values[p][0] < top)]))
    if len(present) <= MAX_GREY_LEVELS and not lossy:
        levels = ",".join(str(v) for v in sorted(present))
        raise DataError(
            f"{worst}: masks hold the grey levels {sorted(present)}, a label map whose class order is not "
            f"known; give each class's value with --mask-values {levels} (background first)"
        )
    raise DataError(
        f"{worst}: mask values are neither class indices (0..{MAX_LABEL_MAP_VALUE}) nor clearly binary "
        f"(values 0..{top}, many in between); store masks as label maps or 0/255 images"
    )


def _declared_values(
    values: dict[Path, tuple[np.ndarray, np.ndarray]], mask_values: list[int]
) -> tuple[str, int, int, str]:
    """The ``values`` encoding, checked: distinct values in 0..255, every stored value among them."""
    if len(set(mask_values)) != len(mask_values) or len(mask_values) < 2:
        raise DataError(f"--mask-values {mask_values}: give at least two distinct values, background first")
    if min(mask_values) < 0 or max(mask_values) > 65535:
        raise DataError(f"--mask-values {mask_values}: values must lie in 0..65535")
    for path, (vals, _) in values.items():
        outside = sorted(set(vals.tolist()) - set(mask_values))
        if outside:
            raise DataError(f"{path}: mask values {outside[:5]} are not among --mask-values {mask_values}")
    levels = "/".join(str(v) for v in mask_values)
    return "values", len(mask_values), max(mask_values), f"grey levels {levels} read as classes 0..{len(mask_values) - 1} (--mask-values)"
