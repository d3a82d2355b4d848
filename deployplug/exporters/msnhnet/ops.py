"""Every MsnhNet rule, loaded in one place, and the single question the rest asks of them.

The checks are shared with the ``msnhnet`` target profile, so "what MsnhNet accepts" is
written once.
"""

from __future__ import annotations

from deployplug.capture import Graph, Node
from deployplug.exporters.msnhnet import (  # noqa: F401  (registration)
    conv,
    elementwise,
    pooling,
    shapes,
)
from deployplug.exporters.msnhnet.rules import CONST_OPS, RULES, Rule

__all__ = ["RULES", "Rule", "refusal"]


def refusal(node: Node, graph: Graph) -> str | None:
    """Why MsnhNet cannot express ``node`` (``None`` when it can)."""
    rule_ = RULES.get(node.op)
    if rule_ is None:
        return f"MsnhNet has no lowering for '{node.op}'"
    if node.op in CONST_OPS and node.inputs:
        return None
    return rule_.check(node, graph)
