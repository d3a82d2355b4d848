"""Deployment targets: which ops each backend runs, why it refuses the others, its limits.

A target (:class:`TargetProfile`) is data plus checks of one shape, ``(node, graph) -> reason
| None`` (see :mod:`.base`). The checks read ops through :mod:`deployplug.ops`, and nothing
here imports a writer: the writers derive their layer registries from these targets (and a
test holds the two equal), the decomposition pass asks the same targets what to rewrite, and
:mod:`.offenders` turns refusals into the error every stage raises.

Built-in targets: ``onnx`` (:mod:`.onnx`), ``caffe`` and ``om`` (:mod:`.caffe`), ``msnhnet``
(:mod:`.msnhnet`).
"""

from __future__ import annotations

from deployplug.profiles.base import (
    DEFAULT_HINT,
    Broadcast,
    GraphCheck,
    Limits,
    NodeCheck,
    TargetProfile,
    always,
)
from deployplug.profiles.offenders import offenders, offending_op, require_supported

_REGISTRY: dict[str, TargetProfile] = {}
_SHIPPED: set[str] = set()


def register_target(profile: TargetProfile) -> TargetProfile:
    """Make ``profile`` known by name (``get_target``, ``dp.targets()``)."""
    _REGISTRY[profile.name] = profile
    return profile


def get_target(name: str | TargetProfile) -> TargetProfile:
    """The target called ``name`` (a profile object is returned as it is)."""
    if isinstance(name, TargetProfile):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown target {name!r}; known targets: {', '.join(sorted(_REGISTRY))}"
        ) from None


def targets() -> list[TargetProfile]:
    """Every registered target profile."""
    return list(_REGISTRY.values())


def shipped_targets() -> list[TargetProfile]:
    """The targets deployplug itself defines (not ones a user or a test registered)."""
    return [p for p in _REGISTRY.values() if p.name in _SHIPPED]


def _register_builtin() -> None:
    from deployplug.profiles import caffe, msnhnet, onnx

    for profile in (caffe.CAFFE, caffe.OM, msnhnet.MSNHNET, onnx.ONNX):
        register_target(profile)
        _SHIPPED.add(profile.name)


_register_builtin()

__all__ = [
    "DEFAULT_HINT",
    "Broadcast",
    "GraphCheck",
    "Limits",
    "NodeCheck",
    "TargetProfile",
    "always",
    "get_target",
    "offenders",
    "offending_op",
    "register_target",
    "require_supported",
    "shipped_targets",
    "targets",
]
