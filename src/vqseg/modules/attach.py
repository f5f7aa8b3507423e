"""Attach PDCR and UAFS to any backbone by submodule name, without editing the backbone's code.

Names are those of ``model.named_modules()``. Models wrapped by DistributedDataParallel or
DataParallel (names prefixed by ``module.``) accept names with or without the prefix. Insert UAFS
before wrapping a model in DDP: DDP registers its parameters when it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vqseg.modules.pdcr import PatchSize, cross_layer_pdcr_loss, pdcr_loss
from vqseg.modules.uafs import UAFS

WRAPPER_PREFIX = "module."


def resolve_name(model: nn.Module, name: str) -> str:
    """The name as ``model.named_modules()`` spells it, adding or dropping a wrapper's ``module.`` prefix."""
    modules = dict(model.named_modules())
    candidates = [name, WRAPPER_PREFIX + name]
    if name.startswith(WRAPPER_PREFIX):
        candidates.append(name[len(WRAPPER_PREFIX) :])
    for candidate in candidates:
        if candidate and candidate in modules:
            return candidate
    available = ", ".join(n for n in modules if n)
    raise ValueError(f"no submodule named {name!r}; available: {available}")


def _canonical(model: nn.Module, name: str) -> str:
    """Name without the wrapper prefix, so keys read the same with or without DDP."""
    wrapped = isinstance(getattr(model, "module", None), nn.Module)
    return name[len(WRAPPER_PREFIX) :] if wrapped and name.startswith(WRAPPER_PREFIX) else name


def infer_channels(model: nn.Module, layer_names: list[str], example_input: Tensor) -> dict[str, int]:
    """Output channel count (dim 1) of each named submodule, from one dry run in eval mode."""
    return {name: shape[1] for name, shape in output_shapes(model, layer_names, example_input).items()}


def output_shapes(model: nn.Module, layer_names: list[str], example_input: Tensor) -> dict[str, torch.Size]:
    """Output shape (B x C x ...) of each named submodule, from one dry run in eval mode.

    Eval mode and no_grad keep the dry run from updating BatchNorm statistics or building a graph.
    """
    with FeatureTap(model, layer_names) as tap:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example_input)
        finally:
            model.train(was_training)
        outputs = {name: tap[name] for name in layer_names}
    shapes = {}
    for name, output in outputs.items():
        if not isinstance(output, Tensor) or output.dim() < 2:
            raise ValueError(f"output of {name!r} is not a B x C x ... tensor; pass its channels explicitly")
        shapes[name] = output.shape
    return shapes


def insert_uafs(
    model: nn.Module,
    layer_names: list[str],
    m: int = 2,
    kernel_size: int = 3,
    example_input: Tensor | None = None,
    channels: dict[str, int] | None = None,
) -> nn.Module:
    """Replace each named submodule by ``nn.Sequential(original, UAFS(channels))``, in place.

    Channels come from ``channels`` where given, else from a dry run on ``example_input``. The
    block is 2D or 3D like the layer's output: from the dry run where there is an example input
    (a 3D model needs a B x C x D x H x W one), else from the layer's last convolution. Deeper names
    are wrapped first so that wrapping a parent keeps its children's paths valid. Returns ``model``.
    """
    names = list(dict.fromkeys(resolve_name(model, name) for name in layer_names))
    given = {resolve_name(model, name): c for name, c in (channels or {}).items()}
    if example_input is None:
        missing = [name for name in names if name not in given]
        if missing:
            raise ValueError(f"channels unknown for {missing}: pass example_input or channels")
        dims = {name: _conv_dims(model.get_submodule(name), name) for name in names}
    else:
        shapes = output_shapes(model, names, example_input)
        given = {name: shapes[name][1] for name in names} | given
        dims = {name: len(shapes[name]) - 2 for name in names}
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = parent.get_submodule(child_name)
        block = UAFS(given[name], m=m, kernel_size=kernel_size, dims=dims[name])
        setattr(parent, child_name, nn.Sequential(original, block.to(_device_of(original, example_input))))
    return model


def _conv_dims(module: nn.Module, name: str) -> int:
    """Spatial axes of the last convolution in a module (2 or 3): what its output is, without a dry run."""
    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    convs = [m for m in module.modules() if isinstance(m, kinds)]
    if not convs:
        raise ValueError(f"{name!r} holds no convolution to tell 2D from 3D: pass example_input")
    return convs[-1].weight.dim() - 2


def _device_of(module: nn.Module, example_input: Tensor | None) -> torch.device:
    """Where a module's first parameter or buffer lives, else the example input's device."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return example_input.device if example_input is not None else torch.device("cpu")


class FeatureTap:
    """Forward hooks that keep the output of named submodules, e.g. to compute PDCR on them.

    ``tap[name]`` returns the stored output (the module's output as is, graph attached). Use as a
    context manager or call ``remove()``; ``clear()`` drops stored tensors (and their graphs).

    With ``on_demand`` the hooks record only inside ``with tap.capture():``, so the code names the
    one pass whose features are used; passes before or after it (another view, an EMA teacher
    deep-copied with the hooks) cannot replace them. A layer that fires twice inside one capture
    is an error: which of the two outputs was meant would be ambiguous.
    """

    def __init__(self, model: nn.Module, layer_names: list[str], on_demand: bool = False) -> None:
        self.model = model
        self.on_demand = on_demand
        self._recording = not on_demand
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for name in dict.fromkeys(layer_names):
            resolved = resolve_name(model, name)
            module = model.get_submodule(resolved)
            self._handles.append(module.register_forward_hook(self._store(_canonical(model, resolved))))

    def _store(self, key: str) -> Callable[[nn.Module, tuple[object, ...], Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[object, ...], output: Tensor) -> None:
            if not self._recording:
                return
            if self.on_demand and key in self.features:
                raise RuntimeError(f"{key!r} ran twice inside one feature capture; capture exactly one pass")
            self.features[key] = output

        return hook

    @contextmanager
    def capture(self) -> Iterator[FeatureTap]:
        """Record the outputs of the pass(es) run inside this block only, replacing earlier ones."""
        if not self.on_demand:
            raise RuntimeError("capture() needs a FeatureTap built with on_demand=True")
        self.clear()
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def __getitem__(self, name: str) -> Tensor:
        key = _canonical(self.model, resolve_name(self.model, name))
        if key not in self.features:
            raise KeyError(f"no output stored for {name!r}: is it tapped, and has the model run (in capture()) since?")
        return self.features[key]

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        """Detach all hooks and drop stored outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


@dataclass
class PDCRLayer:
    """One tapped layer: its name, samples per image and loss weight."""

    name: str
    num_samples: int
    weight: float


@dataclass
class PDCRConfig:
    """PDCR over several layers plus an optional cross-layer term (official 2D defaults in METHODS.md §2).

    The cross-layer term contrasts ``cross_layer[0]`` against ``cross_layer[1]`` at
    ``cross_num_samples`` shared locations; both layers need the same channel count unless a
    projection is passed to ``pdcr_total_loss``.
    """

    layers: list[PDCRLayer]
    patch_sizes: tuple[PatchSize, ...] | str = (5, 7, 9)
    tau: float = 1.0
    sampling: str = "grid"
    cross_layer: tuple[str, str] | None = None
    cross_weight: float = 0.01
    cross_num_samples: int = 32
    boundary_boost: float = 3.0

    def __post_init__(self) -> None:
        if not self.layers and self.cross_layer is None:
            raise ValueError("PDCRConfig needs at least one layer or a cross_layer pair")

    def tapped_names(self) -> list[str]:
        """Every layer name the loss reads, for building the FeatureTap."""
        names = [layer.name for layer in self.layers] + list(self.cross_layer or ())
        return list(dict.fromkeys(names))


def pdcr_total_loss(
    tap: FeatureTap,
    labels: Tensor,
    num_classes: int,
    cfg: PDCRConfig,
    ignore_index: int | None = None,
    generator: torch.Generator | None = None,
    cross_proj: nn.Module | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_l w_l PDCR(layer l) + cross_weight * cross-layer PDCR; also the detached parts by name."""
    options = dict(
        patch_sizes=cfg.patch_sizes,
        tau=cfg.tau,
        sampling=cfg.sampling,
        ignore_index=ignore_index,
        generator=generator,
        boundary_boost=cfg.boundary_boost,
    )
    parts: dict[str, Tensor] = {}
    weighted = []
    for layer in cfg.layers:
        loss = pdcr_loss(tap[layer.name], labels, num_classes, num_samples=layer.num_samples, **options)
        parts[f"pdcr/{layer.name}"] = loss.detach()
        weighted.append(layer.weight * loss)
    if cfg.cross_layer is not None:
        name_a, name_b = cfg.cross_layer
        loss = cross_layer_pdcr_loss(
            tap[name_a], tap[name_b], labels, num_classes, num_samples=cfg.cross_num_samples, proj=cross_proj, **options
        )
        parts[f"pdcr/cross/{name_a}~{name_b}"] = loss.detach()
        weighted.append(cfg.cross_weight * loss)
    total = torch.stack(weighted).sum()
    parts["pdcr/total"] = total.detach()
    return total, parts
