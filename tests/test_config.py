"""Typed configuration: YAML + overrides, errors that name the key, per-method sections, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vqseg.config import (
    Config,
    ConfigError,
    MethodConfig,
    PDCRLayerConfig,
    data_root,
    expand_env,
    load_config,
    parse_override,
    resolve_path,
    save_config,
)
from vqseg.methods.vqseg import VQSegConfig


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_without_file_or_overrides():
    cfg = load_config()
    assert cfg == Config()
    assert type(cfg.method) is MethodConfig and cfg.method.name == "supervised"


def test_yaml_then_overrides_are_typed(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"iterations": 100, "lr": 0.5}, "data": {"dataset": "phantom"}})
    cfg = load_config(
        path,
        [
            "train.lr=0.25",  # float
            "train.batch_size=6",  # int
            "train.amp=true",  # bool
            "model.channels=[4, 8, 16, 32, 64]",  # list of ints
            "aug.scale=[0.9, 1]",  # list of floats from mixed YAML numbers
            "data.labeled_cases=[1, 5]",  # the list arm of int | list[int]
            "output_dir=runs/x",
        ],
    )
    assert cfg.train.iterations == 100 and type(cfg.train.iterations) is int  # from the file
    assert cfg.data.dataset == "phantom"
    assert cfg.train.lr == 0.25 and type(cfg.train.lr) is float
    assert cfg.train.batch_size == 6 and type(cfg.train.batch_size) is int
    assert cfg.train.amp is True
    assert cfg.model.channels == [4, 8, 16, 32, 64]
    assert cfg.aug.scale == [0.9, 1.0] and all(type(v) is float for v in cfg.aug.scale)
    assert cfg.data.labeled_cases == [1, 5]
    assert cfg.output_dir == "runs/x"
    # untouched keys keep their defaults
    assert cfg.train.momentum == Config().train.momentum


def test_int_written_for_a_float_becomes_float():
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_later_override_wins_and_overrides_beat_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"iterations": 100}})
    cfg = load_config(path, ["train.iterations=7", "train.iterations=9"])
    assert cfg.train.iterations == 9


def test_exponent_notation_for_floats(tmp_path):
    assert load_config(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)
    path = write_yaml(tmp_path / "c.yaml", {})
    path.write_text("train:\n  weight_decay: 5e-4\n")
    assert load_config(path).train.weight_decay == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("trian.lr=0.1", "trian"),
        ("pdcr.layers=[{name: encoder.downs.3, weights: 0.1}]", "pdcr.layers[0].weights"),
    ],
)
def test_unknown_key_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_unknown_key_in_yaml_names_the_dotted_key(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"labelled_cases": 3}})
    with pytest.raises(ConfigError, match=r"data\.labelled_cases"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.iterations=abc", "train.iterations"),
        ("train.iterations=1.5", "train.iterations"),
        ("train.amp=3", "train.amp"),
        ("train.lr=[1, 2]", "train.lr"),
        ("model.channels=[4, x]", "model.channels[1]"),
        ("model.channels=4", "model.channels"),
        ("data.labeled_cases=three", "data.labeled_cases"),
        ("train=5", "train"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(key + ":") or f" {key}" in message, message


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"train\.iterations\.x"):
        load_config(None, ["train.iterations.x=1"])


@pytest.mark.parametrize("text", ["train.lr", "", "no_equals_sign"])
def test_override_without_equals_sign(text):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(text)


def test_parse_override_keeps_yaml_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=false") == ("a.b", False)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=x=y") == ("a.b", "x=y")  # only the first '=' splits
    assert parse_override("a.b=") == ("a.b", "")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(bad)
    assert "bad.yaml" in str(err.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_empty_yaml_file_gives_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


# ---------------------------------------------------------------------------------------------
# The method section goes through the registry
# ---------------------------------------------------------------------------------------------


def test_method_section_resolved_through_registry():
    cfg = load_config(None, ["method.name=vqseg"])
    assert isinstance(cfg.method, VQSegConfig)
    assert cfg.method.eps == VQSegConfig().eps
    cfg = load_config(None, ["method.name=vqseg", "method.eps=0.3"])
    assert cfg.method.eps == 0.3 and type(cfg.method.eps) is float


def test_method_fields_from_yaml(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"method": {"name": "vqseg", "eps": 0.2, "vq_levels": [-1, -2]}})
    cfg = load_config(path)
    assert isinstance(cfg.method, VQSegConfig) and cfg.method.eps == 0.2 and cfg.method.vq_levels == [-1, -2]


def test_unknown_method_name_errors():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=nosuchmethod"])
    message = str(err.value)
    assert "method.name" in message and "nosuchmethod" in message
    assert "supervised" in message and "vqseg" in message  # the valid choices are listed


def test_other_methods_fields_are_unknown():
    with pytest.raises(ConfigError, match=r"method\.eps"):
        load_config(None, ["method.eps=0.3"])  # supervised has no eps


@pytest.mark.parametrize("override", ["method.perturbation=foo", "method.ablation=everything"])
def test_invalid_method_choice_is_a_config_error(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, ["method.name=vqseg", override])


def test_wrong_type_in_method_field_names_the_key():
    with pytest.raises(ConfigError, match=r"method\.eps"):
        load_config(None, ["method.name=vqseg", "method.eps=lots"])


def test_switching_method_by_override_drops_previous_fields(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"method": {"name": "vqseg", "eps": 0.3}})
    cfg = load_config(path, ["method.name=supervised"])
    assert type(cfg.method) is MethodConfig and cfg.method.name == "supervised"
    # re-selecting the same method keeps the file's fields
    cfg = load_config(path, ["method.name=vqseg"])
    assert isinstance(cfg.method, VQSegConfig) and cfg.method.eps == 0.3


def test_method_field_override_before_method_name_is_not_silently_dropped():
    try:
        cfg = load_config(None, ["method.eps=0.3", "method.name=vqseg"])
    except ConfigError:
        return  # an error is acceptable; silently ignoring the value is not
    assert cfg.method.eps == 0.3


def test_yaml_method_replaces_default_method_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"method": {"name": "vqseg", "eps": 0.3}})
    cfg = load_config(path, ["method.eps=0.4"])
    assert isinstance(cfg.method, VQSegConfig) and cfg.method.eps == 0.4


# ---------------------------------------------------------------------------------------------
# Environment expansion
# ---------------------------------------------------------------------------------------------


def test_env_expansion_with_default(monkeypatch):
    monkeypatch.delenv("VQSEG_DATA", raising=False)
    assert expand_env("${VQSEG_DATA:-/fallback/data}/acdc") == "/fallback/data/acdc"
    assert resolve_path("${VQSEG_DATA:-/fallback/data}/acdc") == Path("/fallback/data/acdc")
    assert data_root() == Path("../shared/data")
    monkeypatch.setenv("VQSEG_DATA", "/elsewhere")
    assert expand_env("${VQSEG_DATA:-/fallback/data}/acdc") == "/elsewhere/acdc"
    assert resolve_path("${VQSEG_DATA}/acdc") == Path("/elsewhere/acdc")
    assert data_root() == Path("/elsewhere")


def test_env_expansion_default_covers_empty_value(monkeypatch):
    monkeypatch.setenv("VQSEG_DATA", "")
    assert expand_env("${VQSEG_DATA:-/fallback/data}/acdc") == "/fallback/data/acdc"


def test_env_expansion_leaves_plain_text_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_env("runs/$x/{y}") == "runs/$x/{y}"
    assert resolve_path("~/data") == tmp_path / "data"


def test_default_data_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VQSEG_DATA", str(tmp_path))
    assert resolve_path(load_config().data.root) == tmp_path / "acdc"


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["method.name=vqseg", "method.eps=0.3", "method.vq_levels=[-1, -2]"],
        [
            "data.labeled_cases=[3, 9]",
            "eval.spacing=[5.0, 1.5, 1.5]",
            "model.uafs_layers=[encoder.downs.2]",
            "pdcr.layers=[{name: encoder.downs.3, num_samples: 8, weight: 0.2}]",
            "pdcr.cross_layer=[encoder.downs.2, encoder.downs.3]",
            "train.amp=true",
            "output_dir=runs/round trip",
        ],
    ],
)
def test_saved_config_round_trips(tmp_path, overrides):
    cfg = load_config(None, overrides)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert type(again.method) is type(cfg.method)


def test_round_trip_keeps_nested_dataclasses(tmp_path):
    cfg = load_config(None, ["pdcr.layers=[{name: encoder.downs.3, num_samples: 8, weight: 0.2}]"])
    assert cfg.pdcr.layers == [PDCRLayerConfig("encoder.downs.3", 8, 0.2)]
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").pdcr.layers == [PDCRLayerConfig("encoder.downs.3", 8, 0.2)]


def test_check_range_bounds_and_message():
    from vqseg.config import check_range

    check_range("k", 0.0, 0, 1)  # closed ends include the bound
    check_range("k", 1.0, 0, 1)
    for value, kwargs in ((0.0, {"low_open": True}), (1.0, {"high_open": True}), (float("nan"), {}), (float("inf"), {})):
        with pytest.raises(ConfigError, match=r"^k=.* is out of range"):
            check_range("k", value, 0, None if value == float("inf") else 1, **kwargs)
    with pytest.raises(ConfigError, match=r"must lie in \(0, 1\)"):
        check_range("k", 2.0, 0, 1, low_open=True, high_open=True)


def test_resume_conflicts_ignore_only_result_neutral_keys():
    from vqseg.config import resume_conflicts, to_dict

    saved = to_dict(load_config())
    free = ["train.num_threads=3", "train.device=cpu", "train.log_every=7", "eval.batch_size=5", "output_dir=elsewhere"]
    assert resume_conflicts(saved, load_config(None, free)) == []
    assert resume_conflicts(saved, load_config(None, ["seed=3", "train.val_every=10"])) == ["seed", "train.val_every"]
    # another method: its own keys count as changes too, not only the name
    other_method = resume_conflicts(saved, load_config(None, ["method.name=cps"]))
    assert other_method == ["method.consistency", "method.consistency_rampup", "method.name"]


def test_resume_conflicts_take_settings_newer_than_the_checkpoint_as_defaults():
    from vqseg.config import resume_conflicts, to_dict

    saved = to_dict(load_config(None, ["method.name=vqseg"]))
    del saved["method"]["temperature"], saved["train"]["poly_power"]  # as if written by an older version
    assert resume_conflicts(saved, load_config(None, ["method.name=vqseg"])) == []
    changed = load_config(None, ["method.name=vqseg", "method.temperature=0.5", "train.poly_power=0"])
    assert resume_conflicts(saved, changed) == ["method.temperature", "train.poly_power"]
    saved["method"]["retired_setting"] = 1  # a setting this version no longer has
    assert resume_conflicts(saved, load_config(None, ["method.name=vqseg"])) == ["method.retired_setting"]
