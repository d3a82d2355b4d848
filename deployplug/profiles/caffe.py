"""The ``caffe`` and ``om`` targets: BVLC Caffe layers (checked in OpenCV 4.x), and Huawei
Ascend's Caffe converter, which accepts the same layers under tighter limits.

``caffe`` accepts exactly the ops the Caffe lowering expresses exactly, with the lowering's own
attribute checks (so profile and lowering cannot disagree). Not accepted, and left to the
decomposition rules: 3-D convolutions, instance/layer/group norm, transposed convolutions with
output_padding, upsampling by non-integer factors, bilinear with align_corners=True, gelu,
mish, erf, log_softmax, permute/transpose, broadcasting add/sub, adaptive average pooling to
sizes that do not divide the input, avg pooling excluding padding, pooling with dilation.
(Nodes that read only constants, e.g. ``w.flip(1)`` on a parameter, are folded at capture
time and never reach the profile; see :func:`deployplug.capture.fold_constants`.)

``om`` = ``caffe`` plus: upsampling by integer factors only, pooling windows <= 32 (a global
pooling counts with its input map), symmetric H/W padding only, no mean/sum over non-channel
axes, no padding along channels.
"""

from __future__ import annotations

from functools import partial

from deployplug.capture import Graph, Node
from deployplug.exporters.caffe import lower
from deployplug.exporters.caffe.blocks import pair
from deployplug.exporters.caffe.layers_pool import reduce_dims
from deployplug.exporters.caffe.layers_shape import pad_amounts
from deployplug.profiles import TargetProfile, register_target

MAX_POOL_WINDOW = 32


def _lowerable(dialect: str, node: Node, graph: Graph) -> str | None:
    return lower.refusal(node, graph, dialect)


def _window_check(node: Node, graph: Graph) -> str | None:
    shape = graph.shape_of(node.inputs[0])
    if node.op in ("max_pool2d", "avg_pool2d"):
        k = pair(node.args["kernel_size"])
    else:  # adaptive pooling (global included): window = input / output
        out = pair(node.args["output_size"])
        k = (shape[2] // max(out[0], 1), shape[3] // max(out[1], 1))
    if max(k) > MAX_POOL_WINDOW:
        return f"om pools with windows <= {MAX_POOL_WINDOW}; this one is {k[0]}x{k[1]}"
    return None


def _reduce_check(node: Node, graph: Graph) -> str | None:
    dims, _ = reduce_dims(node, graph)
    if dims != [1]:
        return f"om has no {node.op} over non-channel axes {dims}"
    return None


def _pad_check(node: Node, graph: Graph) -> str | None:
    pads = pad_amounts(node, graph)
    if isinstance(pads, str):
        return pads
    left, right, top, bottom = pads[0]
    if left != right or top != bottom or min(pads[0]) < 0:
        return f"om pads symmetrically in H and W only (got {pads[0]})"
    return None


def _om_op(extra, node: Node, graph: Graph) -> str | None:
    reason = lower.refusal(node, graph, "om")
    return reason if reason is not None else extra(node, graph)


_OM_EXTRA = {
    "max_pool2d": _window_check,
    "avg_pool2d": _window_check,
    "adaptive_avg_pool2d": _window_check,
    "_adaptive_avg_pool2d": _window_check,
    "mean": _reduce_check,
    "sum": _reduce_check,
    "pad": _pad_check,
    "constant_pad_nd": _pad_check,
}

CAFFE = register_target(TargetProfile(
    name="caffe",
    format="caffe",
    description="BVLC Caffe prototxt + caffemodel (verified in OpenCV 4.x's Caffe importer)",
    ops={op: partial(_lowerable, "bvlc") for op in sorted(lower.supported_ops())},
))

OM = register_target(TargetProfile(
    name="om",
    format="caffe",
    description="Caffe files for Huawei Ascend's converter (ATC): BVLC layers + Upsample, "
    "pooling windows <= 32, symmetric padding, no spatial reductions",
    ops={op: (partial(_om_op, _OM_EXTRA[op]) if op in _OM_EXTRA else partial(_lowerable, "om"))
         for op in sorted(lower.supported_ops())},
))
