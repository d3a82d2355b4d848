"""The ``caffe`` and ``om`` targets: BVLC Caffe layers (checked in OpenCV 4.x), and Huawei
Ascend's Caffe converter, which accepts the same layers under tighter limits.

``caffe`` accepts exactly the ops of :data:`.caffe_checks.CHECKS`, which are the ops the
Caffe writer lowers exactly. Not accepted, and left to the decomposition rules: 3-D
convolutions, instance/layer/group norm, transposed convolutions with output_padding,
upsampling by non-integer factors, bilinear with align_corners=True, gelu, mish, erf,
log_softmax, permute/transpose, broadcasting add/sub, adaptive average pooling to sizes that
do not divide the input, avg pooling excluding padding, pooling with dilation. (Nodes that
read only constants, e.g. ``w.flip(1)`` on a parameter, are folded at capture time and never
reach a target; see :func:`deployplug.capture.fold_constants`.)

``om`` = ``caffe`` under :data:`OM_LIMITS`: pooling windows <= 32 (a global pooling counts
with its input map), symmetric H/W padding only, no mean/sum over non-channel axes.
:func:`caffe_family` builds the same kind of target for other limits.
"""

from __future__ import annotations

from deployplug.capture import Graph, Node
from deployplug.ops.attrs import adaptive_sizes, pool_attrs, reduce_dims
from deployplug.profiles.base import Limits, NodeCheck, TargetProfile
from deployplug.profiles.caffe_checks import CHECKS, caffe_pads

CAFFE_LIMITS = Limits(broadcast="channel_product")
OM_LIMITS = Limits(max_pool_window=32, symmetric_pad=True, spatial_reductions=False,
                   broadcast="channel_product")

HINTS = {
    "conv_transpose2d": "set output_padding=0, or let deployplug.decompositions rewrite it",
    "add": "Caffe Eltwise cannot broadcast; make both operands the same shape",
    "sub": "Caffe Eltwise cannot broadcast; make both operands the same shape",
    "upsample_nearest2d": "use integer scale factors, or let deployplug.decompositions rewrite it",
    "upsample_bilinear2d": "use integer scale factors with align_corners=False",
}
DEFAULT_HINT = "rewrite it with deployplug.decompositions, or change the model"

POOL_OPS = ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d")


def pool_window(node: Node, graph: Graph) -> tuple[int, int]:
    """The (H, W) window a pooling reads; adaptive pooling with equal bins included."""
    if node.op in ("max_pool2d", "avg_pool2d"):
        kernel = pool_attrs(node).kernel
        return kernel[0], kernel[1]
    src, out = adaptive_sizes(node, graph)
    return src[0] // max(out[0], 1), src[1] // max(out[1], 1)


def _window_check(limit: int, name: str) -> NodeCheck:
    def check(node: Node, graph: Graph) -> str | None:
        k = pool_window(node, graph)
        if max(k) > limit:
            return f"{name} pools with windows <= {limit}; this one is {k[0]}x{k[1]}"
        return None

    return check


def _reduce_check(name: str) -> NodeCheck:
    def check(node: Node, graph: Graph) -> str | None:
        dims, _ = reduce_dims(node, graph)
        if dims != [1]:
            return f"{name} has no {node.op} over non-channel axes {dims}"
        return None

    return check


def _symmetric_pad_check(name: str) -> NodeCheck:
    def check(node: Node, graph: Graph) -> str | None:
        pads = caffe_pads(node, graph)
        if isinstance(pads, str):
            return pads
        left, right, top, bottom = pads[0]
        if left != right or top != bottom or min(pads[0]) < 0:
            return f"{name} pads symmetrically in H and W only (got {list(pads[0])})"
        return None

    return check


def _both(first: NodeCheck, then: NodeCheck) -> NodeCheck:
    def check(node: Node, graph: Graph) -> str | None:
        reason = first(node, graph)
        return reason if reason is not None else then(node, graph)

    return check


def caffe_family(name: str, description: str, limits: Limits) -> TargetProfile:
    """A Caffe-file target: the BVLC checks plus whatever ``limits`` forbids."""
    ops: dict[str, NodeCheck] = dict(CHECKS)
    extra: dict[str, NodeCheck] = {}
    if limits.max_pool_window is not None:
        extra.update(dict.fromkeys(POOL_OPS, _window_check(limits.max_pool_window, name)))
    if not limits.spatial_reductions:
        extra.update(dict.fromkeys(("mean", "sum"), _reduce_check(name)))
    if limits.symmetric_pad:
        extra.update(dict.fromkeys(("pad", "constant_pad_nd"), _symmetric_pad_check(name)))
    for op, check in extra.items():
        ops[op] = _both(ops[op], check)
    return TargetProfile(name=name, format="caffe", description=description, ops=ops,
                         limits=limits, hints=HINTS, default_hint=DEFAULT_HINT)


CAFFE = caffe_family(
    "caffe", "BVLC Caffe prototxt + caffemodel (verified in OpenCV 4.x's Caffe importer)",
    CAFFE_LIMITS)
OM = caffe_family(
    "om", "Caffe files for Huawei Ascend's converter (ATC): BVLC layers + Upsample, "
    "pooling windows <= 32, symmetric padding, no spatial reductions", OM_LIMITS)
