"""MsnhNet rules that move values between axes: reshape, permute, cat, pad, pixel
(un)shuffle, slice/split, softmax groups, reductions, and constants.

MsnhNet has no tensor names and a fixed (C, H, W) layout, so each of these is lowered to
``view``/``permute``/``route``/``slice`` layers or one-hot convolutions that move exactly the
same elements PyTorch does.
"""

from __future__ import annotations

import numpy as np

from deployplug.capture import Graph, Node, Ref
from deployplug.exporters.msnhnet.emit import (
    Emitter,
    canonical,
)
from deployplug.exporters.msnhnet.rules import (
    CONST_OPS,
    constant_of,
    input_shape,
    norm_dim,
    rule,
    source,
    value_shape,
)


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
        from deployplug.exporters.msnhnet.emit import NeedInputLayer

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
