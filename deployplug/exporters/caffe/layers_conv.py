"""Caffe lowering of the weighted layers: convolution, deconvolution, inner product, batch norm.

These are the ops that carry constant weight blobs into the caffemodel, so their checks are
about the weights being constants and about geometry Caffe lacks (asymmetric 'same'
padding, output_padding, dilated deconvolution). A zero pad read only by convolutions is
folded into their pad (see :func:`.layers_shape.foldable_pads`).
"""

from __future__ import annotations

import numpy as np
import torch

from deployplug.capture import Node
from deployplug.exporters.caffe.blocks import first, hw, to_np
from deployplug.exporters.caffe.net import LowerCtx, rule
from deployplug.ops.attrs import in_shape, pair
from deployplug.profiles.caffe_checks import conv_padding


@rule("conv2d")
def _emit_conv(ctx: LowerCtx, node: Node) -> None:
    w, b = node.args["weight"], node.args.get("bias")
    pad = conv_padding(node)
    assert not isinstance(pad, str)
    source = first(node)
    if source.name in ctx.folded:  # F.pad(x) -> conv: one Convolution with the summed pad
        source, extra = ctx.folded[source.name]
        pad = (pad[0] + extra[0], pad[1] + extra[1])
    dil = pair(node.args.get("dilation", 1), name="dilation", default=1)
    p = {"num_output": int(w.shape[0]), "bias_term": b is not None,
         **hw("kernel", (int(w.shape[2]), int(w.shape[3])), "kernel_size"),
         **hw("stride", pair(node.args.get("stride", 1), name="stride", default=1), "stride", 1),
         **hw("pad", pad, "pad", 0)}
    if dil != (1, 1):
        p["dilation"] = [dil[0]] if dil[0] == dil[1] else list(dil)
    if int(node.args.get("groups", 1)) != 1:
        p["group"] = int(node.args["groups"])
    blobs = [to_np(w)] + ([to_np(b)] if b is not None else [])
    ctx.step(node, "Convolution", [ctx.blob(source)], {"convolution_param": p}, blobs,
             final=True)


@rule("conv_transpose2d")
def _emit_deconv(ctx: LowerCtx, node: Node) -> None:
    w, b = node.args["weight"], node.args.get("bias")
    groups = int(node.args.get("groups", 1))
    p = {"num_output": int(w.shape[1]) * groups, "bias_term": b is not None,
         **hw("kernel", (int(w.shape[2]), int(w.shape[3])), "kernel_size"),
         **hw("stride", pair(node.args.get("stride", 1), name="stride", default=1), "stride", 1),
         **hw("pad", pair(node.args.get("padding", 0), name="padding", default=0), "pad", 0)}
    if groups != 1:
        p["group"] = groups
    blobs = [to_np(w)] + ([to_np(b)] if b is not None else [])
    ctx.step(node, "Deconvolution", [ctx.blob(first(node))], {"convolution_param": p}, blobs,
             final=True)


@rule("linear")
def _emit_linear(ctx: LowerCtx, node: Node) -> None:
    w, b = node.args["weight"], node.args.get("bias")
    rank = len(in_shape(node, ctx.graph))
    p = {"num_output": int(w.shape[0]), "bias_term": b is not None}
    if rank != 2:
        p["axis"] = rank - 1  # PyTorch applies a Linear to the last axis only
    blobs = [to_np(w)] + ([to_np(b)] if b is not None else [])
    ctx.step(node, "InnerProduct", [ctx.blob(first(node))], {"inner_product_param": p}, blobs,
             final=True)


@rule("batch_norm")
def _emit_bn(ctx: LowerCtx, node: Node) -> None:
    mean, var = node.args["running_mean"], node.args["running_var"]
    gamma = node.args.get("weight")
    beta = node.args.get("bias")
    gamma = torch.ones_like(mean) if gamma is None else gamma
    beta = torch.zeros_like(mean) if beta is None else beta
    normed = ctx.step(node, "BatchNorm", [ctx.blob(first(node))],
                      {"batch_norm_param": {"use_global_stats": True,
                                            "eps": float(node.args.get("eps", 1e-5))}},
                      [to_np(mean), to_np(var), np.ones(1, np.float32)])
    ctx.step(node, "Scale", [normed], {"scale_param": {"bias_term": True}},
             [to_np(gamma), to_np(beta)], final=True)
