"""The MsnhNet rule registry and the graph lookups every rule shares.

A :class:`Rule` pairs a check (can MsnhNet express this node?) with a lowering (the layers
that compute it exactly). Rules live in :mod:`.conv`, :mod:`.pooling`, :mod:`.shapes` and
:mod:`.elementwise`; :mod:`.ops` loads them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deployplug.capture import Graph, Node, Ref
from deployplug.exporters.msnhnet.emit import Emitter

Check = Callable[[Node, Graph], "str | None"]
Lower = Callable[[Emitter, Node, Graph], "str | bool | None"]
PAD_MIN = -3.4e38  # "minus infinity" for max pooling, parsed fine by MsnhNet
CONST_OPS = frozenset({"clone", "lift_fresh_copy", "_to_copy", "detach", "alias"})


@dataclass(frozen=True)
class Rule:
    check: Check
    lower: Lower


RULES: dict[str, Rule] = {}


def rule(*ops: str, check: Check | None = None) -> Callable[[Lower], Lower]:
    def register(lower: Lower) -> Lower:
        for op in ops:
            RULES[op] = Rule(check or always_ok, lower)
        return lower

    return register


def always_ok(node: Node, graph: Graph) -> str | None:
    return None


# -- graph lookups ----------------------------------------------------------------------
def source(node: Node) -> str:
    return node.inputs[0]


def value_shape(graph: Graph, value: str) -> tuple[int, ...]:
    return tuple(graph.shape_of(value))


def input_shape(node: Node, graph: Graph) -> tuple[int, ...]:
    return value_shape(graph, source(node))


def pair(value: Any, default: int | None = None) -> tuple[int, int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        assert default is not None
        return default, default
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1])) if len(value) <= 2 else (-1, -1)
    return int(value), int(value)


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def constant_of(graph: Graph, value: Any) -> torch.Tensor | None:
    """The tensor behind a constant operand (a lifted tensor, or a clone of one)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Ref):
        try:
            node = graph.node(value.name)
        except KeyError:
            return None
        if node.op in CONST_OPS and not node.inputs:
            inner = node.args.get("self")
            return inner if isinstance(inner, torch.Tensor) else None
    return None


def scalar_of(graph: Graph, value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    tensor = constant_of(graph, value)
    if tensor is not None and tensor.numel() == 1:
        return float(tensor.reshape(()).item())
    return None


_NONNEG_OPS = frozenset({"relu", "relu6", "sigmoid", "softmax", "_softmax", "abs", "sqrt", "exp",
                         "cosh", "softplus", "hardsigmoid", "square"})
_NONNEG_PRESERVING = frozenset({"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
                                "adaptive_max_pool2d", "upsample_nearest2d",
                                "_upsample_nearest_exact2d", "upsample_bilinear2d", "view",
                                "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze",
                                "permute", "transpose", "cat", "slice", "getitem", "split",
                                "split_with_sizes", "mean", "sum"})


def provably_nonneg(graph: Graph, value: str, depth: int = 0) -> bool:
    """True when ``value`` is >= 0 by construction (needed before ``varop pow``)."""
    if depth > 64:
        return False
    try:
        node = graph.node(value)
    except KeyError:
        return False  # a graph input
    if node.op in _NONNEG_OPS:
        return True
    if node.op in ("clamp", "hardtanh"):
        low = node.args.get("min", node.args.get("min_val"))
        return isinstance(low, (int, float)) and low >= 0
    if node.op == "pow":
        e = scalar_of(graph, node.args.get("exponent"))
        if e is not None and e == int(e) and int(e) % 2 == 0:
            return True
    if node.op == "mul" and len(node.inputs) == 1 and node.args.get("self") == node.args.get(
            "other"):
        return True
    if node.op in ("add", "mul", "div"):
        other = scalar_of(graph, node.args.get("other"))
        if other is not None and other < 0:
            return False
    if node.op in _NONNEG_PRESERVING or node.op in ("add", "mul", "div"):
        return bool(node.inputs) and all(provably_nonneg(graph, v, depth + 1)
                                         for v in node.inputs)
    return False
