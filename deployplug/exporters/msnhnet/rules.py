"""The MsnhNet rule registry and the graph lookups every rule shares.

Each op has one lowering (the layers that compute it exactly); whether a node may be lowered
at all is decided by the ``msnhnet`` target before the writer runs. Lowerings live in
:mod:`.conv`, :mod:`.pooling`, :mod:`.shapes` and :mod:`.elementwise`; :mod:`.ops` loads
them all.
"""

from __future__ import annotations

from collections.abc import Callable

from deployplug.capture import Graph, Node
from deployplug.exporters.msnhnet.emit import Emitter
from deployplug.profiles.msnhnet_checks import CONST_OPS

Lower = Callable[[Emitter, Node, Graph], "str | bool | None"]
PAD_MIN = -3.4e38  # "minus infinity" for max pooling, parsed fine by MsnhNet

#: op -> lowering; which ops are legal (and why not) is the ``msnhnet`` target's business
#: (:mod:`deployplug.profiles.msnhnet_checks`), and :mod:`.ops` holds the key sets equal.
RULES: dict[str, Lower] = {}


def rule(*ops: str) -> Callable[[Lower], Lower]:
    def register(lower: Lower) -> Lower:
        for op in ops:
            RULES[op] = lower
        return lower

    return register


# -- graph lookups ----------------------------------------------------------------------
def source(node: Node) -> str:
    return node.inputs[0]


def value_shape(graph: Graph, value: str) -> tuple[int, ...]:
    return tuple(graph.shape_of(value))


__all__ = ["CONST_OPS", "PAD_MIN", "RULES", "Lower", "rule", "source", "value_shape"]
