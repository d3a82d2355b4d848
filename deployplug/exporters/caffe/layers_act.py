"""Caffe lowering of activations, including the ones BVLC Caffe has no layer for.

Separate because its compositions are the subtle part: clamp(lo, hi) (relu6, hardtanh)
is hi - ReLU((hi - lo) - ReLU(x - lo)) with Power for the affine parts, so no Eltwise is
needed; hardsigmoid = clamp(x/6 + 1/2, 0, 1); hardswish = x * hardsigmoid(x)
(Eltwise PROD); silu = x * Sigmoid(x).
"""

from __future__ import annotations

from deployplug.capture import Node
from deployplug.exporters.caffe.blocks import first, power, relu, to_np
from deployplug.exporters.caffe.net import LowerCtx, rule
from deployplug.ops.attrs import in_shape, norm_dim
from deployplug.profiles.caffe_checks import clamp_bounds


@rule("relu")
def _emit_relu(ctx: LowerCtx, node: Node) -> None:
    relu(ctx, node, ctx.blob(first(node)), final=True)


@rule("leaky_relu")
def _emit_leaky(ctx: LowerCtx, node: Node) -> None:
    slope = float(node.args.get("negative_slope", 0.01))
    ctx.step(node, "ReLU", [ctx.blob(first(node))], {"relu_param": {"negative_slope": slope}},
             final=True)


@rule("prelu")
def _emit_prelu(ctx: LowerCtx, node: Node) -> None:
    w = node.args["weight"].reshape(-1)
    params = {"prelu_param": {"channel_shared": True}} if w.numel() == 1 else {}
    ctx.step(node, "PReLU", [ctx.blob(first(node))], params, [to_np(w)], final=True)


@rule("sigmoid")
def _emit_sigmoid(ctx: LowerCtx, node: Node) -> None:
    ctx.step(node, "Sigmoid", [ctx.blob(first(node))], final=True)


@rule("tanh")
def _emit_tanh(ctx: LowerCtx, node: Node) -> None:
    ctx.step(node, "TanH", [ctx.blob(first(node))], final=True)


@rule("exp")
def _emit_exp(ctx: LowerCtx, node: Node) -> None:
    ctx.step(node, "Exp", [ctx.blob(first(node))], final=True)


@rule("abs")
def _emit_abs(ctx: LowerCtx, node: Node) -> None:
    ctx.step(node, "AbsVal", [ctx.blob(first(node))], final=True)


@rule("elu")
def _emit_elu(ctx: LowerCtx, node: Node) -> None:
    ctx.step(node, "ELU", [ctx.blob(first(node))],
             {"elu_param": {"alpha": float(node.args.get("alpha", 1.0))}}, final=True)


def _clamp(ctx: LowerCtx, node: Node, x: str, lo: float | None, hi: float | None,
           final: bool) -> str:
    """min(max(x, lo), hi) from ReLU and Power only (BVLC has neither Clip in OpenCV nor ReLU6)."""
    if lo is None and hi is None:
        if final:
            ctx.alias(node, x)
        return x
    if hi is None:
        assert lo is not None  # both None returned above
        if lo == 0:
            return relu(ctx, node, x, final)
        r = relu(ctx, node, power(ctx, node, x, shift=-lo))
        return power(ctx, node, r, shift=lo, final=final)
    if lo is None:
        r = relu(ctx, node, power(ctx, node, x, scale=-1.0, shift=hi))
        return power(ctx, node, r, scale=-1.0, shift=hi, final=final)
    r = relu(ctx, node, x if lo == 0 else power(ctx, node, x, shift=-lo))  # max(x - lo, 0)
    t = relu(ctx, node, power(ctx, node, r, scale=-1.0, shift=hi - lo))  # max(hi-lo-r, 0)
    return power(ctx, node, t, scale=-1.0, shift=hi, final=final)  # hi - t


@rule("relu6", "hardtanh", "clamp", "clamp_min", "clamp_max")
def _emit_clamp(ctx: LowerCtx, node: Node) -> None:
    lo, hi = clamp_bounds(node)
    _clamp(ctx, node, ctx.blob(first(node)), lo, hi, final=True)


def _hardsigmoid(ctx: LowerCtx, node: Node, x: str, final: bool) -> str:
    return _clamp(ctx, node, power(ctx, node, x, scale=1.0 / 6.0, shift=0.5), 0.0, 1.0, final)


@rule("hardsigmoid")
def _emit_hardsigmoid(ctx: LowerCtx, node: Node) -> None:
    _hardsigmoid(ctx, node, ctx.blob(first(node)), final=True)


@rule("hardswish")
def _emit_hardswish(ctx: LowerCtx, node: Node) -> None:
    x = ctx.blob(first(node))
    gate = _hardsigmoid(ctx, node, x, final=False)
    ctx.step(node, "Eltwise", [x, gate], {"eltwise_param": {"operation": "PROD"}}, final=True)


@rule("silu")
def _emit_silu(ctx: LowerCtx, node: Node) -> None:
    x = ctx.blob(first(node))
    gate = ctx.step(node, "Sigmoid", [x])
    ctx.step(node, "Eltwise", [x, gate], {"eltwise_param": {"operation": "PROD"}}, final=True)


@rule("softmax", "_softmax")
def _emit_softmax(ctx: LowerCtx, node: Node) -> None:
    rank = len(in_shape(node, ctx.graph))
    axis = norm_dim(int(node.args["dim"]), rank)
    ctx.step(node, "Softmax", [ctx.blob(first(node))], {"softmax_param": {"axis": axis}},
             final=True)
