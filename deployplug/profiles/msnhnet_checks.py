"""Which nodes MsnhNet expresses exactly, with the limits measured on the real runtime.

One check per op, each ``(node, graph) -> reason | None``, plus the planning helpers the
MsnhNet writer (:mod:`deployplug.exporters.msnhnet`) lowers with, so the check and the
lowering read a node the same way. The runtime facts behind the checks: conv parameters
must be written square (the writer rewrites anything else), ``varop`` has no broadcasting
and its ``pow`` is wrong for negative inputs, ``elu`` ignores alpha, softplus needs a large
threshold, softmax reports a 0x0x0 output so nothing may follow it, and pooled sizes follow
:func:`deployplug.ops.sizes.msnhnet_pool_out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deployplug.capture import Graph, Node, Ref
from deployplug.errors import OffendingOp
from deployplug.ops.attrs import (
    adaptive_sizes,
    channel_vector,
    conv_pads,
    in_shape,
    norm_dim,
    pad_spec,
    pool_attrs,
    reduce_dims,
    slice_spec,
)
from deployplug.ops.sizes import msnhnet_pool_out
from deployplug.profiles.base import NodeCheck, always

#: ops that only carry a constant (or forward their input) and emit no layer
CONST_OPS = frozenset({"clone", "lift_fresh_copy", "_to_copy", "detach", "alias"})
SPLIT_OPS = ("split", "split_with_sizes", "unsafe_split")


# -- graph constants -----------------------------------------------------------------------
def constant_of(graph: Graph, value: Any) -> torch.Tensor | None:
    """The tensor behind a constant operand (a lifted tensor, or a clone of one)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Ref):
        try:
            node = graph.node(value.name)
        except KeyError:
            return None
        if node.op in CONST_OPS and not node.inputs:
            inner = node.args.get("self")
            return inner if isinstance(inner, torch.Tensor) else None
    return None


def scalar_of(graph: Graph, value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    tensor = constant_of(graph, value)
    if tensor is not None and tensor.numel() == 1:
        return float(tensor.reshape(()).item())
    return None


def channel_const(graph: Graph, value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """A constant that only varies along the channel axis, as a length-C float32 vector."""
    tensor = constant_of(graph, value)
    vec = None if tensor is None else channel_vector(tensor, shape)
    return None if vec is None else vec.to(torch.float32).numpy()


def is_activation(graph: Graph, value: Any) -> bool:
    """A graph value computed at run time (not a lifted constant)."""
    return isinstance(value, Ref) and constant_of(graph, value) is None


_NONNEG_OPS = frozenset({"relu", "relu6", "sigmoid", "softmax", "_softmax", "abs", "sqrt", "exp",
                         "cosh", "softplus", "hardsigmoid", "square"})
_NONNEG_PRESERVING = frozenset({"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
                                "adaptive_max_pool2d", "upsample_nearest2d",
                                "_upsample_nearest_exact2d", "upsample_bilinear2d", "view",
                                "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze",
                                "permute", "transpose", "cat", "slice", "getitem", "split",
                                "split_with_sizes", "mean", "sum"})


def provably_nonneg(graph: Graph, value: str, depth: int = 0) -> bool:
    """True when ``value`` is >= 0 by construction (needed before ``varop pow``)."""
    if depth > 64:
        return False
    try:
        node = graph.node(value)
    except KeyError:
        return False  # a graph input
    if node.op in _NONNEG_OPS:
        return True
    if node.op in ("clamp", "hardtanh"):
        low = node.args.get("min", node.args.get("min_val"))
        return isinstance(low, (int, float)) and low >= 0
    if node.op == "pow":
        e = scalar_of(graph, node.args.get("exponent"))
        if e is not None and e == int(e) and int(e) % 2 == 0:
            return True
    if node.op == "mul" and len(node.inputs) == 1 and node.args.get("self") == node.args.get(
            "other"):
        return True
    if node.op in ("add", "mul", "div"):
        other = scalar_of(graph, node.args.get("other"))
        if other is not None and other < 0:
            return False
    if node.op in _NONNEG_PRESERVING or node.op in ("add", "mul", "div"):
        return bool(node.inputs) and all(provably_nonneg(graph, v, depth + 1)
                                         for v in node.inputs)
    return False


def canonical(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Torch shape (N, d1[, d2[, d3]]) -> MsnhNet (C, H, W), trailing axes of size 1."""
    dims = tuple(int(d) for d in shape[1:])
    c, h, w = dims + (1,) * (3 - len(dims))
    return c, h, w


# -- weighted layers -----------------------------------------------------------------------
def msnh_conv_pads(node: Node) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a conv2d, resolving padding='same'/'valid'."""
    (top, bottom), (left, right) = conv_pads(node)
    return top, bottom, left, right


def _check_conv(node: Node, graph: Graph) -> str | None:
    if len(in_shape(node, graph)) != 4:
        return "MsnhNet convolutions take 4-D (N, C, H, W) input only"
    if not isinstance(node.args.get("weight"), torch.Tensor):
        return "the conv weight is computed at run time; MsnhNet needs constant weights"
    if node.args.get("bias") is not None and not isinstance(node.args["bias"], torch.Tensor):
        return "the conv bias is computed at run time"
    return None


def _check_linear(node: Node, graph: Graph) -> str | None:
    rank = len(in_shape(node, graph))
    if rank != 2:
        return ("MsnhNet 'connect' flattens its input; linear on a tensor of rank "
                f"{rank} is not expressible (flatten first)")
    if not isinstance(node.args.get("weight"), torch.Tensor):
        return "the linear weight is computed at run time"
    return None


def _check_bn(node: Node, graph: Graph) -> str | None:
    if node.args.get("training"):
        return "batch_norm in training mode (batch statistics) cannot be exported"
    if not isinstance(node.args.get("running_mean"), torch.Tensor):
        return "batch_norm without running statistics"
    return None


# -- pooling and resizing ------------------------------------------------------------------
def pool_params(node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    pa = pool_attrs(node)
    return ((pa.kernel[0], pa.kernel[1]), (pa.stride[0], pa.stride[1]),
            (pa.padding[0], pa.padding[1]))


def in_out_hw(node: Node, graph: Graph) -> tuple[int, int, int, int]:
    """Input and output height/width of a pooling or resizing node."""
    (h, w), (oh, ow) = adaptive_sizes(node, graph)
    return h, w, oh, ow


def _check_maxpool(node: Node, graph: Graph) -> str | None:
    if len(in_shape(node, graph)) != 4:
        return "max pooling needs 4-D input"
    k, s, _ = pool_params(node)
    if pool_attrs(node).dilation != (1, 1):
        return "dilated max pooling is not expressible in MsnhNet"
    if s[0] == s[1] == 1 and k[0] != k[1]:
        return ("non-square max pooling kernel with stride 1 takes MsnhNet's unverified AVX "
                "path")
    return None


@dataclass(frozen=True)
class AvgPlan:
    """How an avg_pool2d is written as a ``localavgpool``."""

    explicit: bool  # zero padding layer first (PyTorch's count_include_pad=True)
    ceil_mode: int
    crop: tuple[int | None, int | None]  # input rows/cols to keep before pooling


def avg_plan(node: Node, graph: Graph) -> AvgPlan | str:
    """How to write an avg_pool2d as a localavgpool, or the reason it cannot be written.

    MsnhNet has one ceilMode for both axes and no "last window must start inside the input"
    rule. When the axes disagree, an unpadded axis that needs floor rounding is cropped to
    exactly the rows its windows read, which makes floor and ceil agree on it.
    """
    k, s, p = pool_params(node)
    _, _, h, w = in_shape(node, graph)
    _, _, oh, ow = node.shape or (0, 0, 0, 0)
    if node.args.get("divisor_override") is not None:
        return "avg_pool2d with divisor_override is not expressible"
    explicit = bool(node.args.get("count_include_pad", True)) and p != (0, 0)
    sizes = (h + 2 * p[0], w + 2 * p[1]) if explicit else (h, w)
    pp = (0, 0) if explicit else p
    outs = (oh, ow)
    modes = [{m for m in (0, 1) if msnhnet_pool_out(sizes[a], k[a], s[a], pp[a], m) == outs[a]}
             for a in (0, 1)]
    common = modes[0] & modes[1]
    if common:
        return AvgPlan(explicit, min(common), (None, None))
    crop: list[int | None] = [None, None]
    for a in (0, 1):
        if 1 not in modes[a]:
            if 0 not in modes[a] or pp[a]:
                return "this avg_pool2d ceil_mode output size has no MsnhNet equivalent"
            crop[a] = (outs[a] - 1) * s[a] + k[a]
    return AvgPlan(explicit, 1, (crop[0], crop[1]))


def _check_avgpool(node: Node, graph: Graph) -> str | None:
    if len(in_shape(node, graph)) != 4:
        return "average pooling needs 4-D input"
    plan = avg_plan(node, graph)
    return plan if isinstance(plan, str) else None


def _check_adaptive(node: Node, graph: Graph) -> str | None:
    if len(in_shape(node, graph)) != 4:
        return "adaptive pooling needs 4-D input"
    h, w, oh, ow = in_out_hw(node, graph)
    if (oh, ow) != (1, 1) and (h % oh or w % ow):
        return (f"adaptive pooling {h}x{w} -> {oh}x{ow} has uneven windows; MsnhNet pools "
                "with fixed windows (use an output size dividing the input)")
    return None


def _check_nearest(node: Node, graph: Graph) -> str | None:
    if len(in_shape(node, graph)) != 4:
        return "upsampling needs 4-D input"
    h, w, oh, ow = in_out_hw(node, graph)
    scales = node.args.get("scale_factors") or node.args.get("scales_h")
    if oh % h or ow % w or oh < h or ow < w:
        return (f"nearest resize {h}x{w} -> {oh}x{ow} is not an integer upscale; MsnhNet "
                "nearest upsampling repeats pixels by integer strides")
    if isinstance(scales, (list, tuple)) and len(scales) == 2 and (
            scales[0] != oh // h or scales[1] != ow // w):
        return f"nearest resize with non-integer scale factors {scales}"
    return None


def _check_bilinear(node: Node, graph: Graph) -> str | None:
    if len(in_shape(node, graph)) != 4:
        return "upsampling needs 4-D input"
    h, w, oh, ow = in_out_hw(node, graph)
    scales = node.args.get("scale_factors")
    if not node.args.get("align_corners") and isinstance(scales, (list, tuple)) and scales:
        for size, out, sc in ((h, oh, scales[0]), (w, ow, scales[-1])):
            if sc is not None and abs(sc * size - out) > 1e-6 * out:
                return (f"bilinear resize with scale_factor {sc} on size {size}: PyTorch "
                        "samples at 1/scale, MsnhNet at in/out; pass size= instead")
    return None


# -- data movement -------------------------------------------------------------------------
def _check_reshape(node: Node, graph: Graph) -> str | None:
    src, out = in_shape(node, graph), tuple(node.shape or ())
    if len(out) < 2 or len(out) > 4 or not src or out[0] != src[0]:
        return (f"reshape {list(src)} -> {list(out)} must keep the batch axis and give 2 to 4 "
                "dims; MsnhNet buffers are (C, H, W) per sample")
    return None


def permutation(node: Node, graph: Graph) -> tuple[int, int, int] | str:
    """A permute/transpose as MsnhNet's 0-based (C, H, W) permutation, or why not."""
    rank = len(in_shape(node, graph))
    if node.op in ("transpose", "t"):
        d0 = norm_dim(int(node.args.get("dim0", 0)), rank)
        d1 = norm_dim(int(node.args.get("dim1", 1)), rank)
        dims = list(range(rank))
        dims[d0], dims[d1] = dims[d1], dims[d0]
    else:
        dims = [norm_dim(int(d), rank) for d in node.args["dims"]]
    if dims[0] != 0:
        return "a permutation that moves the batch axis is not expressible"
    perm = tuple(d - 1 for d in dims[1:]) + tuple(range(rank - 1, 3))
    return perm[0], perm[1], perm[2]


def _check_permute(node: Node, graph: Graph) -> str | None:
    perm = permutation(node, graph)
    return perm if isinstance(perm, str) else None


def _check_cat(node: Node, graph: Graph) -> str | None:
    dim = norm_dim(int(node.args.get("dim", 0)), len(node.shape or ()))
    if dim == 0:
        return "concatenation along the batch axis is not expressible"
    if any(constant_of(graph, t) is not None or not isinstance(t, Ref)
           for t in node.args["tensors"]):
        return "concatenation with a constant tensor is not expressible"
    return None


def _check_pad(node: Node, graph: Graph) -> str | None:
    mode = node.args.get("mode", "constant")
    pads = list(node.args.get("pad", []))
    if mode != "constant":
        return f"pad mode '{mode}' is not expressible (MsnhNet pads with a constant only)"
    if len(in_shape(node, graph)) != 4 or len(pads) not in (2, 4):
        return "only constant padding of H and W of a 4-D tensor is expressible"
    if min(pad_spec(node, graph).spatial) < 0:
        return "negative padding (cropping) is not expressible as a padding layer"
    return None


def _check_4d(node: Node, graph: Graph) -> str | None:
    return None if len(in_shape(node, graph)) == 4 else f"{node.op} needs 4-D input"


def _check_slice(node: Node, graph: Graph) -> str | None:
    if slice_spec(node, graph).dim == 0:
        return "slicing the batch axis is not expressible"
    if len(in_shape(node, graph)) > 4:
        return "MsnhNet tensors have at most 3 non-batch axes"
    return None


def split_bounds(node: Node, graph: Graph) -> tuple[int, list[tuple[int, int]]]:
    """(axis, [(start, end) of each piece]) of a split."""
    shape = in_shape(node, graph)
    dim = norm_dim(int(node.args.get("dim", 0)), len(shape))
    bounds, start = [], 0
    for size in (s[dim] for s in node.shapes):
        bounds.append((start, start + size))
        start += size
    return dim, bounds


def _check_split(node: Node, graph: Graph) -> str | None:
    dim, _ = split_bounds(node, graph)
    return "splitting the batch axis is not expressible" if dim == 0 else None


def _check_getitem(node: Node, graph: Graph) -> str | None:
    source = node.args.get("arg0")
    if not isinstance(source, Ref):
        return "getitem on a constant"
    try:
        producer = graph.node(source.name)
    except KeyError:
        return "getitem on a graph input"
    if producer.op not in SPLIT_OPS:
        return f"getitem on the multi-output op '{producer.op}'"
    return None


def softmax_groups(node: Node, graph: Graph) -> int | str:
    """MsnhNet softmax ``groups`` for the node's axis, or why the axis cannot be expressed."""
    full = in_shape(node, graph)
    shape = canonical(full)
    axis = norm_dim(int(node.args.get("dim", -1)), len(full)) - 1
    if axis < 0:
        return "softmax over the batch axis is not expressible"
    if any(d != 1 for d in shape[axis + 1:]):
        return (f"softmax over dim {axis + 1} of {list(full)}: MsnhNet's "
                "softmax runs over contiguous blocks of the flattened C*H*W, so the axis must "
                "be the last non-singleton one")
    return int(np.prod(shape[:axis]))


def _check_softmax(node: Node, graph: Graph) -> str | None:
    groups = softmax_groups(node, graph)
    if isinstance(groups, str):
        return groups
    if graph.consumers(node.name) or node.name not in graph.outputs:
        return ("softmax must be the network output: MsnhNet reports its output shape as "
                "0x0x0, so no layer can safely follow it")
    return None


def msnh_reduce_dims(node: Node, graph: Graph) -> list[int] | str:
    """The reduced axes (all >= 1), or why MsnhNet cannot reduce over them."""
    dims = node.args.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return "a reduction over every axis (including the batch) is not expressible"
    axes, _ = reduce_dims(node, graph)
    if 0 in axes:
        return "a reduction over the batch axis is not expressible"
    if node.args.get("dtype") is not None:
        return "a reduction with a dtype change"
    return axes


def _check_reduce(node: Node, graph: Graph) -> str | None:
    dims = msnh_reduce_dims(node, graph)
    return dims if isinstance(dims, str) else None


# -- element-wise --------------------------------------------------------------------------
def _check_prelu(node: Node, graph: Graph) -> str | None:
    weight = node.args.get("weight")
    if not isinstance(weight, torch.Tensor):
        return "the prelu slope is computed at run time"
    c = canonical(in_shape(node, graph))[0]
    if weight.numel() not in (1, c):
        return f"prelu with {weight.numel()} slopes on {c} channels"
    return None


def _check_clamp(node: Node, graph: Graph) -> str | None:
    for key in ("min", "max", "min_val", "max_val"):
        value = node.args.get(key)
        if value is not None and not isinstance(value, (int, float)):
            return (f"clamp with a tensor bound '{key}' is not expressible (MsnhNet clip takes "
                    "constants)")
    return None


def _check_softplus(node: Node, graph: Graph) -> str | None:
    if float(node.args.get("threshold", 20)) < 20:
        return ("softplus threshold below 20: MsnhNet returns exp(x) below -threshold, which "
                "only matches PyTorch when the threshold is large")
    if float(node.args.get("beta", 1)) <= 0:
        return "softplus beta must be positive"
    return None


def _check_pow(node: Node, graph: Graph) -> str | None:
    if not isinstance(node.args.get("self"), Ref):
        return "pow with a constant base and a tensor exponent is not expressible"
    e = scalar_of(graph, node.args.get("exponent"))
    if e is None:
        return "pow with a tensor exponent is not expressible (varop pow takes a constant)"
    if e == int(e) and abs(e) <= 16:
        return None
    if abs(e) == 0.5 or provably_nonneg(graph, node.inputs[0]):
        return None
    return (f"pow with exponent {e}: MsnhNet's varop pow is wrong for negative inputs and "
            "the input is not provably non-negative (apply relu/abs first, or use an integer "
            "exponent)")


def _check_binary(node: Node, graph: Graph) -> str | None:
    a, b = node.args.get("self"), node.args.get("other")
    if node.op == "div" and node.args.get("rounding_mode") is not None:
        return f"div with rounding_mode={node.args['rounding_mode']!r} is not expressible"
    act_a, act_b = is_activation(graph, a), is_activation(graph, b)
    alpha = node.args.get("alpha", 1)
    if act_a and act_b:
        assert isinstance(a, Ref) and isinstance(b, Ref)
        sa, sb = tuple(graph.shape_of(a.name)), tuple(graph.shape_of(b.name))
        if sa != sb:
            return (f"broadcasting {node.op} between {list(sa)} and {list(sb)}: MsnhNet's varop "
                    "needs identical shapes (no broadcasting)")
        if alpha != 1:
            return f"{node.op} with alpha={alpha} between two tensors"
        return None
    if not (act_a or act_b):
        return f"{node.op} between two constants (should have been folded)"
    const, src = (b, a) if act_a else (a, b)
    assert isinstance(src, Ref)
    if scalar_of(graph, const) is None and channel_const(
            graph, const, tuple(graph.shape_of(src.name))) is None:
        return (f"{node.op} with a constant tensor operand that is neither a scalar nor "
                "per-channel: MsnhNet has no constant tensors (varop takes scalars only)")
    if not isinstance(alpha, (int, float)):
        return f"{node.op} with a tensor alpha"
    return None


UNARY_VAROPS = ("abs", "acos", "asin", "atan", "cos", "cosh", "sin", "sinh", "tan", "exp",
                "log", "log10", "sqrt")
ACTIVATIONS = {"relu": "relu", "relu6": "relu6", "tanh": "tanh", "sigmoid": "logistic",
               "silu": "swish", "mish": "mish", "hardswish": "hardswish"}


def _table() -> dict[str, NodeCheck]:
    groups: list[tuple[tuple[str, ...], NodeCheck]] = [
        (tuple(ACTIVATIONS) + UNARY_VAROPS + ("leaky_relu", "hardsigmoid", "elu", "selu",
                                              "neg", "reciprocal", "rsqrt", "log2", "square"),
         always),
        (tuple(CONST_OPS), always),
        (("conv2d", "conv_transpose2d"), _check_conv),
        (("linear",), _check_linear),
        (("batch_norm",), _check_bn),
        (("prelu",), _check_prelu),
        (("clamp", "clip", "hardtanh", "clamp_min", "clamp_max"), _check_clamp),
        (("softplus",), _check_softplus),
        (("pow",), _check_pow),
        (("add", "sub", "mul", "div", "rsub"), _check_binary),
        (("max_pool2d",), _check_maxpool),
        (("avg_pool2d",), _check_avgpool),
        (("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"),
         _check_adaptive),
        (("upsample_nearest2d", "_upsample_nearest_exact2d"), _check_nearest),
        (("upsample_bilinear2d",), _check_bilinear),
        (("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze"), _check_reshape),
        (("permute", "transpose"), _check_permute),
        (("cat", "concat"), _check_cat),
        (("pad", "constant_pad_nd"), _check_pad),
        (("pixel_shuffle", "pixel_unshuffle"), _check_4d),
        (("slice",), _check_slice),
        (SPLIT_OPS, _check_split),
        (("getitem",), _check_getitem),
        (("softmax", "_softmax"), _check_softmax),
        (("mean", "sum"), _check_reduce),
    ]
    return {op: check for ops, check in groups for op in ops}


#: op -> check for every op the MsnhNet writer lowers
CHECKS: dict[str, NodeCheck] = _table()


def graph_limits(graph: Graph, target: str) -> list[OffendingOp]:
    """One input of rank 2 to 4 and one output: what a MsnhNet network file can describe."""
    found: list[OffendingOp] = []
    if len(graph.inputs) != 1:
        found.append(OffendingOp("input", "", target,
                                 f"MsnhNet networks have one input, the model takes "
                                 f"{len(graph.inputs)}", ("export a single-input wrapper",)))
    elif not 2 <= len(graph.inputs[0].shape) <= 4:
        found.append(OffendingOp("input", "", target,
                                 f"input of shape {list(graph.inputs[0].shape)}: MsnhNet needs "
                                 "(N, C[, H[, W]])", ()))
    if len(graph.outputs) != 1:
        found.append(OffendingOp("output", "", target,
                                 f"MsnhNet networks have one output, the model returns "
                                 f"{len(graph.outputs)}", ("export a single-output wrapper",)))
    return found


__all__ = ["ACTIVATIONS", "CHECKS", "CONST_OPS", "SPLIT_OPS", "UNARY_VAROPS", "AvgPlan",
           "avg_plan", "canonical", "channel_const", "constant_of", "graph_limits",
           "in_out_hw", "is_activation", "msnh_conv_pads", "msnh_reduce_dims",
           "permutation", "pool_params", "provably_nonneg", "scalar_of", "softmax_groups",
           "split_bounds"]
