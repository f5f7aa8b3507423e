"""Name -> implementation registries: where a model, method or dataset makes itself known.

The one registration style: an implementation module decorates its builder or class with
``@MODELS.register("name")`` (``METHODS``, ``DATASETS``), and its package's ``__init__`` imports
the module. The schema (``vqseg.config``) and the code that builds things look names up here and
never import an implementation, so the layers only depend downwards. Built-in models and methods
register when ``vqseg.methods`` is imported (``vqseg.run`` and the command line do), datasets when
``vqseg.data`` is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from vqseg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name; ``key`` is the setting that names them (for the messages)."""

    def __init__(self, key: str, package: str) -> None:
        self.key = key
        self.package = package
        self._entries: dict[str, T] = {}
        self._extras: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **extras: Any) -> Callable[[T], T]:
        """Decorator: ``entry`` under ``name``, with ``extras`` (e.g. a method's parameter class)."""
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.key}={name!r} is registered twice")
            self._entries[name] = entry
            self._extras[name] = extras
            return entry

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            hint = f"choose from {self.names()}" if self._entries else f"nothing is registered: import {self.package}"
            raise ConfigError(f"{self.key}={name!r} is not registered; {hint}")
        return self._entries[name]

    def extra(self, name: str, key: str, default: Any = None) -> Any:
        self[name]  # an unknown name is a ConfigError
        return self._extras[name].get(key, default)


MODELS: Registry[Callable] = Registry("model.name", "vqseg.models")
METHODS: Registry[type] = Registry("method.name", "vqseg.methods")
DATASETS: Registry[Any] = Registry("data.dataset", "vqseg.data")
