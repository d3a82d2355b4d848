"""What a deployment target is: which ops it runs, why it refuses one, and its limits.

A target answers one question, ``refusal(node, graph)``: ``None`` when the node runs
natively, otherwise the reason it does not. Its numeric and structural limits are data
(:class:`Limits`), so a decomposition rule asks the target it works for ("how large may a
pooling window be?") instead of assuming one backend's number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from deployplug.capture import Graph, Node
from deployplug.errors import OffendingOp

#: ``(node, graph) -> reason | None``: the one shape every op check has.
NodeCheck = Callable[[Node, Graph], "str | None"]
#: Model-level limits (number of inputs, outputs...): offenders not tied to one op.
GraphCheck = Callable[[Graph, str], "list[OffendingOp]"]

#: "numpy": any broadcasting; "channel_product": only a product with a per-channel
#: ``(N, C, 1, 1)`` operand (Caffe's two-bottom Scale); "none": operands of equal shape only.
Broadcast = Literal["numpy", "channel_product", "none"]

DEFAULT_HINT = ("let deployplug rewrite it (dp.decompose(model, example_input, target) applies "
                "every built-in rule), change that part of the model, or export to ONNX")


def always(node: Node, graph: Graph) -> str | None:
    """Check for ops a target runs with any attributes."""
    return None


@dataclass(frozen=True)
class Limits:
    """A target's limits as data, read by its own checks and by decomposition rules."""

    #: largest pooling window per axis (a global pooling counts with its input map)
    max_pool_window: int | None = None
    #: H/W padding must be equal on both sides and never crop
    symmetric_pad: bool = False
    #: mean/sum over spatial axes exist
    spatial_reductions: bool = True
    #: what element-wise ops broadcast
    broadcast: Broadcast = "numpy"


@dataclass(frozen=True)
class TargetProfile:
    """One deployment target.

    ``ops`` maps op name to a check; an op missing from ``ops`` is unsupported unless
    ``accepts_everything`` is set (the ONNX target: ``torch.onnx`` already knows its ops).
    ``hints`` are per-op suggestions attached to a refusal (``default_hint`` otherwise);
    ``graph_check`` reports model-level limits such as the number of inputs.
    """

    name: str
    format: str
    description: str
    ops: Mapping[str, NodeCheck] = field(default_factory=dict)
    accepts_everything: bool = False
    limits: Limits = field(default_factory=Limits)
    hints: Mapping[str, str] = field(default_factory=dict)
    default_hint: str = DEFAULT_HINT
    graph_check: GraphCheck | None = None

    def refusal(self, node: Node, graph: Graph) -> str | None:
        """``None`` when ``node`` runs natively on this target, otherwise the reason.

        A check that cannot read the node's arguments refuses it with that message rather
        than letting a half-understood node through.
        """
        check = self.ops.get(node.op)
        if check is None:
            return None if self.accepts_everything else f"{self.name} has no '{node.op}' op"
        try:
            return check(node, graph)
        except (KeyError, TypeError, ValueError) as exc:
            return f"unexpected arguments for '{node.op}': {exc}"

    def accepts_op(self, op: str) -> bool:
        """Whether some node of ``op`` can run here (its attributes still decide)."""
        return self.accepts_everything or op in self.ops

    def suggestions(self, op: str) -> tuple[str, ...]:
        return (self.hints.get(op, self.default_hint),)


def registry_agrees(writer: str, checks: Mapping[str, object],
                    lowerings: Mapping[str, object]) -> None:
    """Refuse (at import) a writer whose lowerings and its target's checks name other ops.

    A target that accepts an op the writer cannot lower would pass pre-flight and fail at
    export; a lowering without a check would let an op through pre-flight unchecked.
    """
    missing, extra = set(checks) - set(lowerings), set(lowerings) - set(checks)
    if missing or extra:
        raise ImportError(f"{writer} and target checks disagree: no lowering for "
                          f"{sorted(missing)}, no check for {sorted(extra)}")
