"""Caffe lowering of element-wise arithmetic: Eltwise, Scale and Power.

Separate because Caffe's broadcasting rules decide the layer: two same-shape tensors use
Eltwise; a per-channel (N,C,1,1) factor uses a two-bottom Scale; a scalar constant becomes
Power; a per-channel constant becomes a one-bottom Scale with the constant as its blobs.
Anything else is refused here rather than broadcast wrongly.
"""

from __future__ import annotations

from typing import Any

import torch

from deployplug.capture import Node, Ref
from deployplug.exporters.caffe.blocks import first, power, to_np
from deployplug.exporters.caffe.net import LowerCtx, rule
from deployplug.ops.attrs import scalar, scalar_arg, varying_axis
from deployplug.profiles.caffe_checks import operands, prefix_broadcast


def _const_rhs(ctx: LowerCtx, node: Node, x: str, const: Any, const_first: bool) -> None:
    op, alpha = node.op, float(node.args.get("alpha", 1))
    s = scalar(const)
    if s is not None:
        if op == "add":  # self + alpha * other
            if const_first:
                power(ctx, node, x, scale=alpha, shift=s, final=True)
            else:
                power(ctx, node, x, shift=alpha * s, final=True)
        elif op == "sub":  # self - alpha * other
            if const_first:
                power(ctx, node, x, scale=-alpha, shift=s, final=True)
            else:
                power(ctx, node, x, shift=-alpha * s, final=True)
        elif op == "mul":
            power(ctx, node, x, scale=s, final=True)
        elif const_first:  # s / x
            inv = power(ctx, node, x, power=-1.0)
            power(ctx, node, inv, scale=s, final=True)
        else:
            power(ctx, node, x, scale=1.0 / s, final=True)
        return
    axis = varying_axis(const.shape, tuple(node.shape or ()))
    vec = const.reshape(-1).to(torch.float32)
    ones = torch.ones_like(vec)
    gamma, beta = ones, None
    if op == "add":
        gamma, beta = (alpha * ones, vec) if const_first else (ones, alpha * vec)
    elif op == "sub":
        gamma, beta = (-alpha * ones, vec) if const_first else (ones, -alpha * vec)
    elif op == "mul":
        gamma = vec
    elif const_first:  # c / x
        x = power(ctx, node, x, power=-1.0)
        gamma = vec
    else:
        gamma = 1.0 / vec
    params: dict[str, Any] = {"axis": axis} if axis != 1 else {}
    if beta is not None:
        params["bias_term"] = True
    blobs = [to_np(gamma)] + ([to_np(beta)] if beta is not None else [])
    ctx.step(node, "Scale", [x], {"scale_param": params}, blobs, final=True)


@rule("add", "sub", "mul", "div")
def _emit_binary(ctx: LowerCtx, node: Node) -> None:
    a, b = operands(node)
    op = node.op
    if isinstance(a, Ref) and isinstance(b, Ref):
        sa, sb = ctx.graph.shape_of(a.name), ctx.graph.shape_of(b.name)
        xa, xb = ctx.blob(a), ctx.blob(b)
        if op == "div":
            xb = power(ctx, node, xb, power=-1.0)
        if sa != sb:  # per-channel product: flatten the small one, two-bottom Scale at axis 0
            big, small, shape = (xa, xb, sb) if sa == node.out_shape else (xb, xa, sa)
            k = prefix_broadcast(shape, node.out_shape)
            flat = ctx.step(node, "Reshape", [small],
                            {"reshape_param": {"shape": {"dim": list(shape[:k])}}})
            ctx.step(node, "Scale", [big, flat], {"scale_param": {"axis": 0}}, final=True)
            return
        if op in ("mul", "div"):
            ctx.step(node, "Eltwise", [xa, xb], {"eltwise_param": {"operation": "PROD"}},
                     final=True)
            return
        alpha = float(node.args.get("alpha", 1))
        coeff = [1.0, alpha if op == "add" else -alpha]
        params: dict[str, Any] = {"operation": "SUM"}
        if coeff != [1.0, 1.0]:
            params["coeff"] = coeff
        ctx.step(node, "Eltwise", [xa, xb], {"eltwise_param": params}, final=True)
        return
    if isinstance(a, Ref):
        _const_rhs(ctx, node, ctx.blob(a), b, const_first=False)
    else:
        _const_rhs(ctx, node, ctx.blob(b), a, const_first=True)


@rule("rsub")
def _emit_rsub(ctx: LowerCtx, node: Node) -> None:
    alpha = float(node.args.get("alpha", 1))
    power(ctx, node, ctx.blob(node.args["self"]), scale=-alpha,
           shift=scalar_arg(node, "other"), final=True)


@rule("neg")
def _emit_neg(ctx: LowerCtx, node: Node) -> None:
    power(ctx, node, ctx.blob(first(node)), scale=-1.0, final=True)


@rule("pow")
def _emit_pow(ctx: LowerCtx, node: Node) -> None:
    power(ctx, node, ctx.blob(node.args["self"]), power=scalar_arg(node, "exponent"),
           final=True)


@rule("reciprocal", "sqrt", "rsqrt", "square")
def _emit_power_fn(ctx: LowerCtx, node: Node) -> None:
    p = {"reciprocal": -1.0, "sqrt": 0.5, "rsqrt": -0.5, "square": 2.0}[node.op]
    power(ctx, node, ctx.blob(first(node)), power=p, final=True)


@rule("maximum", "max", "minimum", "min")
def _emit_max(ctx: LowerCtx, node: Node) -> None:
    a, b = operands(node)
    xa, xb = ctx.blob(a), ctx.blob(b)
    if node.op in ("maximum", "max"):
        ctx.step(node, "Eltwise", [xa, xb], {"eltwise_param": {"operation": "MAX"}}, final=True)
        return
    na, nb = power(ctx, node, xa, scale=-1.0), power(ctx, node, xb, scale=-1.0)
    m = ctx.step(node, "Eltwise", [na, nb], {"eltwise_param": {"operation": "MAX"}})
    power(ctx, node, m, scale=-1.0, final=True)  # min(a, b) = -max(-a, -b)
