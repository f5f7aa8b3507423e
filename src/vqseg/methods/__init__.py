"""Registry of training methods: each name maps to a Method class and its parameter dataclass."""

from __future__ import annotations

import importlib
from typing import Callable

from vqseg.config import MethodConfig

_METHODS: dict[str, tuple[str, str, str]] = {
    # name: (module, method class, config class)
    "supervised": ("vqseg.methods.base", "Supervised", ""),
    "vqseg": ("vqseg.methods.vqseg", "VQSeg", "VQSegConfig"),
    "mean_teacher": ("vqseg.methods.mean_teacher", "MeanTeacher", "MeanTeacherConfig"),
    "unimatch": ("vqseg.methods.unimatch", "UniMatch", "UniMatchConfig"),
    "bcp": ("vqseg.methods.bcp", "BCP", "BCPConfig"),
    "cps": ("vqseg.methods.cps", "CPS", "CPSConfig"),
}


def register(name: str, module: str, method_class: str, config_class: str = "") -> None:
    _METHODS[name] = (module, method_class, config_class)


def available_methods() -> list[str]:
    return sorted(_METHODS)


def _lookup(name: str) -> tuple[type, type]:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; choose from {available_methods()}")
    module_name, method_name, config_name = _METHODS[name]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name) if config_name else MethodConfig
    return getattr(module, method_name), config_cls


def method_config_class(name: str) -> type:
    return _lookup(name)[1]


def method_class(name: str) -> type:
    return _lookup(name)[0]


def build_method(cfg, model_factory: Callable, num_classes: int):
    return method_class(cfg.method.name)(cfg, model_factory, num_classes)
