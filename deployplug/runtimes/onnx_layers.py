"""Which ONNX value holds each graph node's output, and its value in onnxruntime.

**The mapping.** deployplug exports ONNX with ``torch.onnx.export`` from the target-legal
module, by default with the TorchScript exporter. That exporter names every ONNX node after
the module scope it ran in (``/stage1/stage1.0/conv/Conv``; ``/Add_1`` for a functional op of
the model's own forward), and the captured graph records the same module path for every node
(``nn_module_stack``). Both are traces of one forward, so within one module the ops come in
the same order. So, per module path, the captured nodes and the ONNX nodes are aligned like
two sequences (the longest alignment, by dynamic programming), where a captured node may pair
only with an ONNX node whose type can compute it (``conv2d`` with ``Conv``, ``cat`` with
``Concat``, ``split`` with ``Split`` -- whose outputs then hold the ``getitem`` results,
``silu`` with the ``Mul`` that ends ``Sigmoid``/``Mul``...). Ties go to a pairing whose
shape matches and, at export, whose value matches PyTorch's; failing that to the later ONNX
node, since a multi-node composition ends in the op that holds the result. Two things the
exporter does are undone by rule: a BatchNorm it folds into the preceding convolution is
mapped to that convolution's output (and the convolution to nothing), and the graph outputs
are pinned to the file's outputs. The dynamo exporter records the same module path in each
node's ``pkg.torch.onnx.name_scopes`` metadata, so its files are mapped the same way.

The mapping is computed once, at export, on files that just passed verification, and stored
in the format record (``info["layer_values"]``); a later ``dp.verify(dir, model=...)`` uses the
stored one, so editing a file does not move the blame. Captured nodes of unknown op types are
left unmapped: a missing row is better than a wrong one.

**The values** come from one onnxruntime session on a copy of the model whose outputs are
the mapped values. A file that cannot load or run as a whole (say a changed padding that
makes a later Add see two shapes) is cut after a prefix of its nodes, the longest that runs
(bisection), so every value before the failing node is still compared and the failing node is
named.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from deployplug.capture import Graph, Node
from deployplug.exporters.onnx import scope_to_module_path
from deployplug.limits import current
from deployplug.numerics import normalized_error
from deployplug.runtimes.layer_compare import ArtifactValues, MappedLayer, bisect_prefix

_BINARY = {"add": "Add", "sub": "Sub", "rsub": "Sub", "mul": "Mul", "div": "Div",
           "maximum": "Max", "minimum": "Min", "pow": "Pow"}
_TYPES: dict[str, frozenset[str]] = {
    **{op: frozenset({t}) for op, t in _BINARY.items()},
    **{op: frozenset({"Conv"}) for op in ("conv1d", "conv2d", "conv3d")},
    **{op: frozenset({"ConvTranspose"})
       for op in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")},
    "convolution": frozenset({"Conv", "ConvTranspose"}),
    "_convolution": frozenset({"Conv", "ConvTranspose"}),
    # the dynamo exporter folds BatchNorm into a preceding Conv inside the BatchNorm's scope
    "batch_norm": frozenset({"BatchNormalization", "Conv", "ConvTranspose"}),
    "instance_norm": frozenset({"InstanceNormalization"}),
    "layer_norm": frozenset({"LayerNormalization"}),
    "group_norm": frozenset({"GroupNormalization", "Add"}),
    "relu": frozenset({"Relu"}), "leaky_relu": frozenset({"LeakyRelu"}),
    "prelu": frozenset({"PRelu"}), "elu": frozenset({"Elu"}), "selu": frozenset({"Selu"}),
    "celu": frozenset({"Celu"}), "sigmoid": frozenset({"Sigmoid"}), "tanh": frozenset({"Tanh"}),
    **{op: frozenset({"Clip", "Max", "Min"})
       for op in ("hardtanh", "relu6", "clamp", "clamp_min", "clamp_max")},
    "hardsigmoid": frozenset({"HardSigmoid"}), "hardswish": frozenset({"HardSwish", "Mul"}),
    "silu": frozenset({"Mul"}), "mish": frozenset({"Mul"}), "gelu": frozenset({"Gelu", "Mul"}),
    "softplus": frozenset({"Softplus"}),
    "softmax": frozenset({"Softmax"}), "_softmax": frozenset({"Softmax"}),
    "log_softmax": frozenset({"LogSoftmax"}), "_log_softmax": frozenset({"LogSoftmax"}),
    "exp": frozenset({"Exp"}), "log": frozenset({"Log"}), "abs": frozenset({"Abs"}),
    "neg": frozenset({"Neg"}), "sqrt": frozenset({"Sqrt"}),
    "rsqrt": frozenset({"Reciprocal", "Div"}), "reciprocal": frozenset({"Reciprocal"}),
    "square": frozenset({"Mul", "Pow"}),
    "cat": frozenset({"Concat"}), "concat": frozenset({"Concat"}),
    "slice": frozenset({"Slice"}), "select": frozenset({"Gather"}),
    **{op: frozenset({"Reshape", "Flatten"}) for op in ("view", "reshape", "_unsafe_view",
                                                          "flatten")},
    "squeeze": frozenset({"Squeeze", "Reshape"}),
    "unsqueeze": frozenset({"Unsqueeze", "Reshape"}),
    "permute": frozenset({"Transpose"}), "transpose": frozenset({"Transpose"}),
    **{op: frozenset({"MaxPool"}) for op in ("max_pool1d", "max_pool2d", "max_pool3d")},
    **{op: frozenset({"AveragePool"}) for op in ("avg_pool1d", "avg_pool2d", "avg_pool3d")},
    **{op: frozenset({"GlobalAveragePool", "AveragePool", "ReduceMean"})
       for op in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d")},
    "adaptive_max_pool2d": frozenset({"GlobalMaxPool", "MaxPool"}),
    "mean": frozenset({"ReduceMean", "GlobalAveragePool"}), "sum": frozenset({"ReduceSum"}),
    "amax": frozenset({"ReduceMax"}), "amin": frozenset({"ReduceMin"}),
    **{op: frozenset({"Resize", "Upsample"})
       for op in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                  "_upsample_nearest_exact2d", "upsample_bilinear2d", "upsample_bicubic2d",
                  "upsample_linear1d", "upsample_trilinear3d")},
    **{op: frozenset({"Pad"}) for op in ("pad", "constant_pad_nd", "reflection_pad2d",
                                         "replication_pad2d", "reflection_pad1d",
                                         "replication_pad1d")},
    "pixel_shuffle": frozenset({"DepthToSpace", "Reshape"}),
    "pixel_unshuffle": frozenset({"SpaceToDepth", "Reshape"}),
    "mm": frozenset({"MatMul", "Gemm"}), "matmul": frozenset({"MatMul", "Gemm"}),
    "bmm": frozenset({"MatMul"}), "addmm": frozenset({"Gemm", "Add"}),
    "argmax": frozenset({"ArgMax"}), "argmin": frozenset({"ArgMin"}),
}
SPLIT_OPS = frozenset({"split", "split_with_sizes", "chunk", "unsafe_split"})
_CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                       "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
#: ONNX nodes that never hold a captured node's result
_NEVER = frozenset({"Constant", "ConstantOfShape", "Shape", "Size"})
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16}
_MAX_SCOPE_TEXT = 1 << 16
#: a pairing counts as "the same value" at this normalized error (a loose bound on purpose:
#: it only breaks ties between pairings the structure allows)
_CLOSE = 1e-3


def _types(node: Node) -> frozenset[str] | None:
    if node.op == "linear":
        return frozenset({"Gemm", "Add"} if node.args.get("bias") is not None
                         else {"Gemm", "MatMul"})
    if node.op in SPLIT_OPS:
        return frozenset({"Split"})
    return _TYPES.get(node.op)


@dataclass
class OnnxNode:
    index: int
    name: str
    op_type: str
    scope: str | None
    inputs: list[str]
    outputs: list[str]


def node_scope(node: onnx.NodeProto) -> str | None:
    """The module path an ONNX node was exported from, when its name or metadata says."""
    for prop in node.metadata_props:
        if prop.key != "pkg.torch.onnx.name_scopes":
            continue
        if len(prop.value) > _MAX_SCOPE_TEXT:
            return None
        try:
            scopes = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        if (isinstance(scopes, list) and len(scopes) >= 2
                and all(isinstance(s, str) for s in scopes)):
            return scopes[-2]
        return None
    if node.name.startswith("/"):
        return scope_to_module_path(node.name)
    return None


def onnx_nodes(proto: onnx.ModelProto) -> list[OnnxNode]:
    return [OnnxNode(i, n.name, n.op_type, node_scope(n), list(n.input), list(n.output))
            for i, n in enumerate(proto.graph.node)]


def _declared_types(proto: onnx.ModelProto) -> tuple[dict[str, tuple[Any, ...]], dict[str, bool]]:
    """Shapes and float-ness of values, from ONNX shape inference (best effort)."""
    shapes: dict[str, tuple[Any, ...]] = {}
    floats: dict[str, bool] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # inference is a hint only; an odd file just maps with less help
        return shapes, floats
    graph = inferred.graph
    for info in [*graph.value_info, *graph.output, *graph.input]:
        tensor = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            continue
        floats[info.name] = tensor.elem_type in _FLOATS
        if tensor.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                      for d in tensor.shape.dim)
    return shapes, floats


def _same_shape(declared: Sequence[Any], shape: Sequence[int]) -> bool:
    return len(declared) == len(shape) and all(d is None or d == s
                                               for d, s in zip(declared, shape))


class _Scorer:
    """How well a captured node pairs with an ONNX node (0: it cannot)."""

    def __init__(self, graph: Graph, shapes: Mapping[str, tuple[Any, ...]],
                 floats: Mapping[str, bool], values: Mapping[str, np.ndarray] | None,
                 reference: Mapping[str, Any] | None):
        self.graph, self.shapes, self.floats = graph, shapes, floats
        self.values, self.reference = values or {}, reference or {}

    def __call__(self, f: Node, o: OnnxNode) -> int:
        types = _types(f)
        if types is None or o.op_type not in types or not o.outputs:
            return 0
        if f.op in SPLIT_OPS:
            return 2 if len(o.outputs) == len(f.shapes) else 1
        out = o.outputs[0]
        is_float = f.dtype is not None and f.dtype.is_floating_point
        value = self.values.get(out)
        if value is not None:
            if is_float != (value.dtype.kind == "f"):
                return 0
            shape_ok = f.shape is not None and tuple(value.shape) == tuple(f.shape)
        else:
            if out in self.floats and self.floats[out] != is_float:
                return 0
            declared = self.shapes.get(out)
            shape_ok = declared is not None and f.shape is not None and _same_shape(
                declared, f.shape)
        score = 2 if shape_ok else 1
        ref = self.reference.get(f.name)
        if shape_ok and value is not None and ref is not None and hasattr(ref, "numpy"):
            try:
                if normalized_error(value, ref.detach().numpy()) <= _CLOSE:
                    score += 1
            except ValueError:
                pass
        return score


def _align(fx: list[Node], ox: list[OnnxNode], score: _Scorer) -> list[tuple[Node, OnnxNode]]:
    """The heaviest order-preserving pairing; ties prefer later ONNX nodes (see module doc)."""
    n, m = len(fx), len(ox)
    weight = [[score(f, o) for o in ox] for f in fx]
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, ws = best[i], best[i - 1], weight[i - 1]
        for j in range(1, m + 1):
            pick = prev[j - 1] + ws[j - 1] if ws[j - 1] else 0
            row[j] = max(prev[j], row[j - 1], pick)
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        w = weight[i - 1][j - 1]
        if w and best[i][j] == best[i - 1][j - 1] + w:
            pairs.append((fx[i - 1], ox[j - 1]))
            i, j = i - 1, j - 1
        elif best[i][j] == best[i][j - 1]:
            j -= 1
        else:
            i -= 1
    return pairs[::-1]


def map_values(proto: onnx.ModelProto, graph: Graph,
               values: Mapping[str, np.ndarray] | None = None,
               reference: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Graph node name -> the ONNX value holding its output (see the module docstring)."""
    nodes = onnx_nodes(proto)
    scopes = {n.module_path for n in graph.nodes}
    computed = values or {}
    complete = all(out in computed for o in nodes if o.scope in scopes
                   and o.op_type not in _NEVER for out in o.outputs[:1])
    # shape inference only fills in for values the runtime did not compute
    shapes, floats = ({}, {}) if complete else _declared_types(proto)
    score = _Scorer(graph, shapes, floats, values, reference)
    fx_by_scope: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if _types(node) is not None:
            fx_by_scope.setdefault(node.module_path, []).append(node)
    ox_by_scope: dict[str, list[OnnxNode]] = {}
    for o in nodes:
        if o.scope is not None and o.op_type not in _NEVER:
            ox_by_scope.setdefault(o.scope, []).append(o)
    mapping: dict[str, str] = {}
    getitems: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "getitem" and node.inputs:
            getitems.setdefault(node.inputs[0], []).append(node)
    for scope, fx in fx_by_scope.items():
        for f, o in _align(fx, ox_by_scope.get(scope, []), score):
            if f.op in SPLIT_OPS:
                for user in getitems.get(f.name, []):
                    k = user.args.get("arg1")
                    if isinstance(k, int) and 0 <= k < len(o.outputs):
                        mapping[user.name] = o.outputs[k]
            else:
                mapping[f.name] = o.outputs[0]
    _undo_conv_bn_folding(graph, nodes, mapping)
    _pin_outputs(graph, proto, mapping)
    inputs = {v.name for v in graph.inputs}
    return {k: v for k, v in mapping.items() if k not in inputs}


def _undo_conv_bn_folding(graph: Graph, nodes: list[OnnxNode], mapping: dict[str, str]) -> None:
    """A BatchNorm the exporter folded into its convolution lives in that conv's output."""
    producer = {out: o for o in nodes for out in o.outputs}
    consumers: dict[str, list[str]] = {}
    for o in nodes:
        for name in o.inputs:
            consumers.setdefault(name, []).append(o.op_type)
    users: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            users[name] = users.get(name, 0) + 1
    ops = {n.name: n.op for n in graph.nodes}
    for node in graph.nodes:
        if node.op != "batch_norm" or node.name in mapping or not node.inputs:
            continue
        src = node.inputs[0]
        value = mapping.get(src)
        if value is None or ops.get(src) not in _CONV_OPS or users.get(src) != 1:
            continue
        made_by = producer.get(value)
        if (made_by is not None and made_by.op_type in ("Conv", "ConvTranspose")
                and "BatchNormalization" not in consumers.get(value, [])):
            mapping[node.name] = value
            del mapping[src]


def _pin_outputs(graph: Graph, proto: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """The graph's outputs are the file's outputs, in order: they need no guessing."""
    names = {n.name for n in graph.nodes}
    outputs = [o.name for o in proto.graph.output]
    for name, value in zip(graph.outputs, outputs):
        if name not in names or mapping.get(name) == value:
            continue
        for other in [k for k, v in mapping.items() if v == value]:
            del mapping[other]
        mapping[name] = value


def regions(proto: onnx.ModelProto, mapping: Mapping[str, str]) -> dict[str, list[OnnxNode]]:
    """Per mapped node, the ONNX nodes that compute its value from the other mapped values.

    Walks back from the node producing the value until it reaches a graph input, an
    initializer or another mapped value; those nodes (Constants included) are the layers to
    blame when the value is wrong.
    """
    nodes = onnx_nodes(proto)
    producer = {out: o for o in nodes for out in o.outputs if out}
    stop = set(mapping.values()) | {i.name for i in proto.graph.input} | {
        t.name for t in proto.graph.initializer}
    out: dict[str, list[OnnxNode]] = {}
    for name, value in mapping.items():
        first = producer.get(value)
        if first is None:
            out[name] = []
            continue
        seen = {first.index}
        todo = [first]
        while todo:
            cur = todo.pop()
            for inp in cur.inputs:
                prev = producer.get(inp)
                if not inp or inp in stop or prev is None or prev.index in seen:
                    continue
                seen.add(prev.index)
                todo.append(prev)
        out[name] = [nodes[i] for i in sorted(seen)]
    return out


def mapped_layers(proto: onnx.ModelProto, graph: Graph,
                  mapping: Mapping[str, str]) -> list[MappedLayer]:
    """Rows for :func:`~deployplug.runtimes.layer_compare.build_profile`, in graph order."""
    owned = regions(proto, mapping)
    rows = []
    for node in graph.nodes:
        if node.name not in mapping:
            continue
        region = owned.get(node.name, [])
        layers = [o.name or f"<{o.op_type} #{o.index}>" for o in region]
        rows.append(MappedLayer(node.name, mapping[node.name], layers,
                                [o.op_type for o in region]))
    return rows


def _with_outputs(proto: onnx.ModelProto, keep: int, wanted: Sequence[str]) -> bytes:
    """The model cut after its first ``keep`` nodes, returning ``wanted``."""
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    if keep < len(proto.graph.node):
        del cut.graph.node[keep:]
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    return cut.SerializeToString()


def run_values(proto: onnx.ModelProto, inputs: Sequence[np.ndarray], wanted: Sequence[str],
               nbytes: int) -> tuple[dict[str, np.ndarray], str | None, str]:
    """``(values, stopped_at, error)``: the wanted values, from the longest prefix that runs.

    ``nbytes`` (what the wanted values will take) is charged to the tensor budget first.
    """
    from deployplug.runtimes.onnxruntime import make_session_from_bytes

    current().check_total(nbytes, "the per-layer comparison (onnxruntime values)")
    nodes = proto.graph.node
    made_at = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    known = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer}
    wanted = [w for w in dict.fromkeys(wanted) if w in made_at or w in known]
    results: dict[int, dict[str, np.ndarray]] = {}
    errors: dict[int, str] = {}

    def runs(keep: int) -> bool:
        names = [w for w in wanted if made_at.get(w, -1) < keep]
        if not names:
            results[keep] = {}
            return True
        try:
            session = make_session_from_bytes(_with_outputs(proto, keep, names),
                                              "model.onnx (per-layer outputs)")
            feed = dict(zip([i.name for i in session.get_inputs()], inputs, strict=True))
            got = session.run(names, feed)
        except Exception as exc:  # a file that cannot run as a whole is cut shorter
            errors[keep] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            return False
        results[keep] = {n: np.asarray(v) for n, v in zip(names, got, strict=True)}
        return True

    total = len(nodes)
    if runs(total):
        return results[total], None, ""
    keep = bisect_prefix(total, runs)
    if keep not in results:
        runs(keep)
    failing = nodes[keep] if keep < total else None
    stopped = (failing.name or f"<{failing.op_type} #{keep}>") if failing is not None else None
    error = errors.get(keep + 1) or errors.get(total, "")
    return results.get(keep, {}), stopped, error


def evaluate_mapping(proto: onnx.ModelProto, graph: Graph, inputs: Sequence[np.ndarray],
                     mapping: Mapping[str, str],
                     known: Mapping[str, np.ndarray] | None = None) -> ArtifactValues:
    """The mapped values (by node name); ``known`` values already computed are reused."""
    known = known or {}
    wanted = [v for v in mapping.values() if v not in known]
    got: dict[str, np.ndarray] = dict(known)
    stopped, error = None, ""
    if wanted:
        sizes = {n.name: n.shape for n in graph.nodes}
        nbytes = sum(4 * int(np.prod(sizes.get(k) or (1,), dtype=np.int64))
                     for k, v in mapping.items() if v in wanted)
        values, stopped, error = run_values(proto, inputs, wanted, nbytes)
        got.update(values)
    return ArtifactValues({k: got[v] for k, v in mapping.items() if v in got}, stopped, error)


def candidate_values(proto: onnx.ModelProto, graph: Graph) -> list[str]:
    """Outputs of every ONNX node that could hold a captured node's result (for mapping)."""
    scopes = {n.module_path for n in graph.nodes}
    return [out for o in onnx_nodes(proto)
            if o.op_type not in _NEVER and o.scope in scopes for out in o.outputs if out]


__all__ = ["OnnxNode", "SPLIT_OPS", "candidate_values", "evaluate_mapping", "map_values",
           "mapped_layers", "node_scope", "onnx_nodes", "regions", "run_values"]
