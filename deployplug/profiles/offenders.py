"""The one place refusals become :class:`~deployplug.errors.OffendingOp` lists and errors.

Writers, the decomposition pass and the pre-flight check all report what a target refuses;
building the records here keeps their wording, hints and order identical everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from deployplug.capture import Graph, Node
from deployplug.errors import OffendingOp, UnsupportedOpError
from deployplug.profiles.base import TargetProfile

Notes = Callable[[Node, str], Sequence[str]]


def offending_op(node: Node, reason: str, target: TargetProfile,
                 suggestions: Sequence[str] | None = None) -> OffendingOp:
    """One refused node; ``suggestions`` default to the target's hint for the op."""
    notes = target.suggestions(node.op) if suggestions is None else tuple(suggestions)
    return OffendingOp(node.op, node.module_path, target.name, reason, tuple(notes))


def offenders(graph: Graph, target: TargetProfile, notes: Notes | None = None,
              model_level: bool = True) -> list[OffendingOp]:
    """Every node ``target`` refuses, in graph order, then its model-level offenders.

    ``notes(node, reason)`` replaces the target's hints (the decomposition pass explains
    which rules it tried instead).
    """
    found = []
    for node in graph.nodes:
        reason = target.refusal(node, graph)
        if reason is not None:
            found.append(offending_op(node, reason, target,
                                      None if notes is None else notes(node, reason)))
    if model_level and target.graph_check is not None:
        found += target.graph_check(graph, target.name)
    return found


def require_supported(graph: Graph, target: TargetProfile) -> None:
    """Raise :class:`UnsupportedOpError` naming every offender, if there is one."""
    found = offenders(graph, target)
    if found:
        raise UnsupportedOpError(found)
