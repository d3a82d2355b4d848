"""Shared checks for decomposition rule tests: one rule, one node, PyTorch and onnxruntime.

Property tests build the normalized node straight from the ATen op's schema
(:func:`deployplug.decompositions.examples.aten_node`, the same by-name binding ``capture``
does) because ``torch.export``
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

from deployplug.capture import Graph, Node, capture
from deployplug.decompositions import choose_rule
from deployplug.decompositions.examples import A, aten_node
from deployplug.profiles import TargetProfile, get_target
from deployplug.testing import normalized_error

__all__ = ["A", "aten_node", "caffe_error", "check_aten", "check_module", "check_node",
           "no_rule", "onnx_run", "only_node", "refusing"]

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


def check_module(module: nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor, op: str,
                 rule: str, target: str | TargetProfile = "caffe",
                 tol: float = TOL) -> tuple[float, float]:
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
               rule: str, target: str | TargetProfile = "caffe", tol: float = TOL,
               onnx: bool = True) -> tuple[float, float]:
    """Assert that ``rule`` is chosen for ``node`` and rewrites it exactly (PyTorch and ORT)."""
    chosen = choose_rule(node, graph, target)
    assert chosen is not None and chosen.name == rule, (
        f"expected rule {rule}, got {chosen and chosen.name}")
    replacement = chosen.build(node, graph, get_target(target)).eval()
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
               target: str | TargetProfile = "caffe", tol: float = TOL,
               **kwargs) -> tuple[float, float]:
    """Build the node for ``overload(*args)`` and check that ``rule`` rewrites it exactly."""
    node, graph, ref = aten_node(overload, acts, *args, **kwargs)
    by_name = {v.name: t for v, t in zip(graph.inputs, acts)}
    return check_node(node, graph, [by_name[n] for n in node.inputs], ref, rule, target, tol)


def no_rule(overload, acts: Sequence[torch.Tensor], *args,
            target: str | TargetProfile = "caffe", **kwargs) -> bool:
    """True when no rule accepts the node (it must then be reported, not rewritten)."""
    node, graph, _ = aten_node(overload, acts, *args, **kwargs)
    return choose_rule(node, graph, target) is None


def caffe_error(overload, acts: Sequence[torch.Tensor], *args, target: str = "caffe",
                **kwargs) -> float:
    """Normalized error of the Caffe writer's own lowering of one ATen op, run in OpenCV.

    For ops no rule rewrites because the writer composes them itself: the target must accept
    the node, and the layers it becomes must reproduce PyTorch. Runs from memory (no files).
    """
    import cv2

    from deployplug.exporters.caffe import lower as caffe_lower
    from deployplug.exporters.caffe import writer as caffe_writer

    node, graph, ref = aten_node(overload, acts, *args, **kwargs)
    reason = get_target(target).refusal(node, graph)
    assert reason is None, reason
    net = caffe_lower.lower(graph, "om" if target == "om" else "bvlc", target)
    text = caffe_writer.prototxt_text(net).encode()
    weights = caffe_writer.caffemodel_bytes(net)
    cv_net = cv2.dnn.readNetFromCaffe(np.frombuffer(text, np.uint8),
                                      np.frombuffer(weights, np.uint8))
    for value, x in zip(graph.inputs, acts):
        cv_net.setInput(x.numpy(), value.name)
    got = cv_net.forward(net.outputs[0])
    return normalized_error(got.reshape(ref.shape), ref)
