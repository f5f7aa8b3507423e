"""Typed run configuration: dataclasses filled from YAML files plus ``--set key=value`` overrides.

Every section is a dataclass so a typo in a YAML key or an override fails at start-up with the
offending key named, instead of being silently ignored hours into a run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_ENV_VAR = "VQSEG_DATA"
DEFAULT_DATA_ROOT = "../shared/data"


class ConfigError(ValueError):
    """A configuration file or override that cannot be turned into a valid config."""


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
    dataset: str = "acdc"  # acdc | phantom | cvc
    root: str = "${VQSEG_DATA:-../shared/data}/acdc"
    labeled_cases: int | list[int] = 3  # a count from the split's labelled order, or patient ids
    num_classes: int = 4
    in_channels: int = 1
    class_names: list[str] = field(default_factory=lambda: ["RV", "Myo", "LV"])
    phantom_labeled: int = 8  # phantom only: labelled training images
    phantom_unlabeled: int = 192
    phantom_val: int = 16
    phantom_test: int = 24


@dataclass
class ModelConfig:
    name: str = "unet"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    uafs_layers: list[str] = field(default_factory=list)  # module names that get a UAFS block

    def __post_init__(self) -> None:
        from vqseg.models import available_models

        _check_choice("model.name", self.name, available_models())


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


def _check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; choose from {list(choices)}")


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

    def __post_init__(self) -> None:
        _check_choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        for key in ("iterations", "image_size", "batch_size", "val_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, got {getattr(self, key)}")


@dataclass
class EvalConfig:
    batch_size: int = 32
    spacing: list[float] | None = None  # None = voxel units, as the published numbers


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
    from vqseg.methods import method_config_class

    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping, got {values!r}")
    name = values.get("name", MethodConfig.name)
    try:
        cls = method_config_class(name)
    except KeyError as err:
        raise ConfigError(f"{key}.name: {err.args[0]}") from None
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
    return from_dict(Config, tree)


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
