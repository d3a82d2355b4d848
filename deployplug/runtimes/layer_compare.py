"""Compare an artifact with PyTorch layer by layer and find the first layer to blame.

Every format does the same three things, only the middle one differs:

1. PyTorch's value of every node of the graph the artifact was *lowered from* (the fused,
   decomposed, captured graph), by replaying it (:func:`reference_values`);
2. the artifact's value for every node it holds in a value of its own, as the format maps
   nodes to values (:class:`MappedLayer`) and its runtime computes them
   (:class:`ArtifactValues`), run as far as the runtime gets;
3. the comparison (:func:`build_profile`): each row's normalized error, its status, the rows
   it reads, the decomposition rule that produced it, and the culprit -- the first row whose
   inputs agree and whose output does not (see :mod:`deployplug.layer_profile`).

Comparing against the lowered graph, not against the model as the user wrote it, is what
makes the blame land on the right layer: a BatchNorm folded into a convolution, a pooling
rewritten as a chain, or an op replaced by a rule exists only in that graph.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deployplug.capture import Graph, Node, evaluate
from deployplug.layer_profile import ABOVE, FAILED, MISSING, OK, SHAPE, LayerProfile, LayerRow
from deployplug.limits import current
from deployplug.numerics import normalized_error


@dataclass
class MappedLayer:
    """A graph node and where the artifact holds its output."""

    node: str
    artifact: str  # the value / blob / layer holding the output
    layers: list[str]  # the artifact layers that compute it, in artifact order
    kinds: list[str]  # their types


@dataclass
class ArtifactValues:
    """What the runtime computed for the mapped nodes (by node name), and where it stopped."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    #: the artifact layer the runtime could not load or run (the rest was not evaluated)
    stopped_at: str | None = None
    error: str = ""


def graph_ops(graph: Graph) -> list[list[str]]:
    """``[[name, op], ...]``: what a rebuilt graph must equal to be compared with an artifact."""
    return [[node.name, node.op] for node in graph.nodes]


def graph_mismatch(graph: Graph, recorded: Any) -> str | None:
    """Why ``graph`` is not the graph recorded at export (``None`` when it is)."""
    if not isinstance(recorded, list):
        return None
    mine = graph_ops(graph)
    if mine == recorded:
        return None
    for i, (a, b) in enumerate(zip(mine, recorded)):
        if a != b:
            return (f"node {i} is {a[0]!r} ({a[1]}) in the model's graph but "
                    f"{str(b)[:200]} in the graph the artifact was written from")
    return (f"the model's graph has {len(mine)} nodes, the graph the artifact was written "
            f"from {len(recorded)}")


def reference_values(graph: Graph, inputs: Sequence[np.ndarray]) -> dict[str, Any]:
    """PyTorch's value of every graph value, charged to the tensor budget first."""
    total = 0
    for node in graph.nodes:
        shapes = [node.shape] if node.shape is not None else list(node.shapes)
        for shape in shapes:
            total += 8 * int(np.prod(shape, dtype=np.int64)) if shape else 8
    current().check_total(total, "the per-layer comparison (PyTorch's value of every node)")
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    return evaluate(graph, tensors)


def decomposition_rule(module_path: str, rewrites: Sequence[Mapping[str, Any]]) -> str:
    """The rule(s) whose replacement module computes a node at ``module_path``.

    A rewrite puts its replacement at ``<module path>.<op>_decomposed`` (with a numeric suffix
    when taken); nested rewrites are listed outermost first.
    """
    found: list[tuple[int, str]] = []
    for rewrite in rewrites:
        if not isinstance(rewrite, Mapping):
            continue
        rule, sub = rewrite.get("rule"), rewrite.get("submodule")
        if not isinstance(rule, str):
            continue
        if not isinstance(sub, str):
            path, op = rewrite.get("module_path"), rewrite.get("op")
            if not isinstance(path, str) or not isinstance(op, str):
                continue
            base = f"{path}.{op}_decomposed" if path else f"{op}_decomposed"
            sub = re.sub(r"[^A-Za-z0-9_.]", "_", base)
            pattern = re.escape(sub) + r"(_\d+)?"
        else:
            pattern = re.escape(sub)
        match = re.match(pattern + r"(\.|$)", module_path)
        if match:
            found.append((len(match.group(0)), rule))
    return " > ".join(dict.fromkeys(rule for _, rule in sorted(found)))


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return None


def _compare(row: LayerRow, got: np.ndarray, ref: np.ndarray, tolerance: float,
             strict_shapes: bool) -> None:
    got = np.asarray(got)
    if got.shape != ref.shape:
        if strict_shapes or got.size != ref.size:
            row.status, row.artifact_shape = SHAPE, list(got.shape)
            return
        got = got.reshape(ref.shape)  # Caffe and MsnhNet drop or fold unit axes
    err = normalized_error(got, ref)
    if not np.isfinite(err):
        row.status, row.error = ABOVE, None
        return
    row.error = err
    row.status = OK if err <= tolerance else ABOVE


def build_profile(fmt: str, source: str, graph: Graph, mapped: Sequence[MappedLayer],
                  reference: Mapping[str, Any], got: ArtifactValues, tolerance: float,
                  rewrites: Sequence[Mapping[str, Any]] = (), strict_shapes: bool = False,
                  note: str = "") -> LayerProfile:
    """The profile of one format: rows in graph order, statuses, inputs and the culprit."""
    by_node = {m.node: m for m in mapped}
    nodes: dict[str, Node] = {n.name: n for n in graph.nodes}
    rows: list[LayerRow] = []
    ancestors: dict[str, set[str]] = {}
    for node in graph.nodes:
        reads: set[str] = set()
        for name in node.inputs:
            if name in by_node:
                reads.add(name)
            elif name in nodes:
                reads |= ancestors.get(name, set())
        ancestors[node.name] = reads
        m = by_node.get(node.name)
        ref = _as_array(reference.get(node.name))
        if m is None or ref is None:
            continue
        row = LayerRow(node=node.name, op=node.op, module=node.module_path,
                       artifact=m.artifact, layers=list(m.layers), kinds=list(m.kinds),
                       shape=list(ref.shape), rule=decomposition_rule(node.module_path,
                                                                      rewrites),
                       inputs=sorted(reads, key=list(nodes).index))
        value = got.values.get(node.name)
        if value is not None:
            _compare(row, value, ref, tolerance, strict_shapes)
        elif got.stopped_at is not None and got.stopped_at in m.layers:
            row.status, row.note = FAILED, got.error
        else:
            row.status = MISSING
            if got.stopped_at is not None:
                row.note = f"the runtime stopped before it, at '{got.stopped_at}'"
        rows.append(row)
        # an unmapped node passes its inputs' agreement on; a mapped one stands for itself
    status = {r.node: r.status for r in rows}
    culprit = None
    for row in rows:
        if row.status in (ABOVE, SHAPE, FAILED) and all(status.get(i) == OK
                                                        for i in row.inputs):
            culprit = row.node
            break
    notes = [note] if note else []
    if got.stopped_at is not None and not any(r.status == FAILED for r in rows):
        notes.append(f"the runtime stopped at '{got.stopped_at}': {got.error}")
    return LayerProfile(format=fmt, source=source, tolerance=tolerance, rows=rows,
                        culprit=culprit, unmapped=len(graph.nodes) - len(rows),
                        note="; ".join(notes))


def first_input_alias(node: Node, where: Mapping[str, Any]) -> bool:
    """Whether ``node`` lives in the same artifact value as its first input (a no-op there)."""
    return bool(node.inputs) and node.inputs[0] in where and where[node.inputs[0]] == where.get(
        node.name)


def bisect_prefix(total: int, runs: Any) -> int:
    """The largest ``k`` in ``[0, total]`` for which ``runs(k)`` is true (``runs(0)`` assumed).

    Used to find how far a runtime gets when a file cannot run as a whole: a prefix that runs
    is assumed to stay runnable when shortened, which holds for layer lists in graph order.
    """
    low, high = 0, total
    while low < high:
        mid = (low + high + 1) // 2
        if runs(mid):
            low = mid
        else:
            high = mid - 1
    return low


__all__ = ["ArtifactValues", "MappedLayer", "bisect_prefix", "build_profile",
           "decomposition_rule", "first_input_alias", "graph_mismatch", "graph_ops",
           "reference_values"]
