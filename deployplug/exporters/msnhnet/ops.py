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
from deployplug.profiles.msnhnet import MSNHNET
from deployplug.profiles.msnhnet_checks import CHECKS

__all__ = ["RULES", "refusal"]


def _registry_matches_target() -> None:
    missing, extra = set(CHECKS) - set(RULES), set(RULES) - set(CHECKS)
    if missing or extra:
        raise ImportError(f"MsnhNet lowerings and target checks disagree: no lowering for "
                          f"{sorted(missing)}, no check for {sorted(extra)}")


_registry_matches_target()


def refusal(node: Node, graph: Graph) -> str | None:
    """Why MsnhNet cannot express ``node`` (``None`` when it can)."""
    return MSNHNET.refusal(node, graph)
