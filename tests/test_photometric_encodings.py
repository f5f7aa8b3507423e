"""``model.photometric_encodings``: strong views read features of photometric copies (issue 26, cause 2).

With a frozen encoder the features of a training view are looked up in a bank of cached
encodings, so the strong view's intensity augmentation used to reach the image stem only. With
K photometric encodings the bank also holds K intensity-augmented copies of every unlabelled
slice, and each strong view reads one of them. Tiny random stand-ins, as in test_pretrained.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_pretrained import CountingBackbone

from vqseg.config import AugConfig, ConfigError
from vqseg.data import load_training_data
from vqseg.data.augment import Augmenter
from vqseg.data.provenance import add_provenance, provenance_at, shift_rows
from vqseg.methods.base import Batch, make_unlabeled_views
from vqseg.models.pretrained import PretrainedEncoder
from vqseg.run import build_run_method

K = 2


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("VQSEG_CACHE", str(folder))
    return folder


def frozen_config(method: str = "vqseg", copies: int = K, **overrides: object):
    extra = {"method.codebook_size": 16, "method.foundation": "none"} if method == "vqseg" else {}
    return tiny_config(**{"model.name": "litemedsam", "model.tiny": True, "model.encoder_mode": "frozen",
                          "model.decoder_features": 16, "model.stem_channels": 4, "method.name": method,
                          "model.photometric_encodings": copies, **extra, **overrides})


def prepared(cfg):
    torch.manual_seed(0)
    data = load_training_data(cfg)
    method = build_run_method(cfg, data.in_channels, data.num_classes)
    method.prepare(data)
    return method, data


def test_a_photometric_copy_depends_on_the_slice_and_the_copy_number_only() -> None:
    augment = Augmenter(AugConfig(), 1)
    images = torch.rand(3, 1, 16, 16)
    first = augment.photometric_copy(images, 1)
    assert not torch.allclose(first, images)  # intensity-augmented
    assert not torch.allclose(first, augment.photometric_copy(images, 2))
    torch.manual_seed(123)  # the global generator does not matter, nor the batch it comes in
    torch.testing.assert_close(augment.photometric_copy(images.flip(0), 1), first.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(augment.photometric_copy(images[1:2], 1), first[1:2], rtol=0, atol=0)


def test_shift_rows_moves_only_the_given_rows_by_each_samples_shift() -> None:
    images = torch.rand(2, 1, 8, 8)
    x = add_provenance(images, torch.tensor([5, 2]))  # row 5: in range 4..6, row 2: a labelled row
    x = torch.cat([x[:, :1], x[:, 1:] * 0.5], dim=1)  # a border pixel's premultiplied provenance
    out = shift_rows(x, 1, start=4, count=3, shift=torch.tensor([6, 3]))
    index, coords, valid = provenance_at(out[:, 1:], (8, 8))
    assert index[0].unique().tolist() == [11] and index[1].unique().tolist() == [2]
    torch.testing.assert_close(out[:, :1], images)
    torch.testing.assert_close(out[:, 2:], x[:, 2:])  # positions and validity untouched
    torch.testing.assert_close(valid, torch.full_like(valid, 0.5))
    with pytest.raises(ValueError, match="provenance"):
        shift_rows(images, 1, 0, 1, torch.tensor([1, 1]))


def test_the_bank_holds_each_copys_encodings_after_the_unlabelled_rows(cache_dir: Path) -> None:
    method, data = prepared(frozen_config())
    n_l, n_u = len(data.labeled), len(data.unlabeled)
    encoder = method.student.base.encoder
    bank = encoder.store.bank
    assert bank[0].shape[0] == n_l + (1 + K) * n_u
    for k in (1, 2):
        copies = method.augment.photometric_copy(data.unlabeled.images, k)
        with torch.no_grad():
            want = encoder.backbone.select(encoder.backbone(copies))
        rows = slice(n_l + k * n_u, n_l + (k + 1) * n_u)
        for level, expected in zip(bank, want):
            torch.testing.assert_close(level[rows].float(), expected.permute(0, 2, 3, 1), atol=2e-2, rtol=1e-2)
    original = bank[-1][n_l:n_l + n_u].float()
    assert (bank[-1][n_l + n_u:n_l + 2 * n_u].float() - original).abs().mean() > 1e-3

    again, _ = prepared(frozen_config())  # a new run on the same data: every copy comes from the cache
    counters = [CountingBackbone(m) for m in again.modules() if isinstance(m, PretrainedEncoder)]
    again.prepare(load_training_data(frozen_config()))
    assert sum(c.count for c in counters) == 0


def test_a_strong_view_reads_one_copy_of_its_own_slice_and_the_weak_view_the_slice() -> None:
    method, data = prepared(frozen_config())
    n_l, n_u = len(data.labeled), len(data.unlabeled)
    index = torch.arange(6) % n_u
    inputs = method.training_inputs(data.unlabeled.images[index], index, "unlabeled")
    views = make_unlabeled_views(method.augment, inputs, cutmix=False, features=method.strong_features)
    weak, _, valid = provenance_at(views.weak[:, 1:], (8, 8))
    strong, _, _ = provenance_at(views.strong[:, 1:], (8, 8))
    inside = valid > 0.5
    assert torch.equal(weak[inside], (index + n_l)[:, None, None].expand_as(weak)[inside])
    copy = (strong - weak) / n_u
    for n in range(len(index)):
        drawn = copy[n][inside[n]].unique()
        assert drawn.numel() == 1 and 1 <= drawn.item() <= K
    assert set(copy[inside].unique().tolist()) == {1.0, 2.0}  # both copies drawn over six views (seeded)


def rows_read(method, step: int = 0) -> list[set[int]]:
    """The bank rows every encoder lookup of one training step reads."""
    reads: list[set[int]] = []
    encoders = [m for m in method.modules() if isinstance(m, PretrainedEncoder)]
    originals = {id(e): e._look_up for e in encoders}

    def spy(encoder):
        def look_up(provenance):
            index, _, valid = provenance_at(provenance, tuple(encoder.store.bank[-1].shape[1:3]))
            reads.append(set(index[valid > 0.5].tolist()))
            return originals[id(encoder)](provenance)
        return look_up

    for encoder in encoders:
        encoder._look_up = spy(encoder)
    cfg, data = method.cfg, load_training_data(method.cfg)
    index = torch.arange(cfg.train.batch_size) % len(data.labeled)
    u_index = torch.arange(cfg.train.unlabeled_batch_size) % len(data.unlabeled)
    batch = Batch(method.training_inputs(data.labeled.images[index], index, "labeled"), data.labeled.labels[index],
                  method.training_inputs(data.unlabeled.images[u_index], u_index, "unlabeled"), index, u_index)
    method.train()
    method.training_step(batch, step)
    return reads


@pytest.mark.parametrize("name", ["vqseg", "unimatch"])
def test_only_the_strong_passes_read_the_copies(name: str) -> None:
    method, data = prepared(frozen_config(name))
    first_copy = len(data.labeled) + len(data.unlabeled)
    reads = rows_read(method)
    strong = [rows for rows in reads if any(r >= first_copy for r in rows)]
    assert len(strong) == 1  # VQ-Seg's perturbed pass; UniMatch's two strong views in one pass
    assert all(r >= first_copy for r in strong[0])
    plain, _ = prepared(frozen_config(name, copies=0))
    assert all(r < first_copy for rows in rows_read(plain) for r in rows)


def test_the_labelled_anchor_keeps_its_own_features() -> None:
    """VQ-Seg's labelled anchor is pasted after the strong view drew its copy: its pixels read the
    labelled rows."""
    method, data = prepared(frozen_config(**{"method.anchor_labeled": True, "aug.cutmix_prob": 1.0}))
    n_l, first_copy = len(data.labeled), len(data.labeled) + len(data.unlabeled)
    strong = [rows for rows in rows_read(method) if any(r >= first_copy for r in rows)]
    assert len(strong) == 1 and any(r < n_l for r in strong[0])
    assert not any(n_l <= r < first_copy for r in strong[0])


@pytest.mark.parametrize(("overrides", "match"), [
    ({"model.name": "unet", "model.tiny": False, "model.encoder_mode": "frozen"}, "frozen pretrained encoder"),
    ({"model.encoder_mode": "finetune"}, "frozen pretrained encoder"),
    ({"model.photometric_encodings": -1}, "photometric_encodings"),
])
def test_photometric_encodings_are_refused_without_a_frozen_encoder(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        frozen_config(**overrides)


@pytest.mark.parametrize("name", ["supervised", "mean_teacher", "bcp", "cps"])
def test_photometric_encodings_are_refused_for_methods_without_a_strong_view(name: str) -> None:
    cfg = frozen_config(name)
    with pytest.raises(ConfigError, match=f"method.name={name} draws no"):
        build_run_method(cfg, 1, 4)
