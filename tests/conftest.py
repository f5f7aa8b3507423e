"""Shared fixtures: data locations, a synthetic ACDC-like folder, tiny configs and a tiny trained run.

``tiny_config`` is a plain function (``from conftest import tiny_config``) so tests can build
configs inside parametrised tests; every other helper is a fixture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import vqseg.data  # noqa: F401  (registers the built-in datasets)
import vqseg.methods  # noqa: F401  (registers the built-in models and methods: load_config looks them up)

REPO = Path(__file__).resolve().parents[1]

# Small enough for a CPU test (a few hundred ms per run), large enough for every code path:
# a 5-level U-Net at 32 x 32 keeps a 2 x 2 bottleneck, batches of 4 split over 2 processes.
TINY_OVERRIDES: dict[str, object] = {
    "data.dataset": "phantom",
    "data.phantom_labeled": 6,
    "data.phantom_unlabeled": 6,
    "data.phantom_val": 6,
    "data.phantom_test": 12,
    "model.channels": [4, 8, 16, 32, 64],
    "train.image_size": 32,
    "train.iterations": 6,
    "train.val_every": 3,
    "train.log_every": 1,
    "train.batch_size": 4,
    "train.unlabeled_batch_size": 4,
    "train.device": "cpu",
    "train.num_threads": 0,  # 0 leaves torch's setting alone; the `one_thread` fixture sets 1
    "eval.batch_size": 8,
}


def tiny_overrides(**overrides: object) -> list[str]:
    """``--set`` strings for a tiny CPU run; keyword ``a__b=v`` or ``**{"a.b": v}`` overrides a key."""
    values = dict(TINY_OVERRIDES)
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    # JSON is valid YAML flow syntax, so every value keeps its type through parse_override.
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values.items()]


def tiny_config(**overrides: object):
    """A typed config for a fast CPU run (phantom data, tiny U-Net, 6 iterations); see tiny_overrides."""
    from vqseg.config import load_config

    return load_config(None, tiny_overrides(**overrides))


class _Threads:
    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


@pytest.fixture
def one_thread():
    """Torch on one core for this test (the machine is shared), restored afterwards.

    Not autouse: other test files in this folder choose their own setting.
    """
    with _Threads():
        yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(os.environ.get("VQSEG_DATA", str(REPO.parent / "shared" / "data")))


@pytest.fixture(scope="session")
def acdc_root(data_root: Path) -> Path:
    root = data_root / "acdc"
    if not (root / "splits.json").is_file():
        pytest.skip(f"real ACDC data not found at {root} (set VQSEG_DATA to the data root)")
    return root


_ACDC_READS: dict[Path, object] = {}


@pytest.fixture
def cached_acdc_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memoise ``read_h5_volume`` across tests: the real volumes are gzip'd HDF5 (about 5 s a read).

    The cache holds the reader's own validated output, so everything after the read still runs.
    """
    import vqseg.data.acdc as acdc

    original = acdc.read_h5_volume

    def cached(path: Path, num_classes: int = acdc.NUM_CLASSES):
        key = (Path(path).resolve(), num_classes)
        if key not in _ACDC_READS:
            _ACDC_READS[key] = original(path, num_classes)
        return _ACDC_READS[key]

    monkeypatch.setattr(acdc, "read_h5_volume", cached)


# --------------------------------------------------------------------------------------------
# A synthetic ACDC folder
# --------------------------------------------------------------------------------------------

TINY_HW = (24, 20)  # non-square, like ACDC's 256 x 216


@dataclass
class TinyACDC:
    """What ``tiny_acdc`` wrote: the root, its splits and every volume file's depth."""

    root: Path
    splits: dict
    files: dict[int, list[str]] = field(default_factory=dict)  # patient -> file stems, frame order
    depths: dict[str, int] = field(default_factory=dict)  # file stem -> number of slices

    def volume_path(self, stem: str) -> Path:
        return self.root / "volumes" / f"{stem}.h5"

    def slices(self, patients: list[int]) -> int:
        return sum(self.depths[stem] for p in patients for stem in self.files[p])

    def write_splits(self, **changes: object) -> None:
        splits = {**self.splits, **changes}
        (self.root / "splits.json").write_text(json.dumps(splits))


def write_volume(path: Path, image: np.ndarray | None, label: np.ndarray | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if image is not None:
            f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)


@pytest.fixture
def tiny_acdc(tmp_path: Path) -> TinyACDC:
    """10 patients (train 1-6, val 7-8, test 9-10), two phases each, 2-4 slices of 24 x 20.

    Even patients use the SSL4MIS naming (frame01 + frame02), odd ones ACDC's own frame numbers
    (frame01 + frame1P), so both conventions are always exercised.
    """
    root = tmp_path / "acdc"
    splits = {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10], "labeled_order": [4, 2, 6, 1, 3, 5]}
    tiny = TinyACDC(root, splits)
    rng = np.random.default_rng(0)
    for p in range(1, 11):
        second = 2 if p % 2 == 0 else 10 + p
        tiny.files[p] = []
        for frame, depth in ((1, 2 + p % 3), (second, 3)):
            stem = f"patient{p:03d}_frame{frame:02d}"
            image = rng.random((depth, *TINY_HW), dtype=np.float32)
            label = rng.integers(0, 4, (depth, *TINY_HW), dtype=np.uint8)
            write_volume(root / "volumes" / f"{stem}.h5", image, label)
            tiny.files[p].append(stem)
            tiny.depths[stem] = depth
    tiny.write_splits()
    return tiny


# --------------------------------------------------------------------------------------------
# One tiny trained run shared by the engine and evaluation tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 supervised iterations on the phantom (validation at 3 and 6); returns the run folder.

    Tests may add files (evaluation outputs) but must not change what training wrote.
    """
    from vqseg.engine.trainer import train

    out = tmp_path_factory.mktemp("phantom_run") / "run"
    with _Threads():
        return train(tiny_config(output_dir=str(out)))
