"""Caffe lowering of pooling and of the reductions that are pooling in disguise.

Separate because Caffe sizes pooled outputs differently from PyTorch (ceil, minus a window
starting in the padding; see :func:`deployplug.ops.sizes.caffe_pool_out`): floor-mode pooling
is Caffe's pooling plus Slice layers dropping the extra row/column. Adaptive pooling is
exact only when the output divides the input; mean/sum over (H, W) is global pooling, over
channels a 1x1 Convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deployplug.capture import Node
from deployplug.exporters.caffe.blocks import first, hw, power, reshape_to, slice_axis
from deployplug.exporters.caffe.net import LowerCtx, rule
from deployplug.ops.attrs import adaptive_sizes, in_shape, pool_attrs, reduce_dims
from deployplug.ops.sizes import caffe_pool_out


def _pool(ctx: LowerCtx, node: Node, method: str, k: Sequence[int], s: Sequence[int],
          p: Sequence[int]) -> None:
    shape = in_shape(node, ctx.graph)
    params = {"pool": method, **hw("kernel", k, "kernel_size"), **hw("stride", s, "stride", 1),
              **hw("pad", p, "pad", 0)}
    got = [caffe_pool_out(shape[2 + i], k[i], s[i], p[i]) for i in range(2)]
    want = list((node.shape or ())[2:])
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


@rule("max_pool2d", "avg_pool2d")
def _emit_pool(ctx: LowerCtx, node: Node) -> None:
    pa = pool_attrs(node)
    k, s, p = pa.kernel, pa.stride, pa.padding
    _pool(ctx, node, "MAX" if node.op == "max_pool2d" else "AVE", k, s, p)


def _global(ctx: LowerCtx, node: Node, method: str, final: bool) -> str:
    return ctx.step(node, "Pooling", [ctx.blob(first(node))],
                    {"pooling_param": {"pool": method, "global_pooling": True}}, final=final)


@rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _emit_adaptive(ctx: LowerCtx, node: Node) -> None:
    src, out = adaptive_sizes(node, ctx.graph)
    if tuple(out) == (1, 1):
        _global(ctx, node, "AVE", final=True)
        return
    k = (src[0] // out[0], src[1] // out[1])
    _pool(ctx, node, "AVE", k, k, (0, 0))


@rule("mean", "sum")
def _emit_reduce(ctx: LowerCtx, node: Node) -> None:
    dims, _ = reduce_dims(node, ctx.graph)
    shape = in_shape(node, ctx.graph)
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
