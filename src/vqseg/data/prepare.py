"""``vqseg prepare DATA_DIR``: verify a user's dataset, summarise it, write its split; and read it back.

The format is detected from the folder (``dataset.json`` -> nnU-Net v2 raw, ``images/`` +
``masks/`` -> image folder). Verification follows nnU-Net's ``--verify_dataset_integrity``: every
file readable, image and label of one shape and geometry, labels within the declared ones, no
NaN/Inf. What it detects (format, classes, channels, mask encoding, intensity rule) is written
with the split to ``DATA_DIR/vqseg_splits.json``; training (``data.dataset: prepared``) and
evaluation read only that file and the data, so they never guess again.

The fingerprint and plan (``data/plan.py``) are stored in the same file: every 3D volume of the
dataset is sliced along the plan's axis, in training, evaluation and ``predict``; the plan's "2d" and
"3d" configurations (patch, batch, U-Net topology, target spacing) are what patch training uses.

Splits: groups of cases (``--group REGEX``: cases whose names give the same key, the first regex
group or else the whole match, are never split apart; without it every case is its own group) that
hold a label are shuffled with ``--seed``; test takes the first groups, validation the next,
training the rest; ``--labeled`` picks the training groups that keep their labels, in the same
order. A case without a label is unlabelled training data when its group trains, and is left out
when its group is in validation or test (training on a test patient's other frames would leak it).
The same arguments give the same split.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqseg.config import Config, ConfigError, DataConfig, resolve_path
from vqseg.data import imagefolder, nnunet
from vqseg.data.casefiles import Case, check_geometry, decode_labels, read_case, read_file, read_images
from vqseg.data.plan import FingerprintBuilder, cases_against_plan, describe_configuration, describe_plan, make_plan
from vqseg.data.sets import training_set
from vqseg.data.volumes import DataError, DatasetReader, SegmentationData, Volume
from vqseg.registry import DATASETS

SPLIT_FILE = "vqseg_splits.json"
SPLITS = ("labeled", "unlabeled", "val", "test")
INFO_KEYS = (
    "format", "num_classes", "class_names", "in_channels", "label_encoding", "mask_max", "mask_values", "intensity",
    "plan",
)


@dataclass
class Prepared:
    """A prepared dataset: what prepare detected, its cases and its split."""

    root: Path
    info: dict
    cases: dict[str, Case]
    splits: dict[str, list[str]]

    def volumes(self, split: str, intensity: str | None = None) -> list[Volume]:
        """The split's cases read with the plan: the dataset's own intensity rule, or a run's (cross-dataset)."""
        info = self.info
        return [
            read_case(
                self.cases[name],
                intensity or info["intensity"],
                info["label_encoding"],
                info["num_classes"],
                info["mask_max"],
                with_label=split != "unlabeled",
                axis=info["plan"]["slice_axis"],
                mask_values=info["mask_values"],
            )
            for name in self.splits[split]
        ]


def _list(root: Path) -> tuple[str, dict[str, Case], dict]:
    """Format, cases and what the format itself declares (nnU-Net: classes and channels)."""
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist")
    if nnunet.is_nnunet(root):
        spec = nnunet.read_dataset_json(root)
        return "nnunet", nnunet.list_cases(root, spec), spec
    if imagefolder.is_image_folder(root):
        return "imagefolder", imagefolder.list_cases(root), {}
    raise DataError(
        f"{root}: neither an nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) "
        "nor an image folder (images/ + masks/)"
    )


# ---------------------------------------------------------------------------------------------
# Verification and summary
# ---------------------------------------------------------------------------------------------


@dataclass
class Survey:
    info: dict
    cases: dict[str, Case]
    lines: list[str]


def survey(root: Path, mask_values: list[int] | None = None) -> Survey:
    """Read every file once: integrity checks, fingerprint, plan, detected settings and the summary lines."""
    fmt, cases, spec = _list(root)
    if mask_values and fmt == "nnunet":
        raise DataError(f"{root}: --mask-values is for image folders; an nnU-Net dataset's labels come from dataset.json")
    channels: int | None = spec.get("channels")
    mask_values_found: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    all_uint8, slices = True, 0
    sizes = []
    fingerprint: FingerprintBuilder | None = None
    for case in cases.values():
        raw = read_images(case)
        found = raw.array.shape[1]
        if channels is None:
            channels = found
        if found != channels:
            source = "dataset.json declares" if fmt == "nnunet" else "other cases have"
            raise DataError(f"{case.images[0]}: {found} channel(s) but {source} {channels}")
        all_uint8 &= raw.array.dtype == np.uint8 and raw.geometry.affine is None
        slices += raw.array.shape[0]
        sizes.append(raw.array.shape[-2:])
        stored = None
        if case.label is not None:
            stored = read_file(case.label, mask=True, axis=raw.geometry.slice_axis)
            check_geometry(raw, stored, "label")
            mask_values_found[case.label] = np.unique(stored.array, return_counts=True)
        fingerprint = fingerprint or FingerprintBuilder(channels)
        label = None if stored is None else stored.array[:, 0]
        fingerprint.add(case.name, raw.geometry.shape, raw.zooms, raw.array, label)
    labelled = [c for c in cases.values() if c.label is not None]
    if not labelled:
        raise DataError(f"{root}: no case has a label; at least the validation cases need one")
    if fmt == "nnunet":
        encoding, num_classes, mask_max = "labels", spec["num_classes"], spec["num_classes"] - 1
        names, described = spec["class_names"], "label maps declared in dataset.json"
        channel_names = spec["channel_names"]
    else:
        encoding, num_classes, mask_max, described = imagefolder.detect_encoding(mask_values_found, mask_values)
        names = ["foreground"] if num_classes == 2 else [f"class_{k}" for k in range(1, num_classes)]
        channel_names = ["R", "G", "B"] if channels == 3 else [f"channel_{c}" for c in range(channels)]
    declared = list(mask_values) if encoding == "values" else None
    frequency = np.zeros(num_classes)
    for path, (values, counts) in mask_values_found.items():
        decoded = decode_labels(values, encoding, num_classes, mask_max, path, declared)
        frequency += np.bincount(decoded, weights=counts, minlength=num_classes)
    intensity = "divide255" if all_uint8 else "percentile"
    prints = fingerprint.build(channel_names)
    plan = make_plan(prints, intensity)
    info = {
        "format": fmt,
        "num_classes": num_classes,
        "class_names": names,
        "in_channels": channels,
        "label_encoding": encoding,
        "mask_max": mask_max,
        "mask_values": declared,
        "intensity": intensity,
        "plan": plan,
    }
    share = ", ".join(f"{n} {100 * f / frequency.sum():.2f} %" for n, f in zip(["background", *names], frequency))
    rule = "divided by 255" if all_uint8 else "clipped to the 0.5-99.5 percentiles, then min-max to [0, 1], per case and channel"
    low = min(c["min"] for c in prints["intensity"])
    high = max(c["max"] for c in prints["intensity"])
    spacings = [z for z in prints["spacings"].values() if z is not None and len(z) == 3]
    lines = [
        f"dataset: {root} ({'nnU-Net v2 raw, ' + spec['file_ending'] if fmt == 'nnunet' else 'image folder'})",
        f"cases: {len(cases)} ({len(labelled)} with labels, {len(cases) - len(labelled)} without), slices: {slices}",
        f"channels: {channels} ({', '.join(channel_names)})",
        f"classes ({num_classes}, voxel frequency): {share}",
        f"mask encoding: {described}",
        f"image size (H x W): {_range([s[0] for s in sizes])} x {_range([s[1] for s in sizes])}",
        "spacing: "
        + (
            " x ".join(_range([s[i] for s in spacings], "{:.3g}") for i in range(3)) + " mm (file axis order)"
            if spacings
            else "none stored: distances are in pixels"
        ),
        f"intensity: {low:.4g} .. {high:.4g}, {rule}",
        describe_plan(prints, plan),
        *(describe_configuration(name, plan[name]) for name in ("2d", "3d")),
    ]
    odd = cases_against_plan(prints, plan)
    if odd:
        shown = ", ".join(f"{n} ({' x '.join(f'{z:.3g}' for z in prints['spacings'][n])})" for n in odd[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        lines.append(
            f"note: {len(odd)} case(s) have their largest spacing on another axis: {shown}{more}; they are sliced "
            f"along axis {plan['slice_axis']} like every case: check their orientation"
        )
    return Survey({**info, "fingerprint": prints}, cases, lines)


def _range(values: list, fmt: str = "{}") -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def parse_amount(text: str, total: int, option: str) -> int:
    """``N`` (cases) or ``P%`` of ``total`` (rounded, at least one when P > 0)."""
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return max(1, round(total * percent / 100)) if percent > 0 else 0
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise DataError(f"{option}={text!r}: expected a case count N or a percentage P% (0-100)") from None


def _group_key(name: str, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return name
    match = pattern.search(name)
    if match is None:
        raise DataError(f"--group {pattern.pattern!r} does not match case {name!r}")
    return match.group(1) if match.groups() else match.group(0)


def make_split(
    cases: dict[str, Case], labeled: str, val: str, test: str, seed: int, group: str | None
) -> dict[str, list[str]]:
    """Deterministic group-aware split; returns the four splits and ``left_out``: label-less cases
    whose group went to validation or test (used nowhere, so test patients never train)."""
    try:
        pattern = re.compile(group) if group else None
    except re.error as err:
        raise DataError(f"--group {group!r} is not a valid regular expression ({err})") from None
    groups: dict[str, list[str]] = {}
    for name in sorted(cases):
        groups.setdefault(_group_key(name, pattern), []).append(name)
    labelled = {key: [n for n in names if cases[n].label is not None] for key, names in groups.items()}
    keys = sorted(k for k, names in labelled.items() if names)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n = sum(len(labelled[k]) for k in keys)
    wanted = {"test": parse_amount(test, n, "--test"), "val": parse_amount(val, n, "--val")}
    parts: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    home: dict[str, str] = {}
    for key in order:
        target = next((s for s in ("test", "val") if len(parts[s]) < wanted[s]), "train")
        parts[target].extend(labelled[key])
        home[key] = target
    if not parts["val"]:
        raise DataError(f"--val={val!r}: the validation split would be empty (it chooses the checkpoint)")
    if not parts["train"]:
        raise DataError(f"--val={val!r} and --test={test!r} leave no labelled case for training ({n} labelled cases)")
    train_groups = [k for k in order if home[k] == "train"]
    count = parse_amount(labeled, len(parts["train"]), "--labeled")
    if not 1 <= count <= len(parts["train"]):
        raise DataError(f"--labeled={labeled!r} but the training split has {len(parts['train'])} labelled cases")
    kept: list[str] = []
    for key in train_groups:
        if len(kept) < count:
            kept.extend(labelled[key])
    label_less = {key: [n for n in names if cases[n].label is None] for key, names in groups.items()}
    unlabeled = [n for n in parts["train"] if n not in kept]
    left_out = []
    for key, names in label_less.items():
        (left_out if home.get(key, "train") in ("val", "test") else unlabeled).extend(names)
    return {
        "labeled": sorted(kept),
        "unlabeled": sorted(unlabeled),
        "val": sorted(parts["val"]),
        "test": sorted(parts["test"]),
        "left_out": sorted(left_out),
    }


def prepare(
    root: Path,
    labeled: str = "100%",
    val: str = "20%",
    test: str = "20%",
    seed: int = 0,
    group: str | None = None,
    force: bool = False,
    mask_values: list[int] | None = None,
) -> list[str]:
    """Verify, plan, split and write ``DATA_DIR/vqseg_splits.json`` atomically; returns the summary lines."""
    root = Path(root)
    found = survey(root, mask_values)
    splits = make_split(found.cases, labeled, val, test, seed, group)
    content = {
        **found.info,
        "prepared_with": {
            "labeled": labeled, "val": val, "test": test, "seed": seed, "group": group, "mask_values": mask_values,
        },
        **splits,
    }
    path = root / SPLIT_FILE
    counts = ", ".join(f"{k} {len(splits[k])}" for k in SPLITS)
    training = [n for n in splits["labeled"] + splits["unlabeled"] if found.cases[n].label is not None]
    asked = parse_amount(labeled, len(training), "--labeled")
    if group and len(splits["labeled"]) != asked:
        counts += f" (--labeled asked for about {asked}: whole groups are kept)"
    if splits["left_out"]:
        counts += (
            f"; {len(splits['left_out'])} case(s) without a label left out: their group is in validation or test"
        )
    if path.is_file() and not force:
        try:
            same = json.loads(path.read_text()) == content
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            raise DataError(f"{path}: a split file already exists and differs; pass --force to overwrite it")
        return [*found.lines, f"split: {counts}; {path} is already up to date"]
    tmp = path.with_name(".tmp-" + path.name)
    try:
        tmp.write_text(json.dumps(content, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(f"{path}: cannot write the split file ({err.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return [*found.lines, f"split: {counts}; written to {path}"]


# ---------------------------------------------------------------------------------------------
# Reading a prepared dataset (data.dataset: prepared)
# ---------------------------------------------------------------------------------------------


def open_prepared(root: Path) -> Prepared:
    """The dataset and its split file, checked against each other; unprepared folders are refused."""
    fmt, cases, _ = _list(root)
    path = root / SPLIT_FILE
    if not path.is_file():
        raise DataError(f"{root}: not prepared ({SPLIT_FILE} is missing); run `vqseg prepare {root}` first")
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({err})") from None
    missing = [k for k in INFO_KEYS + SPLITS if k not in content]
    if missing:
        raise DataError(
            f"{path}: keys {missing} are missing (written by an older vqseg, without the dataset's plan); "
            f"run `vqseg prepare {root} --force` with the same arguments"
        )
    splits = {k: list(content[k]) for k in SPLITS}
    seen: dict[str, str] = {}
    for split, names in {**splits, "left_out": list(content.get("left_out", []))}.items():
        for name in names:
            if name in seen:
                raise DataError(f"{path}: case {name!r} is in both {seen[name]!r} and {split!r}")
            seen[name] = split
            if name not in cases:
                raise DataError(f"{path}: split {split!r} names case {name!r}, which is not in {root}")
            if split not in ("unlabeled", "left_out") and cases[name].label is None:
                raise DataError(f"{path}: case {name!r} in split {split!r} has no label")
    if content["format"] != fmt:
        raise DataError(f"{path}: written for a {content['format']} dataset but {root} is {fmt}; prepare again")
    return Prepared(root, {k: content[k] for k in INFO_KEYS}, cases, splits)


def prepared_root(cfg: Config) -> Path:
    return resolve_path(cfg.data.root)


DICTATED = ("num_classes", "in_channels", "class_names", "intensity", "label_encoding", "mask_values", "slice_axis")


def adopt_prepared_settings(cfg: Config) -> None:
    """Copy what prepare detected into ``cfg.data``, so the saved config.yaml is all predict needs.

    A key left at its default takes the dataset's value; any other value that disagrees is an error
    (the dataset, not the user, knows its classes, channels and encodings).
    """
    root = prepared_root(cfg)
    info = dictated(open_prepared(root).info)
    defaults = DataConfig()
    for key in DICTATED:
        value, found = getattr(cfg.data, key), info[key]
        if value != found and value != getattr(defaults, key):
            raise ConfigError(
                f"data.{key}={value!r} but the prepared dataset {root} has {found!r}; leave data.{key} out of the config"
            )
        setattr(cfg.data, key, found)


def dictated(info: dict) -> dict:
    """The ``data.*`` values a prepared dataset dictates, the plan's slicing axis among them."""
    return {**{k: info[k] for k in DICTATED if k in info}, "slice_axis": info["plan"]["slice_axis"]}


def load_prepared(cfg: Config) -> SegmentationData:
    prepared = open_prepared(prepared_root(cfg))
    info = prepared.info
    channels = info["in_channels"]
    return SegmentationData(
        labeled=training_set(prepared.volumes("labeled"), cfg, keep_labels=True, channels=channels),
        unlabeled=training_set(prepared.volumes("unlabeled"), cfg, keep_labels=False, channels=channels),
        val=prepared.volumes("val"),
        num_classes=info["num_classes"],
        class_names=info["class_names"],
        in_channels=channels,
        settings={k: v for k, v in dictated(info).items() if k not in ("num_classes", "in_channels")},
    )


def prepared_split_lists(cfg: Config) -> dict[str, list[str]]:
    return open_prepared(prepared_root(cfg)).splits


def load_prepared_split(cfg: Config, split: str) -> list[Volume]:
    intensity = None if cfg.data.intensity == "auto" else cfg.data.intensity
    return open_prepared(prepared_root(cfg)).volumes(split, intensity)


DATASETS.register("prepared")(DatasetReader(load_prepared, load_prepared_split, prepared_split_lists, adopt_prepared_settings))
