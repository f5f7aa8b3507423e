"""Training methods. Each module registers its method (and its parameter dataclass, the
``method`` section of the config) with ``@METHODS.register(name, config=...)``; importing this
package registers every built-in one, and the models they build on."""

from __future__ import annotations

from typing import Callable

from vqseg.config import Config
from vqseg.methods import bcp, cps, mean_teacher, unimatch, vqseg  # noqa: F401  (they register)
from vqseg.methods.base import Method
from vqseg.models import SegmentationModel
from vqseg.registry import METHODS


def available_methods() -> list[str]:
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    return METHODS[name]


def build_method(cfg: Config, model_factory: Callable[[], SegmentationModel], num_classes: int) -> Method:
    return METHODS[cfg.method.name](cfg, model_factory, num_classes)
