"""Target profiles: which ops (and attribute values) each deployment backend accepts.

A profile is data: a mapping from normalized op name (see :mod:`deployplug.capture`) to a
check that returns ``None`` when the node is native to the target, or the reason it is not.
The decomposition registry consults the same profiles, so "what the target lacks" is
written down exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deployplug.capture import Graph, Node

NodeCheck = Callable[[Node, Graph], "str | None"]


def always(node: Node, graph: Graph) -> str | None:
    """Check for ops a target runs with any attributes."""
    return None


@dataclass(frozen=True)
class TargetProfile:
    """What one deployment target accepts.

    ``ops`` maps op name to a check; an op missing from ``ops`` is unsupported unless
    ``accepts_everything`` is set (the ONNX profile: ``torch.onnx`` already knows its ops).
    """

    name: str
    format: str
    description: str
    ops: Mapping[str, NodeCheck] = field(default_factory=dict)
    accepts_everything: bool = False

    def refusal(self, node: Node, graph: Graph) -> str | None:
        """``None`` when ``node`` runs natively on this target, otherwise the reason."""
        check = self.ops.get(node.op)
        if check is None:
            return None if self.accepts_everything else f"{self.name} has no '{node.op}' op"
        return check(node, graph)


_REGISTRY: dict[str, TargetProfile] = {}


def register_target(profile: TargetProfile) -> TargetProfile:
    _REGISTRY[profile.name] = profile
    return profile


def get_target(name: str | TargetProfile) -> TargetProfile:
    if isinstance(name, TargetProfile):
        return name
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown target {name!r}; known targets: {', '.join(sorted(_REGISTRY))}"
        ) from None


def targets() -> list[TargetProfile]:
    """Every registered target profile."""
    _load_builtin()
    return list(_REGISTRY.values())


def _load_builtin() -> None:
    # Each profile module registers itself on import; imported lazily to avoid a cycle.
    from deployplug.profiles import caffe, msnhnet, onnx  # noqa: F401
