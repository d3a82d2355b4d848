"""Which nodes BVLC Caffe layers (as OpenCV 4.x loads them) express exactly, and why not.

One check per op, each ``(node, graph) -> reason | None``. The Caffe writer
(:mod:`deployplug.exporters.caffe`) lowers exactly the ops in :data:`CHECKS` and reads the
same helpers (pads, resize factors, broadcast axes) when it builds layers, so what the target
accepts and what the writer emits are decided by one piece of code.
"""

from __future__ import annotations

from typing import Any

import torch

from deployplug.capture import Graph, Node, Ref
from deployplug.errors import OpAttributeError
from deployplug.ops.attrs import (
    adaptive_sizes,
    conv_pads,
    in_shape,
    pad_spec,
    pair,
    pool_attrs,
    reduce_dims,
    scalar,
    slice_spec,
    tensor_bound,
    varying_axis,
)
from deployplug.ops.attrs import clamp_bounds as _clamp_bounds
from deployplug.ops.sizes import caffe_pool_out
from deployplug.profiles.base import NodeCheck, always


# -- helpers the writer shares -------------------------------------------------------------
def operands(node: Node) -> tuple[Any, Any]:
    return node.args.get("self", node.args.get("input")), node.args.get("other")


def conv_padding(node: Node) -> tuple[int, int] | str:
    """Caffe's symmetric (pad_h, pad_w) of a convolution, or why it has none."""
    pads = conv_pads(node)
    if any(before != after for before, after in pads):
        return "padding='same' needs asymmetric padding here, which Caffe lacks"
    return pads[0][0], pads[1][0]


def caffe_pads(node: Node, graph: Graph) -> tuple[tuple[int, int, int, int], float] | str:
    """((left, right, top, bottom), value) of a constant H/W pad, or why Caffe cannot pad."""
    spec = pad_spec(node, graph)
    if spec.mode != "constant":
        return f"padding mode '{spec.mode}' (Caffe pads with constants only)"
    if spec.rank != 4 or not spec.only_last(2):
        return "padding along the channel or batch axis has no Caffe layer"
    return spec.spatial, spec.value


def resize_factors(node: Node, graph: Graph) -> tuple[int, int] | str:
    """Integer (H, W) upsampling factors of a resize, or why there are none."""
    src = in_shape(node, graph)
    out = node.shape or ()
    if len(src) != 4:
        return "upsampling a non 4-D tensor"
    f = []
    for i in range(2):
        if out[2 + i] % src[2 + i]:
            return f"size {src[2 + i]} -> {out[2 + i]} is not an integer factor"
        f.append(out[2 + i] // src[2 + i])
    scales = node.args.get("scale_factors") or [node.args.get("scales_h"),
                                                node.args.get("scales_w")]
    for sc, fi in zip(scales, f):
        if sc is not None and float(sc) != fi:
            return f"scale factor {sc} is not the integer {fi}"
    return f[0], f[1]


def integer_factors(node: Node, graph: Graph) -> tuple[int, int]:
    """:func:`resize_factors` for a writer: the factors, or an error naming the node and why.

    The check has accepted the node before a writer asks, so this raises only when the two
    disagree; a reason string must never be unpacked as two factors.
    """
    found = resize_factors(node, graph)
    if isinstance(found, str):
        raise OpAttributeError(f"{node.name} ({node.op} at '{node.where}'): {found}")
    return found


def prefix_broadcast(small: tuple[int, ...], big: tuple[int, ...]) -> int | None:
    """k when ``small`` == big[:k] + ones (what a two-bottom Scale at axis 0 can broadcast)."""
    if len(small) != len(big):
        return None
    k = len(small)
    while k > 0 and small[k - 1] == 1 and big[k - 1] != 1:
        k -= 1
    if small[:k] != big[:k] or any(s != 1 for s in small[k:]) or k == 0:
        return None
    return k


def clamp_bounds(node: Node) -> tuple[float | None, float | None]:
    return _clamp_bounds(node)


# -- activations ---------------------------------------------------------------------------
def _check_prelu(node: Node, graph: Graph) -> str | None:
    if isinstance(node.args.get("weight"), torch.Tensor):
        return None
    return "PReLU slopes computed at run time"


def _check_elu(node: Node, graph: Graph) -> str | None:
    if float(node.args.get("scale", 1)) != 1 or float(node.args.get("input_scale", 1)) != 1:
        return "Caffe ELU has no scale/input_scale (SELU/CELU)"
    return None


def _check_clamp(node: Node, graph: Graph) -> str | None:
    key = tensor_bound(node)
    if key is not None:
        return f"clamp with a tensor '{key}' bound is not expressible in Caffe"
    lo, hi = clamp_bounds(node)
    if lo is not None and hi is not None and lo > hi:
        return f"clamp with min {lo} > max {hi}"
    return None


def _check_softmax(node: Node, graph: Graph) -> str | None:
    if node.args.get("half_to_float"):
        return "half_to_float softmax"
    return None


# -- arithmetic ----------------------------------------------------------------------------
def _check_binary(node: Node, graph: Graph) -> str | None:
    a, b = operands(node)
    if node.op == "div" and node.args.get("rounding_mode") is not None:
        return "integer division (rounding_mode) has no Caffe layer"
    out = tuple(node.shape or ())
    refs = [v for v in (a, b) if isinstance(v, Ref)]
    if not refs:
        return "an op on constants only (fold it before export)"
    if len(refs) == 2:
        sa, sb = graph.shape_of(a.name), graph.shape_of(b.name)
        if sa == sb:
            return None
        if node.op in ("mul", "div") and sa == out and prefix_broadcast(sb, sa):
            return None
        if node.op == "mul" and sb == out and prefix_broadcast(sa, sb):
            return None
        return (f"broadcasting {list(sa)} with {list(sb)}: Caffe only broadcasts a product by "
                "a per-channel (N,C,1,1) tensor")
    x = refs[0]
    const = b if isinstance(a, Ref) else a
    if graph.shape_of(x.name) != out:
        return "the constant operand broadcasts the activation to a larger shape"
    if scalar(const) is not None:
        if node.op == "div" and not isinstance(a, Ref) and scalar(const) == 0:
            return "division of zero by a tensor"
        return None
    if isinstance(const, torch.Tensor) and varying_axis(const.shape, out) is not None:
        return None
    return "the constant operand is neither a scalar nor a per-channel vector"


def _check_rsub(node: Node, graph: Graph) -> str | None:
    if not isinstance(node.args.get("self"), Ref) or scalar(node.args.get("other")) is None:
        return "rsub with a non-scalar operand"
    return None


def _check_pow(node: Node, graph: Graph) -> str | None:
    if not isinstance(node.args.get("self"), Ref) or scalar(node.args.get("exponent")) is None:
        return "only tensor ** scalar maps to Caffe Power"
    return None


def _check_same_shape(node: Node, graph: Graph) -> str | None:
    a, b = operands(node)
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        return "Eltwise MAX needs two tensors (use clamp for a constant bound)"
    if graph.shape_of(a.name) != graph.shape_of(b.name):
        return "Caffe Eltwise cannot broadcast"
    return None


# -- weighted layers -----------------------------------------------------------------------
def _check_conv(node: Node, graph: Graph) -> str | None:
    w = node.args.get("weight")
    if not isinstance(w, torch.Tensor):
        return "the weight is computed at run time; Caffe needs constant weights"
    if w.dim() != 4:
        return f"only 2-D convolutions exist in Caffe (weight rank {w.dim()})"
    if isinstance(node.args.get("bias"), Ref):
        return "the bias is computed at run time; Caffe needs constant weights"
    pad = conv_padding(node)
    return pad if isinstance(pad, str) else None


def _check_deconv(node: Node, graph: Graph) -> str | None:
    reason = _check_conv(node, graph)
    if reason:
        return reason
    if any(pair(node.args.get("output_padding", 0), name="output_padding", default=0)):
        return "Caffe Deconvolution has no output_padding"
    if pair(node.args.get("dilation", 1), name="dilation", default=1) != (1, 1):
        return "dilated transposed convolution is not supported by OpenCV's Caffe importer"
    return None


def _check_linear(node: Node, graph: Graph) -> str | None:
    if not isinstance(node.args.get("weight"), torch.Tensor):
        return "the weight is computed at run time; Caffe needs constant weights"
    return None


def _check_bn(node: Node, graph: Graph) -> str | None:
    if node.args.get("training", False):
        return "BatchNorm in training mode; export an eval-mode model"
    if not isinstance(node.args.get("running_mean"), torch.Tensor):
        return "BatchNorm without running statistics cannot be exported"
    return None


# -- pooling -------------------------------------------------------------------------------
def _check_pool(node: Node, graph: Graph) -> str | None:
    shape = in_shape(node, graph)
    if len(shape) != 4:
        return f"Caffe pools 4-D blobs only (got rank {len(shape)})"
    pa = pool_attrs(node)
    if pa.dilation != (1, 1):
        return "Caffe pooling has no dilation"
    if node.op == "avg_pool2d":
        if pa.divisor_override is not None:
            return "avg_pool2d divisor_override has no Caffe equivalent"
        if any(pa.padding) and not pa.count_include_pad:
            return ("Caffe AVE pooling counts the padding; count_include_pad=False with "
                    "padding differs at the borders")
    padded, out = any(pa.padding), node.shape or ()
    for i in range(2):
        want = out[2 + i]
        got = caffe_pool_out(shape[2 + i], pa.kernel[i], pa.stride[i], pa.padding[i])
        if got not in (want, want + 1):
            return f"pooled size {got} in Caffe vs {want} in PyTorch cannot be reconciled"
        bvlc = caffe_pool_out(shape[2 + i], pa.kernel[i], pa.stride[i], pa.padding[i], padded)
        if bvlc != got:
            return (f"BVLC Caffe pools axis {2 + i} to {bvlc} and OpenCV to {got} (padding on "
                    "one axis only, stride over kernel on the other): the file would mean "
                    "two things")
    return None


def _check_adaptive(node: Node, graph: Graph) -> str | None:
    shape = in_shape(node, graph)
    if len(shape) != 4:
        return "adaptive pooling of a non 4-D tensor"
    src, out = adaptive_sizes(node, graph)
    if any(o == 0 or s % o for s, o in zip(src, out)):
        return (f"adaptive pooling {list(src)} -> {list(out)} is not a fixed window; only "
                "output sizes dividing the input are exact in Caffe")
    return None


def _check_reduce(node: Node, graph: Graph) -> str | None:
    if node.args.get("dtype") is not None:
        return "reduction with a dtype change"
    dims, rank = reduce_dims(node, graph)
    if rank == 4 and dims in ([2, 3], [1]):
        return None
    return f"{node.op} over dims {dims} of a rank-{rank} tensor (Caffe: (2,3) or channel only)"


# -- resampling ----------------------------------------------------------------------------
def _check_nearest(node: Node, graph: Graph) -> str | None:
    f = resize_factors(node, graph)
    return f if isinstance(f, str) else None


def _check_bilinear(node: Node, graph: Graph) -> str | None:
    if node.args.get("align_corners"):
        return "bilinear with align_corners=True has no exact BVLC construct"
    return _check_nearest(node, graph)


# -- data movement -------------------------------------------------------------------------
def _check_cat(node: Node, graph: Graph) -> str | None:
    if not all(isinstance(t, Ref) for t in node.args["tensors"]):
        return "concatenation with a constant tensor"
    return None


SPLIT_OPS = ("split", "split_with_sizes", "chunk")


def _check_getitem(node: Node, graph: Graph) -> str | None:
    src = node.args.get("arg0")
    if isinstance(src, Ref):
        try:
            op = graph.node(src.name).op
        except KeyError:
            op = ""
        if op in SPLIT_OPS:
            return None
    return "indexing into a multi-output op other than split/chunk"


def _check_slice(node: Node, graph: Graph) -> str | None:
    spec = slice_spec(node, graph)
    if spec.step != 1:
        return "strided slicing (step != 1) has no Caffe layer"
    if spec.start >= spec.end:
        return "empty slice"
    return None


def _check_pad(node: Node, graph: Graph) -> str | None:
    pads = caffe_pads(node, graph)
    return pads if isinstance(pads, str) else None


def _check_argmax(node: Node, graph: Graph) -> str | None:
    if node.args.get("dim") is None:
        return "argmax over the flattened tensor (give dim=...)"
    return None


def _table() -> dict[str, NodeCheck]:
    groups: list[tuple[tuple[str, ...], NodeCheck]] = [
        (("relu", "leaky_relu", "sigmoid", "tanh", "exp", "abs", "hardsigmoid", "hardswish",
          "silu", "neg", "reciprocal", "sqrt", "rsqrt", "square", "select", "view", "reshape",
          "_unsafe_view", "flatten", "squeeze", "unsqueeze") + SPLIT_OPS, always),
        (("prelu",), _check_prelu),
        (("elu",), _check_elu),
        (("relu6", "hardtanh", "clamp", "clamp_min", "clamp_max"), _check_clamp),
        (("softmax", "_softmax"), _check_softmax),
        (("add", "sub", "mul", "div"), _check_binary),
        (("rsub",), _check_rsub),
        (("pow",), _check_pow),
        (("maximum", "max", "minimum", "min"), _check_same_shape),
        (("conv2d",), _check_conv),
        (("conv_transpose2d",), _check_deconv),
        (("linear",), _check_linear),
        (("batch_norm",), _check_bn),
        (("max_pool2d", "avg_pool2d"), _check_pool),
        (("adaptive_avg_pool2d", "_adaptive_avg_pool2d"), _check_adaptive),
        (("mean", "sum"), _check_reduce),
        (("upsample_nearest2d", "_upsample_nearest_exact2d"), _check_nearest),
        (("upsample_bilinear2d",), _check_bilinear),
        (("cat", "concat"), _check_cat),
        (("getitem",), _check_getitem),
        (("slice",), _check_slice),
        (("pad", "constant_pad_nd"), _check_pad),
        (("argmax",), _check_argmax),
    ]
    return {op: check for ops, check in groups for op in ops}


#: op -> check for every op the Caffe writer lowers
CHECKS: dict[str, NodeCheck] = _table()
