"""The ``msnhnet`` target: what the MsnhNet writer lowers, with the writer's own checks.

The op map is built from the writer's rule table, and every check is the writer's check,
so the profile and the lowering cannot disagree. Not accepted (left to decomposition
rules or refused): 3-D convolutions, instance/layer/group norm, gelu, log_softmax,
broadcasting element-wise ops, softmax anywhere but the output, ``pow`` with a non-integer
exponent on possibly negative values, reflect/replicate padding, non-divisible adaptive
pooling, bilinear resizing by non-exact scale factors, reductions over the batch axis.
"""

from __future__ import annotations

from deployplug.capture import Graph, Node
from deployplug.exporters.msnhnet.ops import RULES
from deployplug.profiles import NodeCheck, TargetProfile, register_target


def _checker(op: str) -> NodeCheck:
    check = RULES[op].check

    def run(node: Node, graph: Graph) -> str | None:
        return check(node, graph)

    run.__doc__ = f"MsnhNet limits for {op}"
    return run


MSNHNET = register_target(
    TargetProfile(
        name="msnhnet",
        format="msnhnet",
        description=(
            "MsnhNet .msnhnet/.msnhbin, checked by the numpy reference runtime that follows "
            "the measured C++ semantics"
        ),
        ops={op: _checker(op) for op in sorted(RULES)},
    )
)
