"""Every MsnhNet lowering, loaded in one place, and the single question the rest asks of them.

Whether a node can be lowered is the ``msnhnet`` target's answer
(:data:`deployplug.profiles.msnhnet.MSNHNET`); the lowerings registered here cover exactly
the ops that target accepts, which is checked when this module is imported.
"""

from __future__ import annotations

from deployplug.capture import Graph, Node
from deployplug.exporters.msnhnet import (  # noqa: F401  (registration)
    conv,
    elementwise,
    pooling,
    shapes,
)
from deployplug.exporters.msnhnet.rules import RULES
from deployplug.profiles.base import registry_agrees
from deployplug.profiles.msnhnet import MSNHNET
from deployplug.profiles.msnhnet_checks import CHECKS

__all__ = ["RULES", "refusal"]


def check_registry() -> None:
    """Every op the target accepts has a lowering here, and every lowering a check."""
    registry_agrees("MsnhNet lowerings", CHECKS, RULES)


check_registry()


def refusal(node: Node, graph: Graph) -> str | None:
    """Why MsnhNet cannot express ``node`` (``None`` when it can)."""
    return MSNHNET.refusal(node, graph)
