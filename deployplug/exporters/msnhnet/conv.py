"""MsnhNet rules for the weighted layers: convolution, transposed convolution, linear, BN.

MsnhNet's conv sizes outputs with X=width but computes X along height, and its deconv reads
the first group's channels for every group, so these lowerings write only square conv
parameters and groups-1 deconv, and rewrite everything else (non-square kernels, uneven
padding or dilation, unequal strides, grouped deconv, output padding) into exact
equivalents: zero-filled or block-diagonal kernels, explicit padding, strided slices, crops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deployplug.capture import Graph, Node
from deployplug.exporters.msnhnet.emit import (
    Emitter,
    dilate_kernel,
    gcd,
    square_kernel,
)
from deployplug.exporters.msnhnet.rules import rule, source
from deployplug.ops.attrs import pair
from deployplug.profiles.msnhnet_checks import msnh_conv_pads


# -- convolution --------------------------------------------------------------------------
@rule("conv2d")
def _lower_conv(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    weight = node.args["weight"].detach().float().numpy()
    bias = node.args.get("bias")
    bias = None if bias is None else bias.detach().float().numpy()
    sh, sw = pair(node.args.get("stride"), name="stride", default=1)
    dh, dw = pair(node.args.get("dilation"), name="dilation", default=1)
    top, bottom, left, right = msnh_conv_pads(node)
    groups = int(node.args.get("groups", 1))
    kh, kw = weight.shape[2:]
    if kh == 1:
        dh = 1
    if kw == 1:
        dw = 1
    src = source(node)
    symmetric_pad = top == bottom == left == right
    if kh == kw and dh == dw and symmetric_pad:
        k, d, pad = kh, dh, top
    else:
        if dh != dw:  # fold the dilation into a zero-inserted kernel
            weight, dh, dw = dilate_kernel(weight, dh, dw), 1, 1
            kh, kw = weight.shape[2:]
        k, d, pad = max(kh, kw), dh, 0
        extra_h, extra_w = d * (k - kh), d * (k - kw)
        weight = square_kernel(weight, k)
        pads = (top, bottom + extra_h, left, right + extra_w)
        if any(pads):
            em.use(src)
            em.emit("padding", [("top", pads[0]), ("down", pads[1]), ("left", pads[2]),
                                ("right", pads[3])])
            c, h, w = em.shapes[src]
            src = em.temp((c, h + pads[0] + pads[1], w + pads[2] + pads[3]))
    s = gcd(sh, sw)
    fields: list[tuple[str, Any]] = [("filters", weight.shape[0]), ("kSize", k), ("stride", s),
                                     ("padding", pad), ("dilation", d), ("groups", groups),
                                     ("useBias", int(bias is not None))]
    em.use(src)
    em.emit("conv", fields, [weight] + ([bias] if bias is not None else []))
    if s != sh or s != sw:
        step = [("step1", sh // s)] if sh != s else []
        step += [("step2", sw // s)] if sw != s else []
        em.emit("slice", step)
    return None


@rule("conv_transpose2d")
def _lower_deconv(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    weight = node.args["weight"].detach().float().numpy()  # (Cin, Cout/g, kH, kW)
    bias = node.args.get("bias")
    bias = None if bias is None else bias.detach().float().numpy()
    groups = int(node.args.get("groups", 1))
    sh, sw = pair(node.args.get("stride"), name="stride", default=1)
    ph, pw = pair(node.args.get("padding"), name="padding", default=0)
    oph, opw = pair(node.args.get("output_padding"), name="output_padding", default=0)
    dh, dw = pair(node.args.get("dilation"), name="dilation", default=1)
    if groups > 1:  # MsnhNet's grouped deconv is wrong: use the block-diagonal dense weight
        cin, cout_g = weight.shape[:2]
        cin_g = cin // groups
        dense = np.zeros((cin, cout_g * groups) + weight.shape[2:], np.float32)
        for g in range(groups):
            dense[g * cin_g:(g + 1) * cin_g, g * cout_g:(g + 1) * cout_g] = weight[
                g * cin_g:(g + 1) * cin_g]
        weight = dense
    if dh != 1 or dw != 1:
        weight = dilate_kernel(weight.transpose(1, 0, 2, 3), dh, dw).transpose(1, 0, 2, 3)
    kh, kw = weight.shape[2:]
    _, cout, oh, ow = node.out_shape
    cropped = oph or opw
    src = source(node)
    if not em.layers and em.in_shape[1] != em.in_shape[2] and em.where[src] == -1:
        from deployplug.exporters.msnhnet.emit import NeedInputLayer

        raise NeedInputLayer
    em.use(src)
    # With output_padding the tail rows/cols get only the bias: compute the full, unpadded
    # deconv without bias, extend it with zeros, crop, then add the bias per channel.
    em.emit("deconv", [("filters", cout), ("kSizeX", kw), ("kSizeY", kh), ("strideX", sw),
                       ("strideY", sh), ("paddingX", 0 if cropped else pw),
                       ("paddingY", 0 if cropped else ph),
                       ("useBias", int(bias is not None and not cropped))],
            [np.ascontiguousarray(weight)] + ([bias] if bias is not None and not cropped
                                              else []))
    if cropped:
        _, h, w = em.shapes[src]
        full = (cout, (h - 1) * sh + kh, (w - 1) * sw + kw)
        cur = em.temp(full)
        extra_h, extra_w = max(0, ph + oh - full[1]), max(0, pw + ow - full[2])
        if extra_h or extra_w:
            em.emit("padding", [("down", extra_h), ("right", extra_w)])
            cur = em.temp((cout, full[1] + extra_h, full[2] + extra_w))
        shape = em.slice_axis(cur, 1, ph, ph + oh, 1)
        cur = em.temp(shape)
        em.slice_axis(cur, 2, pw, pw + ow, 1)
        if bias is not None:
            ones, zeros = np.ones(cout, np.float32), np.zeros(cout, np.float32)
            em.emit("batchnorm", [("eps", 0.0)], [ones, bias, zeros, ones])
    return None


@rule("linear")
def _lower_linear(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    weight = node.args["weight"].detach().float().numpy()
    bias = node.args.get("bias")
    em.use(source(node))
    fields: list[tuple[str, Any]] = [("output", weight.shape[0]),
                                     ("useBias", int(bias is not None))]
    blocks = [weight] + ([bias.detach().float().numpy()] if bias is not None else [])
    em.emit("connect", fields, blocks)
    return None


@rule("batch_norm")
def _lower_bn(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    mean = node.args["running_mean"].detach().float().numpy()
    var = node.args["running_var"].detach().float().numpy()
    weight, bias = node.args.get("weight"), node.args.get("bias")
    scale = np.ones_like(mean) if weight is None else weight.detach().float().numpy()
    shift = np.zeros_like(mean) if bias is None else bias.detach().float().numpy()
    em.use(source(node))
    em.emit("batchnorm", [("eps", float(node.args.get("eps", 1e-5)))],
            [scale, shift, mean, var])
    return None
