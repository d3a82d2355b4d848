"""Caffe lowering of pooling and of the reductions that are pooling in disguise.

Separate because Caffe sizes pooled outputs differently from PyTorch (ceil, minus a window
starting in the padding; see :func:`caffe_pool_size`): floor-mode pooling is Caffe's pooling
plus Slice layers dropping the extra row/column. Adaptive pooling is exact only when the
output divides the input; mean/sum over (H, W) is global pooling, over channels a 1x1
Convolution.
"""

from __future__ import annotations

import math

import numpy as np

from deployplug.capture import Graph, Node
from deployplug.exporters.caffe.blocks import (
    first,
    hw,
    in_shape,
    norm_dim,
    pair,
    power,
    reshape_to,
    slice_axis,
)
from deployplug.exporters.caffe.net import LowerCtx, rule


def caffe_pool_size(size: int, k: int, s: int, p: int) -> int:
    """Caffe's (and OpenCV's) pooled size: ceil, minus a last window starting in the padding."""
    out = int(math.ceil((size + 2 * p - k) / s)) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_geometry(node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    k = pair(node.args["kernel_size"])
    stride = node.args.get("stride") or k
    return k, pair(stride), pair(node.args.get("padding", 0))


def _check_pool(node: Node, graph: Graph, dialect: str) -> str | None:
    shape = in_shape(graph, node)
    if len(shape) != 4:
        return f"Caffe pools 4-D blobs only (got rank {len(shape)})"
    k, s, p = _pool_geometry(node)
    if pair(node.args.get("dilation", 1)) != (1, 1):
        return "Caffe pooling has no dilation"
    if node.op == "avg_pool2d":
        if node.args.get("divisor_override") is not None:
            return "avg_pool2d divisor_override has no Caffe equivalent"
        if any(p) and not node.args.get("count_include_pad", True):
            return ("Caffe AVE pooling counts the padding; count_include_pad=False with "
                    "padding differs at the borders")
    for i in range(2):
        want = node.shape[2 + i]
        got = caffe_pool_size(shape[2 + i], k[i], s[i], p[i])
        if got not in (want, want + 1):
            return f"pooled size {got} in Caffe vs {want} in PyTorch cannot be reconciled"
    return None


def _pool(ctx: LowerCtx, node: Node, method: str, k: tuple[int, int], s: tuple[int, int],
          p: tuple[int, int]) -> None:
    shape = in_shape(ctx.graph, node)
    params = {"pool": method, **hw("kernel", k, "kernel_size"), **hw("stride", s, "stride", 1),
              **hw("pad", p, "pad", 0)}
    got = [caffe_pool_size(shape[2 + i], k[i], s[i], p[i]) for i in range(2)]
    want = list(node.shape[2:])
    if got == want:
        ctx.step(node, "Pooling", [ctx.blob(first(node))], {"pooling_param": params}, final=True)
        return
    # PyTorch floor mode: Caffe made one extra window; slice it off (portable to every reader)
    x = ctx.step(node, "Pooling", [ctx.blob(first(node))], {"pooling_param": params})
    crop_h, crop_w = got[0] != want[0], got[1] != want[1]
    if crop_h:
        x = slice_axis(ctx, node, x, 2, 0, want[0], got[0], final=not crop_w)
    if crop_w:
        slice_axis(ctx, node, x, 3, 0, want[1], got[1], final=True)


@rule("max_pool2d", "avg_pool2d", check=_check_pool)
def _emit_pool(ctx: LowerCtx, node: Node) -> None:
    k, s, p = _pool_geometry(node)
    _pool(ctx, node, "MAX" if node.op == "max_pool2d" else "AVE", k, s, p)


def _global(ctx: LowerCtx, node: Node, method: str, final: bool) -> str:
    return ctx.step(node, "Pooling", [ctx.blob(first(node))],
                    {"pooling_param": {"pool": method, "global_pooling": True}}, final=final)


def _check_adaptive(node: Node, graph: Graph, dialect: str) -> str | None:
    shape = in_shape(graph, node)
    if len(shape) != 4:
        return "adaptive pooling of a non 4-D tensor"
    out = pair(node.args["output_size"])
    if any(o == 0 or shape[2 + i] % o for i, o in enumerate(out)):
        return (f"adaptive pooling {list(shape[2:])} -> {list(out)} is not a fixed window; only "
                "output sizes dividing the input are exact in Caffe")
    return None


@rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d", check=_check_adaptive)
def _emit_adaptive(ctx: LowerCtx, node: Node) -> None:
    shape = in_shape(ctx.graph, node)
    out = pair(node.args["output_size"])
    if out == (1, 1):
        _global(ctx, node, "AVE", final=True)
        return
    k = (shape[2] // out[0], shape[3] // out[1])
    _pool(ctx, node, "AVE", k, k, (0, 0))


def reduce_dims(node: Node, graph: Graph) -> tuple[list[int], int]:
    rank = len(in_shape(graph, node))
    dims = node.args.get("dim")
    dims = list(range(rank)) if dims in (None, []) else list(dims)
    return sorted(norm_dim(int(d), rank) for d in dims), rank


def _check_reduce(node: Node, graph: Graph, dialect: str) -> str | None:
    if node.args.get("dtype") is not None:
        return "reduction with a dtype change"
    dims, rank = reduce_dims(node, graph)
    if rank == 4 and dims in ([2, 3], [1]):
        return None
    return f"{node.op} over dims {dims} of a rank-{rank} tensor (Caffe: (2,3) or channel only)"


@rule("mean", "sum", check=_check_reduce)
def _emit_reduce(ctx: LowerCtx, node: Node) -> None:
    dims, _ = reduce_dims(node, ctx.graph)
    shape = in_shape(ctx.graph, node)
    keep = bool(node.args.get("keepdim", False))
    if dims == [2, 3]:
        x = _global(ctx, node, "AVE", final=keep and node.op == "mean")
        if node.op == "sum":
            x = power(ctx, node, x, scale=float(shape[2] * shape[3]), final=keep)
        if not keep:
            ctx.step(node, "Flatten", [x], final=True)
        return
    c = shape[1]  # channel reduction as a 1x1 convolution with constant weights
    w = np.full((1, c, 1, 1), 1.0 / c if node.op == "mean" else 1.0, np.float32)
    x = ctx.step(node, "Convolution", [ctx.blob(first(node))],
                 {"convolution_param": {"num_output": 1, "bias_term": False, "kernel_size": 1}},
                 [w], final=keep)
    if not keep:
        reshape_to(ctx, node, x, shape[:1] + shape[2:], shape)
