"""Single-node graphs built straight from an ATen op, the way ``capture`` would record them.

Rules carry such nodes as ``examples`` (what each rule exists for), so the registry can show
that a shipped target really hands a rule work; property tests use the same construction
because ``torch.export`` costs far more per example than running the op once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from deployplug.capture import Graph, Node, Ref, Value, _op_name


class A:
    """Marks activation input ``i`` among the arguments given to :func:`aten_node`."""

    def __init__(self, i: int = 0):
        self.i = i


def aten_node(overload: Any, acts: Sequence[torch.Tensor], *args: Any,
              **kwargs: Any) -> tuple[Node, Graph, torch.Tensor]:
    """(node, graph, PyTorch's output) for one ATen op applied to activations ``acts``.

    Arguments are bound by schema name with defaults filled in, like ``capture`` does;
    ``A(i)`` among ``args`` stands for ``acts[i]``.
    """
    schema = overload._schema
    real = [acts[a.i] if isinstance(a, A) else a for a in args]
    with torch.no_grad():
        ref = overload(*real, **kwargs)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    bound: dict[str, Any] = {}
    refs: list[str] = []
    for i, arg in enumerate(schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
        else:
            continue
        if isinstance(value, A):
            refs.append(f"x{value.i}")
            value = Ref(f"x{value.i}")
        bound[arg.name] = value
    op = _op_name(overload)
    node = Node(name=op, op=op, target=str(overload), args=bound, inputs=refs,
                shape=tuple(ref.shape), dtype=ref.dtype, module_path="m", module_type="M")
    graph = Graph(inputs=[Value(f"x{i}", tuple(t.shape), t.dtype) for i, t in enumerate(acts)],
                  nodes=[node], outputs=[node.name],
                  output_values=[Value(node.name, tuple(ref.shape), ref.dtype)])
    return node, graph, ref


Made = tuple[Node, Graph, torch.Tensor]


def examples(*makers: Callable[[], Made]) -> Callable[[], list[tuple[Node, Graph]]]:
    """``examples=`` for a rule: each maker returns ``aten_node(...)`` when called, and is
    called only when the examples are asked for (never at import)."""

    def build() -> list[tuple[Node, Graph]]:
        return [maker()[:2] for maker in makers]

    return build
