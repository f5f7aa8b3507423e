"""Typed run configuration: dataclasses filled from YAML files plus ``--set key=value`` overrides.

Every section is a dataclass so a typo in a YAML key or an override fails at start-up with the
offending key named, instead of being silently ignored hours into a run. The schema sits at the
bottom of the package and imports no implementation: a method's own section and a model's checks
come from what they registered in ``vqseg.registry`` (so ``load_config`` needs ``vqseg.methods``
imported; ``vqseg.run`` and the command line do that).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vqseg.errors import ConfigError, UserError
from vqseg.registry import METHODS, MODELS

__all__ = ["Config", "ConfigError", "MethodConfig", "UserError", "load_config"]

DATA_ENV_VAR = "VQSEG_DATA"
DEFAULT_DATA_ROOT = "../shared/data"
ENCODER_MODES = ("finetune", "frozen")  # a pretrained encoder trains, or its features are cached
PDCR_SAMPLING = ("grid", "random", "balanced")  # where PDCR samples its feature vectors (modules/pdcr.py)


def data_root() -> Path:
    """Root of the project's own datasets (tests, benchmarks, example configs)."""
    return Path(os.environ.get(DATA_ENV_VAR, DEFAULT_DATA_ROOT))


_ENV_PATTERN = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` so configs can point at the data root portably."""
    def value(m: re.Match) -> str:
        if m.group(2) is not None:  # ${VAR:-default}: the default also covers an empty VAR, as in a shell
            return os.environ.get(m.group(1)) or m.group(2)
        return os.environ.get(m.group(1), "")

    return _ENV_PATTERN.sub(value, text)


@dataclass
class DataConfig:
    dataset: str = "acdc"  # acdc | phantom | vessels | cvc | prepared (any folder `vqseg prepare` has verified)
    root: str = "${VQSEG_DATA:-../shared/data}/acdc"
    labeled_cases: int | list[int] = 3  # a count from the split's labelled order, or patient ids
    num_classes: int = 4
    in_channels: int = 1
    class_names: list[str] = field(default_factory=lambda: ["RV", "Myo", "LV"])
    phantom_labeled: int = 8  # phantom only: labelled training images
    phantom_unlabeled: int = 192
    phantom_val: int = 16
    phantom_test: int = 24
    # How images and masks are read (data/casefiles.py); `prepared` data fills both in, auto = the bundled rule
    intensity: str = "auto"  # auto | divide255 | percentile | minmax
    label_encoding: str = "auto"  # auto | labels | binary01 | binary255 | threshold | values
    mask_values: list[int] | None = None  # `values` encoding: each class's stored grey level, background first
    slice_axis: int | None = None  # the plan's slicing axis of 3D files; None: each file's largest spacing
    # Patch mode: the spacing (mm, D H W or in-plane H W) cases are resampled to; empty: their voxels as they are
    target_spacing: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_range("data.num_classes", self.num_classes, 2)
        check_range("data.in_channels", self.in_channels, 1)
        for key in ("phantom_labeled", "phantom_val", "phantom_test"):
            check_range(f"data.{key}", getattr(self, key), 1)
        check_range("data.phantom_unlabeled", self.phantom_unlabeled, 0)
        _check_choice("data.intensity", self.intensity, ("auto", "divide255", "percentile", "minmax"))
        _check_choice(
            "data.label_encoding", self.label_encoding, ("auto", "labels", "binary01", "binary255", "threshold", "values")
        )
        if self.slice_axis is not None:
            check_range("data.slice_axis", self.slice_axis, 0, 2)


@dataclass
class ModelConfig:
    name: str = "unet"  # unet | litemedsam | dinov2 (pretrained encoder + DPT head)
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # U-Net only
    dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])  # U-Net only
    uafs_layers: list[str] = field(default_factory=list)  # module names that get a UAFS block
    # Pretrained encoders (models/pretrained.py):
    encoder_mode: str = "frozen"  # frozen (cached features, the CPU mode) | finetune (train.encoder_lr)
    encoder_weights: str = ""  # local weights file; empty: LiteMedSAM's shipped one (DINOv2 needs one)
    encoder_input: int = 0  # the encoder's input side; 0: train.image_size (DINOv2: its multiple of 14)
    decoder_features: int = 64  # DPT head width
    stem_channels: int = 16  # image stem width (one 3x3 conv at full resolution, fused at half)
    encoder_precision: str = "fp32"  # fp32 | bf16: what a pretrained encoder computes in (cached features too)
    level_strides: list[int] = field(default_factory=lambda: [4, 8, 16, 16])  # LiteMedSAM's pyramid, of the input
    # frozen LiteMedSAM: cache what enters the neck and train the neck (at train.encoder_lr), so that
    # the unlabelled data can shape the features again (issue 26); the stages before it stay frozen
    train_neck: bool = False
    # frozen encoders: this many photometrically augmented copies of each unlabelled slice (the
    # intensity augmentation's gamma, contrast, blur, noise) are encoded and cached too, and a strong
    # view's features come from one of them, so the strong view differs from the weak one in the
    # features as well as in the image stem (issue 26, cause 2); 0: the strong view reuses the weak one's
    photometric_encodings: int = 0
    # unet3d (nnU-Net's generic 3D U-Net), one entry per stage below the first (from the plan when empty):
    pool: list[list[int]] = field(default_factory=list)  # per-axis downsampling, e.g. [1, 2, 2] keeps depth
    kernels: list[list[int]] = field(default_factory=list)  # per-axis kernel of every stage, first included
    dpt_strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # where the DPT head reads each level
    tiny: bool = False  # tests only: a narrow, shallow encoder with fixed random weights

    def __post_init__(self) -> None:
        _check_choice("model.encoder_mode", self.encoder_mode, ENCODER_MODES)
        _check_choice("model.encoder_precision", self.encoder_precision, ("fp32", "bf16"))
        for key, cached in (("level_strides", (4, 8, 4, 4)), ("dpt_strides", (1, 1, 1, 1))):
            strides = getattr(self, key)
            if len(strides) != 4 or any(s < c or s % c for s, c in zip(strides, cached)):
                raise ConfigError(
                    f"model.{key}={strides}: give 4 strides, each a multiple of {list(cached)}"
                    + (" (the strides the feature cache keeps)" if key == "level_strides" else "")
                )
        if self.train_neck and (self.name != "litemedsam" or self.encoder_mode != "frozen"):
            raise ConfigError(
                f"model.train_neck: only for a frozen LiteMedSAM encoder (model.name={self.name}, "
                f"model.encoder_mode={self.encoder_mode}); fine-tuning trains the neck already"
            )
        check_range("model.photometric_encodings", self.photometric_encodings, 0)
        if self.photometric_encodings and (self.name not in ("litemedsam", "dinov2") or self.encoder_mode != "frozen"):
            raise ConfigError(
                f"model.photometric_encodings={self.photometric_encodings}: only for a frozen pretrained encoder "
                f"(model.name={self.name}, model.encoder_mode={self.encoder_mode}); other encoders see the "
                "strong view's augmented image itself"
            )
        if self.name == "dinov2" and self.level_strides != [4, 8, 16, 16]:
            raise ConfigError("model.level_strides is LiteMedSAM's; DINOv2's levels all lie on its 14-pixel patch grid")
        check_range("model.encoder_input", self.encoder_input, 0)
        check_range("model.decoder_features", self.decoder_features, 2)
        check_range("model.stem_channels", self.stem_channels, 1)
        if self.decoder_features % 2:
            raise ConfigError(f"model.decoder_features={self.decoder_features} must be even (the head halves it)")
        if not self.channels:
            raise ConfigError("model.channels is empty; give one width per U-Net level")
        if len(self.dropout) != len(self.channels):
            raise ConfigError(
                f"model.dropout has {len(self.dropout)} entries but model.channels has {len(self.channels)}: "
                "give one dropout rate per level"
            )
        for i, (width, rate) in enumerate(zip(self.channels, self.dropout)):
            check_range(f"model.channels[{i}]", width, 1)
            check_range(f"model.dropout[{i}]", rate, 0, 1, high_open=True)


@dataclass
class AugConfig:
    flip: bool = True
    rot90: bool = True
    rotate_deg: float = 20.0
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    contrast: list[float] = field(default_factory=lambda: [0.7, 1.3])  # strong view only
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    noise_std: float = 0.05
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.5])
    blur_prob: float = 0.5
    cutmix_prob: float = 0.5
    anisotropic: bool = False  # 3D patches of thick-slice data: rotate and scale in-plane only (nnU-Net)

    def __post_init__(self) -> None:
        check_range("aug.rotate_deg", self.rotate_deg, 0, 180)
        check_interval("aug.scale", self.scale, 0, None, low_open=True)
        check_interval("aug.contrast", self.contrast, 0, None, low_open=True)
        check_interval("aug.gamma", self.gamma, 0, None, low_open=True)
        check_interval("aug.blur_sigma", self.blur_sigma, 0, None, low_open=True)
        check_range("aug.noise_std", self.noise_std, 0)
        check_range("aug.blur_prob", self.blur_prob, 0, 1)
        check_range("aug.cutmix_prob", self.cutmix_prob, 0, 1)


def _check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; choose from {list(choices)}")


def check_range(
    key: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a numeric setting outside [low, high] (an open end excludes the bound), naming the key.

    Every numeric setting is checked when the config is built, so a bad value stops the run at
    start-up with the key named instead of crashing deep inside a layer hours later.
    """
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or not math.isfinite(value):  # NaN compares False with everything
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value!r} is out of range: it must lie in {lo}, {hi}")


def check_interval(
    key: str, values: list[float], low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> None:
    """A ``[lo, hi]`` pair of settings (an augmentation range): both ends in bounds, and ordered."""
    if len(values) != 2:
        raise ConfigError(f"{key}={values} must be a [low, high] pair")
    for i, value in enumerate(values):
        check_range(f"{key}[{i}]", value, low, high, low_open=low_open)
    if values[0] > values[1]:
        raise ConfigError(f"{key}={values}: low end above high end")


@dataclass
class TrainConfig:
    iterations: int = 30000
    image_size: int = 256
    batch_size: int = 12  # labelled images per step
    unlabeled_batch_size: int = 12
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    amp: bool = False
    val_every: int = 500
    log_every: int = 50
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # 0 = torch default
    encoder_lr: float = 5e-6  # a fine-tuned pretrained encoder's lr (UniMatch V2 / VQ-Seg: 5e-6, rest 2e-4)
    # Patch training (issue 25): empty = resize mode (every slice resized to image_size, as the
    # published 2D protocol); 2 values = 2D patches at the data's own resolution; 3 values = 3D patches.
    patch_size: list[int] = field(default_factory=list)
    foreground_oversample: float = 0.33  # share of patches forced to hold foreground (nnU-Net's)
    memory_budget_mb: float = 2048.0  # the planner's activation budget for one labelled batch

    def __post_init__(self) -> None:
        _check_choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        if self.patch_size and len(self.patch_size) not in (2, 3):
            raise ConfigError(f"train.patch_size={self.patch_size}: give 2 (2D) or 3 (3D) sizes, or none")
        for i, size in enumerate(self.patch_size):
            check_range(f"train.patch_size[{i}]", size, 1)
        check_range("train.foreground_oversample", self.foreground_oversample, 0, 1)
        check_range("train.memory_budget_mb", self.memory_budget_mb, 0, low_open=True)
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        for key in ("iterations", "image_size", "batch_size", "unlabeled_batch_size", "val_every", "log_every"):
            check_range(f"train.{key}", getattr(self, key), 1)
        check_range("train.lr", self.lr, 0, low_open=True)
        check_range("train.encoder_lr", self.encoder_lr, 0)
        check_range("train.momentum", self.momentum, 0, 1, high_open=True)
        check_range("train.weight_decay", self.weight_decay, 0)
        check_range("train.poly_power", self.poly_power, 0)
        check_range("train.num_threads", self.num_threads, 0)


@dataclass
class EvalConfig:
    batch_size: int = 32  # slices (resize mode) or windows (patch mode) per forward pass
    spacing: list[float] | None = None  # None = voxel units, as the published numbers
    overlap: float = 0.5  # patch mode: sliding windows overlap by this share of the patch
    mirror: bool = False  # patch mode: average the predictions of the windows mirrored along every axis

    def __post_init__(self) -> None:
        check_range("eval.batch_size", self.batch_size, 1)
        check_range("eval.overlap", self.overlap, 0, 1, high_open=True)
        for i, value in enumerate(self.spacing or []):
            check_range(f"eval.spacing[{i}]", value, 0, low_open=True)


@dataclass
class PDCRLayerConfig:
    name: str = ""
    num_samples: int = 32
    weight: float = 0.1


@dataclass
class PDCRSettings:
    layers: list[PDCRLayerConfig] = field(default_factory=list)  # empty = PDCR off
    patch_sizes: list[int] = field(default_factory=lambda: [5, 7, 9])
    tau: float = 1.0
    sampling: str = "grid"
    cross_layer: list[str] = field(default_factory=list)  # [layer_a, layer_b] or empty
    cross_weight: float = 0.01
    unlabeled: bool = False  # also on unlabelled images, driven by confident pseudo-labels
    unlabeled_threshold: float = 0.95

    def __post_init__(self) -> None:
        _check_choice("pdcr.sampling", self.sampling, PDCR_SAMPLING)
        for i, layer in enumerate(self.layers):
            check_range(f"pdcr.layers[{i}].num_samples", layer.num_samples, 1)
            check_range(f"pdcr.layers[{i}].weight", layer.weight, 0)
        for i, size in enumerate(self.patch_sizes):
            check_range(f"pdcr.patch_sizes[{i}]", size, 1)
            if size % 2 == 0:
                raise ConfigError(f"pdcr.patch_sizes[{i}]={size} must be odd (a patch is centred on a cell)")
        check_range("pdcr.tau", self.tau, 0, low_open=True)
        check_range("pdcr.cross_weight", self.cross_weight, 0)
        check_range("pdcr.unlabeled_threshold", self.unlabeled_threshold, 0, 1)
        if len(self.cross_layer) not in (0, 2):
            raise ConfigError(f"pdcr.cross_layer={self.cross_layer} must name two layers or none")


@dataclass
class MethodConfig:
    """Base of every method's parameters; each method registers a subclass with its own fields."""

    name: str = "supervised"


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pdcr: PDCRSettings = field(default_factory=PDCRSettings)
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        check_range("seed", self.seed, 0, 2**32 - 1)


# Settings that pick hardware or what is shown and logged, never the experiment: a resumed run may
# change them. Everything else (seed, data, model, method, schedule, augmentation, PDCR, the
# validation cadence that chooses best.pt) must match the checkpoint.
RESUME_FREE_KEYS = frozenset({"output_dir", "train.num_threads", "train.device", "train.log_every", "eval.batch_size"})


def changed_keys(old: Any, new: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two ``to_dict`` trees; a key only one side has counts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k for key in set(old) | set(new) for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")}
    return set() if old == new else {prefix.rstrip(".")}


def resume_conflicts(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Keys that differ from the checkpoint's config and would change the resumed run's results.

    A setting added to vqseg after the checkpoint was written counts as its default there, so an
    upgrade between a kill and a resume is no change unless the new setting is given another value;
    a setting that no longer exists is a change.
    """
    method = saved.get("method", {}).get("name", MethodConfig.name)
    try:
        defaults = to_dict(load_config(None, [f"method.name={method}"]))
    except ConfigError:  # a method this version no longer has: every key of it is a change
        defaults = {}
    return sorted(changed_keys(_fill_missing(saved, defaults), to_dict(cfg)) - RESUME_FREE_KEYS)


def _fill_missing(tree: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    filled = dict(tree)
    for key, value in defaults.items():
        if key not in filled:
            filled[key] = value
        elif isinstance(value, dict) and isinstance(filled[key], dict):
            filled[key] = _fill_missing(filled[key], value)
    return filled


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, failing with the dotted key on mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors, missing keys defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        if cls is Config and name == "method":
            kwargs[name] = _method_config(value, prefix + name)
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own validation (__post_init__)
        raise ConfigError(str(err)) from None


def _method_config(values: Any, key: str) -> MethodConfig:
    """Resolve the method section through the method registry, so each method owns its fields."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping, got {values!r}")
    cls = METHODS.extra(values.get("name", MethodConfig.name), "config", MethodConfig)
    return from_dict(cls, values, prefix=key + ".")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_nested(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value parsed as YAML (so numbers, lists and booleans keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then overrides; the result is validated and typed."""
    tree: dict[str, Any] = to_dict(Config())
    tree["method"] = {"name": MethodConfig.name}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        _merge(tree, loaded)
    parsed = [parse_override(text) for text in overrides or []]
    # method.name first: switching methods resets the section, which must not drop other overrides
    for key, value in sorted(parsed, key=lambda kv: kv[0] != "method.name"):
        if key == "method.name" and tree["method"].get("name") != value:
            tree["method"] = {"name": value}  # another method's fields do not carry over
        _set_nested(tree, key, value)
    cfg = from_dict(Config, tree)
    resolve = MODELS.extra(cfg.model.name, "resolve")  # an unknown model.name is refused here
    if resolve is not None:
        resolve(cfg)  # e.g. a pretrained encoder's input size, so config.yaml records the size used
    return cfg


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if key == "method" and isinstance(value, dict) and value.get("name", base["method"]["name"]) != base["method"]["name"]:
            base[key] = dict(value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_path(text: str) -> Path:
    return Path(expand_env(text)).expanduser()
