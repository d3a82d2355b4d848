"""MsnhNet rules for layers with structure: convolution, pooling, resizing, shape ops.

The lowerings write only constructs the real runtime computes correctly (square conv
parameters, unpadded max pooling, groups-1 deconv, ``type``-first upsample keys...) and
rewrite everything else into exact equivalents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deployplug.capture import Graph, Node, Ref
from deployplug.exporters.msnhnet_emit import (
    Emitter,
    canonical,
    dilate_kernel,
    gcd,
    square_kernel,
)
from deployplug.exporters.msnhnet_rules import (
    CONST_OPS,
    PAD_MIN,
    constant_of,
    input_shape,
    norm_dim,
    pair,
    rule,
    source,
    value_shape,
)


# -- convolution --------------------------------------------------------------------------
def _conv_pads(node: Node, graph: Graph) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a conv2d, resolving padding='same'/'valid'."""
    padding = node.args.get("padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        kh, kw = node.args["weight"].shape[2:]
        dh, dw = pair(node.args.get("dilation"), 1)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = pair(padding, 0)
    return ph, ph, pw, pw


def _check_conv(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "MsnhNet convolutions take 4-D (N, C, H, W) input only"
    if not isinstance(node.args.get("weight"), torch.Tensor):
        return "the conv weight is computed at run time; MsnhNet needs constant weights"
    if node.args.get("bias") is not None and not isinstance(node.args["bias"], torch.Tensor):
        return "the conv bias is computed at run time"
    return None


@rule("conv2d", check=_check_conv)
def _lower_conv(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    weight = node.args["weight"].detach().float().numpy()
    bias = node.args.get("bias")
    bias = None if bias is None else bias.detach().float().numpy()
    sh, sw = pair(node.args.get("stride"), 1)
    dh, dw = pair(node.args.get("dilation"), 1)
    top, bottom, left, right = _conv_pads(node, graph)  # type: ignore[misc]
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


@rule("conv_transpose2d", check=_check_conv)
def _lower_deconv(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    weight = node.args["weight"].detach().float().numpy()  # (Cin, Cout/g, kH, kW)
    bias = node.args.get("bias")
    bias = None if bias is None else bias.detach().float().numpy()
    groups = int(node.args.get("groups", 1))
    sh, sw = pair(node.args.get("stride"), 1)
    ph, pw = pair(node.args.get("padding"), 0)
    oph, opw = pair(node.args.get("output_padding"), 0)
    dh, dw = pair(node.args.get("dilation"), 1)
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
    _, cout, oh, ow = node.shape  # type: ignore[misc]
    cropped = oph or opw
    src = source(node)
    if not em.layers and em.in_shape[1] != em.in_shape[2] and em.where[src] == -1:
        from deployplug.exporters.msnhnet_emit import NeedInputLayer

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


def _check_linear(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 2:
        return ("MsnhNet 'connect' flattens its input; linear on a tensor of rank "
                f"{len(input_shape(node, graph))} is not expressible (flatten first)")
    if not isinstance(node.args.get("weight"), torch.Tensor):
        return "the linear weight is computed at run time"
    return None


@rule("linear", check=_check_linear)
def _lower_linear(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    weight = node.args["weight"].detach().float().numpy()
    bias = node.args.get("bias")
    em.use(source(node))
    fields: list[tuple[str, Any]] = [("output", weight.shape[0]),
                                     ("useBias", int(bias is not None))]
    blocks = [weight] + ([bias.detach().float().numpy()] if bias is not None else [])
    em.emit("connect", fields, blocks)
    return None




def _check_bn(node: Node, graph: Graph) -> str | None:
    if node.args.get("training"):
        return "batch_norm in training mode (batch statistics) cannot be exported"
    if not isinstance(node.args.get("running_mean"), torch.Tensor):
        return "batch_norm without running statistics"
    return None


@rule("batch_norm", check=_check_bn)
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


# -- pooling --------------------------------------------------------------------------
def _pool_params(node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    k = pair(node.args.get("kernel_size"))
    s = pair(node.args.get("stride"), None) if node.args.get("stride") else k
    p = pair(node.args.get("padding"), 0)
    return k, s, p


def _check_maxpool(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "max pooling needs 4-D input"
    k, s, p = _pool_params(node)
    if pair(node.args.get("dilation"), 1) != (1, 1):
        return "dilated max pooling is not expressible in MsnhNet"
    if s[0] == s[1] == 1 and k[0] != k[1]:
        return ("non-square max pooling kernel with stride 1 takes MsnhNet's unverified AVX "
                "path")
    return None


def _maxpool_layer(em: Emitter, k: tuple[int, int], s: tuple[int, int]) -> None:
    em.emit("maxpool", [("kSizeX", k[1]), ("kSizeY", k[0]), ("strideX", s[1]),
                        ("strideY", s[0]), ("paddingX", 0), ("paddingY", 0), ("ceilMode", 0)])


@rule("max_pool2d", check=_check_maxpool)
def _lower_maxpool(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    k, s, p = _pool_params(node)
    src = source(node)
    c, h, w = em.shapes[src]
    _, _, oh, ow = node.shape  # type: ignore[misc]
    extra_h = max(0, (oh - 1) * s[0] + k[0] - (h + 2 * p[0]))
    extra_w = max(0, (ow - 1) * s[1] + k[1] - (w + 2 * p[1]))
    em.use(src)
    if p != (0, 0) or extra_h or extra_w:
        em.emit("padding", [("top", p[0]), ("down", p[0] + extra_h), ("left", p[1]),
                            ("right", p[1] + extra_w), ("paddingVal", PAD_MIN)])
    if s[0] == s[1] and k[0] != k[1]:  # separable: two pools with unequal strides
        _maxpool_layer(em, (k[0], 1), (s[0], 1))
        _maxpool_layer(em, (1, k[1]), (1, s[1]))
    else:
        _maxpool_layer(em, k, s)
    return None


def _floor_ceil(size: int, k: int, s: int, p: int, ceil_mode: int) -> int:
    from deployplug.runtimes.msnhnet_ops import pool_out

    return pool_out(size, k, s, p, ceil_mode)


@dataclass(frozen=True)
class _AvgPlan:
    explicit: bool  # zero padding layer first (PyTorch's count_include_pad=True)
    ceil_mode: int
    crop: tuple[int | None, int | None]  # input rows/cols to keep before pooling


def _avg_plan(node: Node, graph: Graph) -> _AvgPlan | str:
    """How to write an avg_pool2d as a localavgpool, or the reason it cannot be written.

    MsnhNet has one ceilMode for both axes and no "last window must start inside the input"
    rule. When the axes disagree, an unpadded axis that needs floor rounding is cropped to
    exactly the rows its windows read, which makes floor and ceil agree on it.
    """
    k, s, p = _pool_params(node)
    _, _, h, w = input_shape(node, graph)
    _, _, oh, ow = node.shape  # type: ignore[misc]
    if node.args.get("divisor_override") is not None:
        return "avg_pool2d with divisor_override is not expressible"
    explicit = bool(node.args.get("count_include_pad", True)) and p != (0, 0)
    sizes = (h + 2 * p[0], w + 2 * p[1]) if explicit else (h, w)
    pp = (0, 0) if explicit else p
    outs = (oh, ow)
    modes = [{m for m in (0, 1) if _floor_ceil(sizes[a], k[a], s[a], pp[a], m) == outs[a]}
             for a in (0, 1)]
    common = modes[0] & modes[1]
    if common:
        return _AvgPlan(explicit, min(common), (None, None))
    crop: list[int | None] = [None, None]
    for a in (0, 1):
        if 1 not in modes[a]:
            if 0 not in modes[a] or pp[a]:
                return "this avg_pool2d ceil_mode output size has no MsnhNet equivalent"
            crop[a] = (outs[a] - 1) * s[a] + k[a]
    return _AvgPlan(explicit, 1, (crop[0], crop[1]))


def _check_avgpool(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "average pooling needs 4-D input"
    plan = _avg_plan(node, graph)
    return plan if isinstance(plan, str) else None


@rule("avg_pool2d", check=_check_avgpool)
def _lower_avgpool(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    k, s, p = _pool_params(node)
    plan = _avg_plan(node, graph)
    assert isinstance(plan, _AvgPlan)
    src = source(node)
    if plan.explicit:
        em.use(src)
        em.emit("padding", [("top", p[0]), ("down", p[0]), ("left", p[1]), ("right", p[1])])
        c, h, w = em.shapes[src]
        src = em.temp((c, h + 2 * p[0], w + 2 * p[1]))
        p = (0, 0)
    for axis, keep in ((1, plan.crop[0]), (2, plan.crop[1])):
        if keep is not None and keep < em.shapes[src][axis]:
            shape = em.slice_axis(src, axis, 0, keep, 1)
            src = em.temp(shape)
    em.use(src)
    # Only X/Y keys: localavgpool replaces X/Y values < 1 by the scalar form.
    em.emit("localavgpool", [("kSizeX", k[1]), ("kSizeY", k[0]), ("strideX", s[1]),
                             ("strideY", s[0]), ("paddingX", p[1]), ("paddingY", p[0]),
                             ("ceilMode", plan.ceil_mode)])
    return None


def _adaptive_out(node: Node, graph: Graph) -> tuple[int, int, int, int]:
    _, _, h, w = input_shape(node, graph)
    _, _, oh, ow = node.shape  # type: ignore[misc]
    return h, w, oh, ow


def _check_adaptive(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "adaptive pooling needs 4-D input"
    h, w, oh, ow = _adaptive_out(node, graph)
    if (oh, ow) != (1, 1) and (h % oh or w % ow):
        return (f"adaptive pooling {h}x{w} -> {oh}x{ow} has uneven windows; MsnhNet pools "
                "with fixed windows (use an output size dividing the input)")
    return None


@rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d", check=_check_adaptive)
def _lower_adaptive_avg(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _adaptive_out(node, graph)
    em.use(source(node))
    if (oh, ow) == (1, 1):
        em.emit("globalavgpool")
    elif (oh, ow) != (h, w):
        kh, kw = h // oh, w // ow
        em.emit("localavgpool", [("kSizeX", kw), ("kSizeY", kh), ("strideX", kw),
                                 ("strideY", kh), ("paddingX", 0), ("paddingY", 0)])
    else:
        em.emit("act", [("activation", "none")])
    return None


@rule("adaptive_max_pool2d", check=_check_adaptive)
def _lower_adaptive_max(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _adaptive_out(node, graph)
    kh, kw = h // oh, w // ow
    em.use(source(node))
    if (kh, kw) == (1, 1):
        em.emit("act", [("activation", "none")])
    else:  # k == s: square (AVX path, unpadded: exact) or unequal strides (exact)
        _maxpool_layer(em, (kh, kw), (kh, kw))
    return None


# -- resizing -------------------------------------------------------------------------
def _resize_factors(node: Node, graph: Graph) -> tuple[int, int, int, int]:
    _, _, h, w = input_shape(node, graph)
    _, _, oh, ow = node.shape  # type: ignore[misc]
    return h, w, oh, ow


def _check_nearest(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "upsampling needs 4-D input"
    h, w, oh, ow = _resize_factors(node, graph)
    scales = node.args.get("scale_factors") or node.args.get("scales_h")
    if oh % h or ow % w or oh < h or ow < w:
        return (f"nearest resize {h}x{w} -> {oh}x{ow} is not an integer upscale; MsnhNet "
                "nearest upsampling repeats pixels by integer strides")
    if isinstance(scales, (list, tuple)) and len(scales) == 2 and (
            scales[0] != oh // h or scales[1] != ow // w):
        return f"nearest resize with non-integer scale factors {scales}"
    return None


@rule("upsample_nearest2d", "_upsample_nearest_exact2d", check=_check_nearest)
def _lower_nearest(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _resize_factors(node, graph)
    em.use(source(node))
    # Key order matters: MsnhNet re-applies its scalar fallbacks after every key.
    em.emit("upsample", [("type", "nearest"), ("strideX", ow // w), ("strideY", oh // h),
                         ("scaleX", 1.0), ("scaleY", 1.0), ("alignCorners", 0)])
    return None


def _msnh_scale(size: int, out: int) -> float:
    """A float32 scale with int(size * scale) == out in float32 arithmetic."""
    scale = np.float32(out / size)

    def sizes(sc: np.float32) -> tuple[int, int]:  # float32 and double arithmetic
        return int(np.float32(size) * sc), int(size * float(sc))

    while min(sizes(scale)) < out:
        scale = np.nextafter(scale, np.float32(np.inf))
    if max(sizes(scale)) != out:
        raise ValueError(f"no float32 scale maps {size} to {out}")
    return float(scale)


def _check_bilinear(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "upsampling needs 4-D input"
    h, w, oh, ow = _resize_factors(node, graph)
    scales = node.args.get("scale_factors")
    if not node.args.get("align_corners") and isinstance(scales, (list, tuple)) and scales:
        for size, out, sc in ((h, oh, scales[0]), (w, ow, scales[-1])):
            if sc is not None and abs(sc * size - out) > 1e-6 * out:
                return (f"bilinear resize with scale_factor {sc} on size {size}: PyTorch "
                        "samples at 1/scale, MsnhNet at in/out; pass size= instead")
    return None


@rule("upsample_bilinear2d", check=_check_bilinear)
def _lower_bilinear(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _resize_factors(node, graph)
    em.use(source(node))
    em.emit("upsample", [("type", "bilinear"), ("strideX", 1), ("strideY", 1),
                         ("scaleX", _msnh_scale(w, ow)), ("scaleY", _msnh_scale(h, oh)),
                         ("alignCorners", int(bool(node.args.get("align_corners"))))])
    return None


# -- shape ops ------------------------------------------------------------------------
def _check_reshape(node: Node, graph: Graph) -> str | None:
    src, out = input_shape(node, graph), tuple(node.shape or ())
    if len(out) < 2 or len(out) > 4 or not src or out[0] != src[0]:
        return (f"reshape {list(src)} -> {list(out)} must keep the batch axis and give 2 to 4 "
                "dims; MsnhNet buffers are (C, H, W) per sample")
    return None


@rule("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze",
      check=_check_reshape)
def _lower_reshape(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    src = source(node)
    target = canonical(node.shape)  # type: ignore[arg-type]
    if em.shapes[src] == target:
        return src
    em.view(src, target)
    return None


def _permutation(node: Node, graph: Graph) -> tuple[int, ...] | str:
    rank = len(input_shape(node, graph))
    if node.op == "transpose" or node.op == "t":
        d0 = norm_dim(int(node.args.get("dim0", 0)), rank)
        d1 = norm_dim(int(node.args.get("dim1", 1)), rank)
        dims = list(range(rank))
        dims[d0], dims[d1] = dims[d1], dims[d0]
    else:
        dims = [norm_dim(int(d), rank) for d in node.args["dims"]]
    if dims[0] != 0:
        return "a permutation that moves the batch axis is not expressible"
    return tuple(d - 1 for d in dims[1:]) + tuple(range(rank - 1, 3))


def _check_permute(node: Node, graph: Graph) -> str | None:
    perm = _permutation(node, graph)
    return perm if isinstance(perm, str) else None


@rule("permute", "transpose", check=_check_permute)
def _lower_permute(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    perm = _permutation(node, graph)
    src = source(node)
    if perm == (0, 1, 2):
        return src
    em.permute(src, perm)  # type: ignore[arg-type]
    return None


def _check_cat(node: Node, graph: Graph) -> str | None:
    rank = len(node.shape or ())
    dim = norm_dim(int(node.args.get("dim", 0)), rank)
    if dim == 0:
        return "concatenation along the batch axis is not expressible"
    if any(constant_of(graph, t) is not None or not isinstance(t, Ref)
           for t in node.args["tensors"]):
        return "concatenation with a constant tensor is not expressible"
    return None


@rule("cat", "concat", check=_check_cat)
def _lower_cat(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    rank = len(node.shape)  # type: ignore[arg-type]
    axis = norm_dim(int(node.args.get("dim", 0)), rank) - 1
    names = [t.name for t in node.args["tensors"]]
    if len(names) == 1:
        src = names[0]
        return src
    if axis == 0:
        em.emit("route", [("layers", ",".join(str(em.index(n)) for n in names))])
        return None
    swap = (1, 0, 2) if axis == 1 else (2, 1, 0)
    idx = []
    for name in names:
        em.permute(name, swap)  # type: ignore[arg-type]
        idx.append(em.last)
    em.emit("route", [("layers", ",".join(map(str, idx)))])
    em.emit("permute", [("dim0", swap[0]), ("dim1", swap[1]), ("dim2", swap[2])])
    return None


def _check_pad(node: Node, graph: Graph) -> str | None:
    mode = node.args.get("mode", "constant")
    pads = list(node.args.get("pad", []))
    if mode != "constant":
        return f"pad mode '{mode}' is not expressible (MsnhNet pads with a constant only)"
    if len(input_shape(node, graph)) != 4 or len(pads) not in (2, 4):
        return "only constant padding of H and W of a 4-D tensor is expressible"
    if any(p < 0 for p in pads):
        return "negative padding (cropping) is not expressible as a padding layer"
    return None


@rule("pad", "constant_pad_nd", check=_check_pad)
def _lower_pad(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    pads = list(node.args["pad"]) + [0, 0]
    value = node.args.get("value") or 0.0
    em.use(source(node))
    em.emit("padding", [("top", pads[2]), ("down", pads[3]), ("left", pads[0]),
                        ("right", pads[1]), ("paddingVal", float(value))])
    return None


def _shuffle_weight(channels: int, factor: int) -> np.ndarray:
    """W[c*f*f + i*f + j, c, i, j] = 1: the one-hot kernel behind (un)shuffling."""
    weight = np.zeros((channels * factor * factor, channels, factor, factor), np.float32)
    for c in range(channels):
        for i in range(factor):
            for j in range(factor):
                weight[c * factor * factor + i * factor + j, c, i, j] = 1.0
    return weight


def _check_4d(node: Node, graph: Graph) -> str | None:
    return None if len(input_shape(node, graph)) == 4 else f"{node.op} needs 4-D input"


@rule("pixel_shuffle", check=_check_4d)
def _lower_pixel_shuffle(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    # MsnhNet's pixshf is wrong; a stride-f deconv with a one-hot kernel is exact.
    f = int(node.args["upscale_factor"])
    src = source(node)
    c = em.shapes[src][0] // (f * f)
    if not em.layers and em.in_shape[1] != em.in_shape[2]:
        from deployplug.exporters.msnhnet_emit import NeedInputLayer

        raise NeedInputLayer
    em.use(src)
    em.emit("deconv", [("filters", c), ("kSizeX", f), ("kSizeY", f), ("strideX", f),
                       ("strideY", f), ("paddingX", 0), ("paddingY", 0), ("useBias", 0)],
            [_shuffle_weight(c, f)])
    return None


@rule("pixel_unshuffle", check=_check_4d)
def _lower_pixel_unshuffle(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    f = int(node.args["downscale_factor"])
    src = source(node)
    c = em.shapes[src][0]
    em.use(src)
    em.emit("conv", [("filters", c * f * f), ("kSize", f), ("stride", f), ("padding", 0),
                     ("useBias", 0)], [_shuffle_weight(c, f)])
    return None


def _slice_args(node: Node, graph: Graph) -> tuple[int, int, int, int]:
    shape = input_shape(node, graph)
    dim = norm_dim(int(node.args.get("dim", 0)), len(shape))
    size = shape[dim]
    start = node.args.get("start")
    end = node.args.get("end")
    start = 0 if start is None else int(start)
    end = size if end is None else int(end)
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    return dim, max(0, min(start, size)), max(0, min(end, size)), int(node.args.get("step", 1))


def _check_slice(node: Node, graph: Graph) -> str | None:
    dim = _slice_args(node, graph)[0]
    if dim == 0:
        return "slicing the batch axis is not expressible"
    if len(input_shape(node, graph)) > 4:
        return "MsnhNet tensors have at most 3 non-batch axes"
    return None


@rule("slice", check=_check_slice)
def _lower_slice(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    dim, start, end, step = _slice_args(node, graph)
    src = source(node)
    if start == 0 and step == 1 and end >= input_shape(node, graph)[dim]:
        return src
    em.slice_axis(src, dim - 1, start, end, step)
    return None


def _split_bounds(node: Node, graph: Graph) -> tuple[int, list[tuple[int, int]]]:
    shape = input_shape(node, graph)
    dim = norm_dim(int(node.args.get("dim", 0)), len(shape))
    sizes = [s[dim] for s in node.shapes]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return dim, bounds


def _check_split(node: Node, graph: Graph) -> str | None:
    dim, _ = _split_bounds(node, graph)
    return "splitting the batch axis is not expressible" if dim == 0 else None


@rule("split", "split_with_sizes", "unsafe_split", check=_check_split)
def _lower_split(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    return False  # the pieces are produced by their getitem nodes


def _check_getitem(node: Node, graph: Graph) -> str | None:
    source = node.args.get("arg0")
    if not isinstance(source, Ref):
        return "getitem on a constant"
    try:
        producer = graph.node(source.name)
    except KeyError:
        return "getitem on a graph input"
    if producer.op not in ("split", "split_with_sizes", "unsafe_split"):
        return f"getitem on the multi-output op '{producer.op}'"
    return None


@rule("getitem", check=_check_getitem)
def _lower_getitem(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    producer = graph.node(node.args["arg0"].name)
    dim, bounds = _split_bounds(producer, graph)
    start, end = bounds[int(node.args["arg1"])]
    src = source(producer)
    if start == 0 and end == value_shape(graph, src)[dim]:
        return src
    em.slice_axis(src, dim - 1, start, end, 1)
    return None


def _softmax_groups(node: Node, graph: Graph) -> int | str:
    shape = canonical(input_shape(node, graph))
    rank = len(input_shape(node, graph))
    axis = norm_dim(int(node.args.get("dim", -1)), rank) - 1
    if axis < 0:
        return "softmax over the batch axis is not expressible"
    if any(d != 1 for d in shape[axis + 1:]):
        return (f"softmax over dim {axis + 1} of {list(input_shape(node, graph))}: MsnhNet's "
                "softmax runs over contiguous blocks of the flattened C*H*W, so the axis must "
                "be the last non-singleton one")
    return int(np.prod(shape[:axis]))


def _check_softmax(node: Node, graph: Graph) -> str | None:
    groups = _softmax_groups(node, graph)
    if isinstance(groups, str):
        return groups
    if graph.consumers(node.name) or node.name not in graph.outputs:
        return ("softmax must be the network output: MsnhNet reports its output shape as "
                "0x0x0, so no layer can safely follow it")
    return None


@rule("softmax", "_softmax", check=_check_softmax)
def _lower_softmax(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    em.use(source(node))
    em.emit("softmax", [("groups", _softmax_groups(node, graph))])
    return None


def _reduce_dims(node: Node, graph: Graph) -> list[int] | str:
    rank = len(input_shape(node, graph))
    dims = node.args.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return "a reduction over every axis (including the batch) is not expressible"
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted({norm_dim(int(d), rank) for d in dims})
    if 0 in dims:
        return "a reduction over the batch axis is not expressible"
    if node.args.get("dtype") is not None:
        return "a reduction with a dtype change"
    return dims


def _check_reduce(node: Node, graph: Graph) -> str | None:
    dims = _reduce_dims(node, graph)
    return dims if isinstance(dims, str) else None


@rule("mean", "sum", check=_check_reduce)
def _lower_reduce(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    dims = _reduce_dims(node, graph)
    src = source(node)
    shape = list(em.shapes[src])
    rank = len(input_shape(node, graph))
    em.use(src)
    if node.op == "mean" and rank == 4 and dims == [2, 3]:
        em.emit("globalavgpool")
        shape[1] = shape[2] = 1
    else:
        for d in dims:  # type: ignore[union-attr]
            em.emit("reduction", [("type", node.op), ("axis", d - 1)])
            shape[d - 1] = 1
    target = canonical(node.shape)  # type: ignore[arg-type]
    if tuple(shape) != target:
        tmp = em.temp(tuple(shape))  # type: ignore[arg-type]
        em.view(tmp, target)
    return None


def _check_const(node: Node, graph: Graph) -> str | None:
    return None


@rule(*CONST_OPS, check=_check_const)
def _lower_const(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    return False  # constants are folded into the ops that read them
