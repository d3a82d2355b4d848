"""Shared checks for decomposition rule tests: one rule, one node, PyTorch and onnxruntime.

Property tests build the normalized node straight from the ATen op's schema
(:func:`aten_node`, the same by-name binding ``capture`` does) because ``torch.export``
costs ~0.5 s per example; a few tests per rule still go through ``capture`` to pin the
real captured form. Each check lets the registry choose the rule for a profile that refuses
the op, builds the replacement and compares it with the original ATen op both in PyTorch
and after ``torch.onnx.export`` (TorchScript exporter, opset 17) in onnxruntime. Set
``DECOMPOSE_ERROR_LOG`` to a file path to record the measured errors.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from deployplug.capture import Graph, Node, Ref, Value, _op_name, capture
from deployplug.decompositions import choose_rule
from deployplug.profiles import TargetProfile
from deployplug.testing import normalized_error

TOL = 1e-5
_SESSION = ort.SessionOptions()
_SESSION.intra_op_num_threads = 1
_SESSION.inter_op_num_threads = 1
_SESSION.log_severity_level = 3


def refusing(*ops: str, name: str = "caffe", when=None) -> TargetProfile:
    """A profile named ``name`` that refuses ``ops`` (optionally only where ``when`` holds)."""

    def check(node: Node, graph: Graph) -> str | None:
        if when is None or when(node, graph):
            return f"test profile refuses {node.op}"
        return None

    return TargetProfile(name=name, format="caffe", description="test profile",
                         ops={op: check for op in ops}, accepts_everything=True)


def only_node(graph: Graph, op: str) -> Node:
    nodes = [n for n in graph if n.op == op]
    assert len(nodes) == 1, f"expected one {op} node, graph has ops {graph.ops()}"
    return nodes[0]


def onnx_run(module: nn.Module, inputs: Sequence[torch.Tensor]) -> np.ndarray:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), buf, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), _SESSION, providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)[0]


class A:
    """Marks activation input ``i`` among the arguments given to :func:`aten_node`."""

    def __init__(self, i: int = 0):
        self.i = i


def aten_node(overload, acts: Sequence[torch.Tensor], *args, **kwargs):
    """(node, graph, reference output) for one ATen op applied to activations ``acts``."""
    schema = overload._schema
    real = [acts[a.i] if isinstance(a, A) else a for a in args]
    with torch.no_grad():
        ref = overload(*real, **kwargs)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    bound, refs = {}, []
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
                  nodes=[node], outputs=[node.name])
    return node, graph, ref


def check_module(module: nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor, op: str,
                 rule: str, target: str = "caffe", tol: float = TOL) -> tuple[float, float]:
    """Like :func:`check_node`, for the node ``capture`` records from a one-op module."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    module = module.eval()
    with torch.no_grad():
        ref = module(*inputs)
    graph = capture(module, inputs)
    node = only_node(graph, op)
    by_name = {v.name: t for v, t in zip(graph.inputs, inputs)}
    return check_node(node, graph, [by_name[n] for n in node.inputs], ref, rule, target, tol)


def check_node(node: Node, graph: Graph, acts: Sequence[torch.Tensor], ref: torch.Tensor,
               rule: str, target: str = "caffe", tol: float = TOL,
               onnx: bool = True) -> tuple[float, float]:
    """Assert that ``rule`` is chosen for ``node`` and rewrites it exactly (PyTorch and ORT)."""
    chosen = choose_rule(node, graph, target)
    assert chosen is not None and chosen.name == rule, (
        f"expected rule {rule}, got {chosen and chosen.name}")
    replacement = chosen.build(node, graph).eval()
    with torch.no_grad():
        got = replacement(*acts)
    assert got.shape == ref.shape
    err_pt = normalized_error(got, ref)
    assert err_pt <= tol, f"{rule}: PyTorch normalized error {err_pt:.3g}"
    err_ort = float("nan")
    if onnx:
        err_ort = normalized_error(onnx_run(replacement, acts), ref)
        assert err_ort <= tol, f"{rule}: onnxruntime normalized error {err_ort:.3g}"
    _log(rule, err_pt, err_ort)
    return err_pt, err_ort


def _log(rule: str, err_pt: float, err_ort: float) -> None:
    path = os.environ.get("DECOMPOSE_ERROR_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"rule": rule, "pytorch": err_pt, "ort": err_ort}) + "\n")


def check_aten(rule: str, overload, acts: Sequence[torch.Tensor], *args,
               target: str = "caffe", tol: float = TOL, **kwargs) -> tuple[float, float]:
    """Build the node for ``overload(*args)`` and check that ``rule`` rewrites it exactly."""
    node, graph, ref = aten_node(overload, acts, *args, **kwargs)
    by_name = {v.name: t for v, t in zip(graph.inputs, acts)}
    return check_node(node, graph, [by_name[n] for n in node.inputs], ref, rule, target, tol)


def no_rule(overload, acts: Sequence[torch.Tensor], *args, target: str = "caffe",
            **kwargs) -> bool:
    """True when no rule accepts the node (it must then be reported, not rewritten)."""
    node, graph, _ = aten_node(overload, acts, *args, **kwargs)
    return choose_rule(node, graph, target) is None


def _spatial_pad_asymmetric(node: Node, graph: Graph) -> str | None:
    p = list(node.args.get("pad") or [])
    if any(p[4:]):
        return "padding along channels/batch"
    p = (p + [0, 0, 0, 0])[:4]
    if p[0] != p[1] or p[2] != p[3] or min(p) < 0:
        return "asymmetric pad"
    return None


def _resize_needs_factor(node: Node, graph: Graph) -> str | None:
    scales = node.args.get("scale_factors")
    if scales is not None and all(float(s).is_integer() for s in scales):
        return None
    return "resize without an integer scale factor"


def _pool_over(limit: int):
    def check(node: Node, graph: Graph) -> str | None:
        return f"pooling window over {limit}" if max(node.args["kernel_size"]) > limit else None

    return check


def _gap_over(limit: int):
    def check(node: Node, graph: Graph) -> str | None:
        if tuple(node.shape[2:]) != (1, 1):
            return "adaptive pooling to a size other than 1"
        if limit and max(graph.shape_of(node.inputs[0])[2:]) > limit:
            return f"global pooling over a map larger than {limit}"
        return None

    return check


def _refuse(reason: str):
    return lambda node, graph: reason


def _convt(node: Node, graph: Graph) -> str | None:
    return "output_padding" if any(node.args["output_padding"]) else None


def _bn(node: Node, graph: Graph) -> str | None:
    return None if len(graph.shape_of(node.inputs[0])) == 4 else "BatchNorm on a non-4-D map"


def caffe_like(name: str = "caffe", om: bool = False) -> TargetProfile:
    """A whitelist profile following the agreed Caffe/om split (used until the real ones land)."""
    ok = lambda node, graph: None  # noqa: E731
    ops = {op: ok for op in (
        "conv2d", "relu", "sigmoid", "tanh", "exp", "pow", "add", "sub", "mul", "div", "rsub",
        "cat", "slice", "view", "reshape", "permute", "unsqueeze", "squeeze", "flatten",
        "select", "stack", "linear", "addmm", "softmax", "relu6", "hardtanh", "clamp",
        "hardswish", "hardsigmoid", "silu", "t", "amax", "_unsafe_view")}
    ops.update({
        "conv_transpose2d": _convt, "batch_norm": _bn, "pad": _spatial_pad_asymmetric,
        "upsample_nearest2d": _resize_needs_factor, "upsample_bilinear2d": _resize_needs_factor,
        "max_pool2d": _pool_over(32 if om else 10**9),
        "avg_pool2d": _pool_over(32 if om else 10**9),
        "adaptive_avg_pool2d": _gap_over(32 if om else 0),
    })
    if om:
        ops.update({"mean": _refuse("no reductions over H, W"),
                    "sum": _refuse("no reductions over H, W")})
    else:
        ops.update({"mean": ok, "sum": ok})
    return TargetProfile(name=name, format="caffe", description="test profile", ops=ops)
