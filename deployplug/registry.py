"""Named plug-ins (writers, runners) whose built-in modules are imported on first use.

Importing every format's module up front would pull in onnxruntime, OpenCV and protobuf for
a user of one format; instead each built-in name maps to the module that registers it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Items by name; ``builtin`` names the module that registers each built-in one.

    ``missing`` is the error text for an unknown name, with ``{name}`` and ``{known}``.
    """

    def __init__(self, builtin: Mapping[str, str], missing: str) -> None:
        self._items: dict[str, T] = {}
        self._builtin = dict(builtin)
        self._missing = missing

    def register(self, name: str, item: T) -> T:
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items and name in self._builtin:
            importlib.import_module(self._builtin[name])
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(self._missing.format(name=repr(name),
                                                  known=", ".join(self._builtin))) from None

    def builtin_names(self) -> list[str]:
        return list(self._builtin)


__all__ = ["Registry"]
