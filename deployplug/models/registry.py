"""Name -> builder registry behind ``deployplug.models.build``.

Configs and the command line name models by string; keeping the mapping in one dictionary
means a new architecture is one decorated function, with no edits anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[B], B]:
    """Decorator: make ``builder(num_classes=..., in_channels=..., **kwargs)`` buildable by name."""

    def decorator(builder: B) -> B:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"model name '{name}' is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


def with_input_shape(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Record the (N, C, H, W) input a model is built for, as ``default_input_shape``."""
    object.__setattr__(model, "default_input_shape", tuple(shape))
    return model


def names() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_BUILDERS)


def build(name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model; the result carries ``default_input_shape`` (N, C, H, W)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown model '{name}'; registered models: {', '.join(names())}") from None
    model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if not hasattr(model, "default_input_shape"):
        raise TypeError(f"builder for '{name}' did not set default_input_shape")
    return model
