"""Caffe lowering of nearest and bilinear upsampling by integer factors.

Separate because BVLC Caffe has no resize layer and both are built from a depthwise
Deconvolution: nearest = kernel = stride = factor with weights 1 (or the ``Upsample`` layer
in the ``om`` dialect); bilinear (align_corners=False) = edge rows/columns repeated with
Slice + Concat, then a separable tent kernel (see :func:`bilinear_taps`). The OpenCV runtime
reuses :func:`.net.nearest_deconv_param` for om's Upsample.
"""

from __future__ import annotations

import numpy as np

from deployplug.capture import Node
from deployplug.exporters.caffe.blocks import first, hw
from deployplug.exporters.caffe.net import LowerCtx, nearest_deconv_param, rule
from deployplug.ops.attrs import in_shape
from deployplug.profiles.caffe_checks import integer_factors


@rule("upsample_nearest2d", "_upsample_nearest_exact2d")
def _emit_nearest(ctx: LowerCtx, node: Node) -> None:
    fh, fw = integer_factors(node, ctx.graph)
    c = in_shape(node, ctx.graph)[1]
    x = ctx.blob(first(node))
    if ctx.dialect == "om":
        ctx.step(node, "Upsample", [x], {"upsample_param": {
            "scale": 1.0, "stride_h": fh, "stride_w": fw}}, final=True)
        ctx.extras.setdefault("upsample_channels", {})[node.name] = c
        return
    ctx.step(node, "Deconvolution", [x], {"convolution_param": nearest_deconv_param(c, fh, fw)},
             [np.ones((c, 1, fh, fw), np.float32)], final=True)


def _repeat_edges(ctx: LowerCtx, node: Node, x: str, axis: int, size: int) -> str:
    """Concat(first, x, last) along ``axis``: the border PyTorch's bilinear clamps to."""
    if size == 1:
        parts = [x, x, x]
    else:
        head = ctx.fresh(node.name)
        ctx.add(head, "Slice", [x], [head, ctx.fresh(node.name)],
                {"slice_param": {"axis": axis, "slice_point": [1]}}, node=node.name)
        tail = ctx.fresh(node.name)
        ctx.add(tail, "Slice", [x], [ctx.fresh(node.name), tail],
                {"slice_param": {"axis": axis, "slice_point": [size - 1]}}, node=node.name)
        parts = [head, x, tail]
    return ctx.step(node, "Concat", parts, {"concat_param": {"axis": axis}})


def bilinear_taps(f: int) -> tuple[np.ndarray, int]:
    """1-D Deconvolution kernel and pad reproducing align_corners=False bilinear by ``f``.

    On an input whose edges are repeated once, output ``o`` of a stride-``f`` Deconvolution
    is sum_i x'[i] w[o + pad - f*i]; with w[k] = max(0, 1 - |k - c|/f) that is exactly
    PyTorch's interpolation at source (o + 1/2)/f - 1/2 when c = pad - 1/2 - f/2 is the
    kernel's centre: kernel 2f and pad 3f/2 for even f, kernel 2f+1 and pad (3f+1)/2 for odd.
    """
    size = 2 * f + (f % 2)
    pad = (3 * f + (f % 2)) // 2
    centre = pad - 0.5 - f / 2
    k = np.arange(size, dtype=np.float64)
    return np.maximum(0.0, 1.0 - np.abs(k - centre) / f).astype(np.float32), pad


@rule("upsample_bilinear2d")
def _emit_bilinear(ctx: LowerCtx, node: Node) -> None:
    shape = in_shape(node, ctx.graph)
    c = shape[1]
    fh, fw = integer_factors(node, ctx.graph)
    x = _repeat_edges(ctx, node, ctx.blob(first(node)), 2, shape[2])
    x = _repeat_edges(ctx, node, x, 3, shape[3])
    (th, ph), (tw, pw) = bilinear_taps(fh), bilinear_taps(fw)
    w = np.broadcast_to(np.outer(th, tw), (c, 1, th.size, tw.size)).copy()
    ctx.step(node, "Deconvolution", [x], {"convolution_param": {
        "num_output": c, "bias_term": False, "group": c,
        **hw("kernel", (th.size, tw.size), "kernel_size"), **hw("stride", (fh, fw), "stride"),
        **hw("pad", (ph, pw), "pad")}}, [w], final=True)
