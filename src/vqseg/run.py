"""A run: the config it was trained with, the network and method that config builds, its folder's
checkpoint and pinned split, and the device it runs on. Training, ``evaluate``, ``predict`` and the
benchmark all go through here, so a run folder is read one way everywhere.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from vqseg.config import Config, ConfigError, UserError, load_config
from vqseg.data.casefiles import resolved_rules
from vqseg.io import load_checkpoint, load_weights, replace_atomically
from vqseg.methods import Method, build_method
from vqseg.methods.base import example_input
from vqseg.models import build_model
from vqseg.models.pretrained import channels_last
from vqseg.modules.attach import insert_uafs

# The case lists the run was trained and is scored on (nnU-Net keeps splits_final.json for this).
SPLIT_NAME = "split.json"
SPLIT_KEYS = ("labeled", "unlabeled", "val", "test")


def select_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a setting error, named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"{setting}={name!r}; choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def build_network(cfg: Config, in_channels: int, num_classes: int) -> torch.nn.Module:
    """The configured backbone, with UAFS blocks inserted after the named layers if any."""
    model = build_model(cfg.model, in_channels, num_classes)
    if cfg.model.uafs_layers:
        insert_uafs(model, cfg.model.uafs_layers, example_input=example_input(cfg, in_channels))
    return model


def build_run_method(cfg: Config, in_channels: int, num_classes: int) -> Method:
    return channels_last(build_method(cfg, lambda: build_network(cfg, in_channels, num_classes), num_classes), cfg.model)


def load_run(run_dir: Path, checkpoint: str = "best") -> tuple[Config, torch.nn.Module, dict]:
    """Rebuild the run's predictor from its saved config and load the chosen weights."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {config_path} is missing")
    cfg = load_config(config_path)
    if not (run_dir / f"{checkpoint}.pt").is_file():
        raise ConfigError(f"{run_dir}: no model to load ({checkpoint}.pt is missing; has the run been trained?)")
    state = load_checkpoint(run_dir / f"{checkpoint}.pt")
    method = build_run_method(cfg, cfg.data.in_channels, cfg.data.num_classes)
    predictor = method.predictor()
    load_weights(predictor, state["predictor"], run_dir / f"{checkpoint}.pt")
    return cfg, predictor, state


def run_rules(cfg: Config) -> tuple[str, str]:
    """The run's intensity rule and mask encoding (what predict applies, how masks are written)."""
    return resolved_rules(cfg.data.dataset, cfg.data.intensity, cfg.data.label_encoding)


class SplitChangedError(UserError):
    """The data's split is no longer the one a run was trained on: its test set may hold training cases."""


def _digest(lists: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps({k: lists[k] for k in SPLIT_KEYS}, sort_keys=True).encode()).hexdigest()


def pin_split(run_dir: Path, dataset: str, lists: dict[str, list[str]]) -> None:
    """Store the case lists of every split in the run folder (atomically, with their hash)."""
    content = {"dataset": dataset, "sha256": _digest(lists), **{k: list(lists[k]) for k in SPLIT_KEYS}}
    replace_atomically(run_dir / SPLIT_NAME, lambda tmp: tmp.write_text(json.dumps(content, indent=1) + "\n"))


def check_pinned_split(run_dir: Path, lists: dict[str, list[str]], what: str) -> bool:
    """Refuse (one line) when the data's split differs from the one pinned at the run's start.

    Returns False for a run folder written before splits were pinned: nothing to check (said on one line).
    """
    path = run_dir / SPLIT_NAME
    if not path.is_file():
        print(f"vqseg {what}: note: {run_dir} has no {SPLIT_NAME} (trained before runs pinned their split): "
              "the data's split cannot be checked against the run's", file=sys.stderr, flush=True)
        return False
    try:
        pinned = json.loads(path.read_text())
        changed = [k for k in SPLIT_KEYS if list(pinned[k]) != list(lists[k])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SplitChangedError(f"{path}: cannot be read as the run's pinned split ({err})") from None
    if changed:
        parts = []
        for key in changed:
            added, removed = set(lists[key]) - set(pinned[key]), set(pinned[key]) - set(lists[key])
            parts.append(f"{key!r} ({len(added)} case(s) added, {len(removed)} removed)")
        raise SplitChangedError(
            f"{path}: the data's split is not the one this run was trained on: {', '.join(parts)} changed "
            "(prepared again with another seed, or cases added); its test cases may have been trained on: "
            "restore the split file, or train a new run"
        )
    return True
