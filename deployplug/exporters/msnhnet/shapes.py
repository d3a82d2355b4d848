"""MsnhNet rules that move values between axes: reshape, permute, cat, pad, pixel
(un)shuffle, slice/split, softmax groups, reductions, and constants.

MsnhNet has no tensor names and a fixed (C, H, W) layout, so each of these is lowered to
``view``/``permute``/``route``/``slice`` layers or one-hot convolutions that move exactly the
same elements PyTorch does.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from deployplug.capture import Graph, Node
from deployplug.errors import OpAttributeError
from deployplug.exporters.msnhnet.emit import Emitter, canonical
from deployplug.exporters.msnhnet.rules import CONST_OPS, rule, source, value_shape
from deployplug.ops.attrs import in_shape, norm_dim, pad_spec, slice_spec
from deployplug.profiles.msnhnet_checks import (
    SPLIT_OPS,
    msnh_reduce_dims,
    permutation,
    softmax_groups,
    split_bounds,
)

_T = TypeVar("_T")


def _accepted(node: Node, found: _T | str) -> _T:
    """What the target's check computed for ``node``; the reason it gave, as an error.

    The check accepted the node before lowering, so a reason here means the two disagree: it
    is reported, never iterated or unpacked as if it were the value.
    """
    if isinstance(found, str):
        raise OpAttributeError(f"{node.name} ({node.op} at '{node.where}'): {found}")
    return found


# -- shape ops ------------------------------------------------------------------------
@rule("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze")
def _lower_reshape(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    src = source(node)
    target = canonical(node.out_shape)
    if em.shapes[src] == target:
        return src
    em.view(src, target)
    return None


@rule("permute", "transpose")
def _lower_permute(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    perm = _accepted(node, permutation(node, graph))
    src = source(node)
    if perm == (0, 1, 2):
        return src
    em.permute(src, perm)
    return None


@rule("cat", "concat")
def _lower_cat(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    rank = len(node.out_shape)
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
        em.permute(name, swap)
        idx.append(em.last)
    em.emit("route", [("layers", ",".join(map(str, idx)))])
    em.emit("permute", [("dim0", swap[0]), ("dim1", swap[1]), ("dim2", swap[2])])
    return None


@rule("pad", "constant_pad_nd")
def _lower_pad(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    spec = pad_spec(node, graph)
    left, right, top, down = spec.spatial
    em.use(source(node))
    em.emit("padding", [("top", top), ("down", down), ("left", left), ("right", right),
                        ("paddingVal", spec.value)])
    return None


def _shuffle_weight(channels: int, factor: int) -> np.ndarray:
    """W[c*f*f + i*f + j, c, i, j] = 1: the one-hot kernel behind (un)shuffling."""
    weight = np.zeros((channels * factor * factor, channels, factor, factor), np.float32)
    for c in range(channels):
        for i in range(factor):
            for j in range(factor):
                weight[c * factor * factor + i * factor + j, c, i, j] = 1.0
    return weight


@rule("pixel_shuffle")
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


@rule("pixel_unshuffle")
def _lower_pixel_unshuffle(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    f = int(node.args["downscale_factor"])
    src = source(node)
    c = em.shapes[src][0]
    em.use(src)
    em.emit("conv", [("filters", c * f * f), ("kSize", f), ("stride", f), ("padding", 0),
                     ("useBias", 0)], [_shuffle_weight(c, f)])
    return None


@rule("slice")
def _lower_slice(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    spec = slice_spec(node, graph)
    src = source(node)
    if spec.whole:
        return src
    em.slice_axis(src, spec.dim - 1, spec.start, spec.end, spec.step)
    return None


@rule(*SPLIT_OPS)
def _lower_split(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    return False  # the pieces are produced by their getitem nodes


@rule("getitem")
def _lower_getitem(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    producer = graph.node(node.args["arg0"].name)
    dim, bounds = split_bounds(producer, graph)
    start, end = bounds[int(node.args["arg1"])]
    src = source(producer)
    if start == 0 and end == value_shape(graph, src)[dim]:
        return src
    em.slice_axis(src, dim - 1, start, end, 1)
    return None


@rule("softmax", "_softmax")
def _lower_softmax(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    em.use(source(node))
    em.emit("softmax", [("groups", softmax_groups(node, graph))])
    return None


@rule("mean", "sum")
def _lower_reduce(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    dims = _accepted(node, msnh_reduce_dims(node, graph))
    src = source(node)
    shape = list(em.shapes[src])
    rank = len(in_shape(node, graph))
    em.use(src)
    if node.op == "mean" and rank == 4 and dims == [2, 3]:
        em.emit("globalavgpool")
        shape[1] = shape[2] = 1
    else:
        for d in dims:
            em.emit("reduction", [("type", node.op), ("axis", d - 1)])
            shape[d - 1] = 1
    target = canonical(node.out_shape)
    if tuple(shape) != target:
        tmp = em.temp((shape[0], shape[1], shape[2]))
        em.view(tmp, target)
    return None


@rule(*CONST_OPS)
def _lower_const(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    return False  # constants are folded into the ops that read them
