"""Caffe lowering of ops that move data without computing: reshape, concat, split, slice,
select, pad and argmax.

Separate because these change blob shapes and bindings rather than values: a split binds its
getitem users to the tops of one Slice, reshapes that change nothing alias the input blob,
and zero/constant padding (also asymmetric or negative) becomes an identity depthwise 1x1
Convolution with symmetric pad, Power shifts for a non-zero value, and Slice crops -- or
nothing at all when the pad is folded into the convolutions reading it.
"""

from __future__ import annotations

import numpy as np

from deployplug.capture import Graph, Node, Ref
from deployplug.exporters.caffe.blocks import (
    first,
    hw,
    in_shape,
    norm_dim,
    power,
    reshape_to,
    slice_axis,
)
from deployplug.exporters.caffe.net import LowerCtx, rule


@rule("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze")
def _emit_reshape(ctx: LowerCtx, node: Node) -> None:
    reshape_to(ctx, node, ctx.blob(first(node)), tuple(node.shape), in_shape(ctx.graph, node))


def _check_cat(node: Node, graph: Graph, dialect: str) -> str | None:
    if not all(isinstance(t, Ref) for t in node.args["tensors"]):
        return "concatenation with a constant tensor"
    return None


@rule("cat", "concat", check=_check_cat)
def _emit_cat(ctx: LowerCtx, node: Node) -> None:
    refs = node.args["tensors"]
    rank = len(node.shape)
    axis = norm_dim(int(node.args.get("dim", 0)), rank)
    blobs = [ctx.blob(r) for r in refs]
    if len(blobs) == 1:
        ctx.alias(node, blobs[0])
        return
    ctx.step(node, "Concat", blobs, {"concat_param": {"axis": axis}}, final=True)


@rule("split", "split_with_sizes", "chunk")
def _emit_split(ctx: LowerCtx, node: Node) -> None:
    src = in_shape(ctx.graph, node)
    axis = norm_dim(int(node.args.get("dim", 0)), len(src))
    sizes = [s[axis] for s in node.shapes]
    points = list(np.cumsum(sizes)[:-1])
    users = {int(n.args["arg1"]): n for n in ctx.graph.consumers(node.name) if n.op == "getitem"}
    tops = []
    for i in range(len(sizes)):
        tops.append(users[i].name if i in users else ctx.fresh(node.name))
    ctx.add(node.name, "Slice", [ctx.blob(first(node))], tops,
            {"slice_param": {"axis": axis, "slice_point": [int(p) for p in points]}},
            node=node.name)
    for i, user in users.items():
        ctx.value_blobs[user.name] = tops[i]


def _check_getitem(node: Node, graph: Graph, dialect: str) -> str | None:
    src = node.args.get("arg0")
    if isinstance(src, Ref):
        try:
            op = graph.node(src.name).op
        except KeyError:
            op = ""
        if op in ("split", "split_with_sizes", "chunk"):
            return None
    return "indexing into a multi-output op other than split/chunk"


@rule("getitem", check=_check_getitem)
def _emit_getitem(ctx: LowerCtx, node: Node) -> None:
    if node.name not in ctx.value_blobs:  # the Slice of the split binds it
        raise AssertionError(f"split output {node.name} was not bound")


def _slice_bounds(node: Node, graph: Graph) -> tuple[int, int, int, int]:
    src = in_shape(graph, node)
    axis = norm_dim(int(node.args.get("dim", 0)), len(src))
    size = src[axis]
    start, end = node.args.get("start"), node.args.get("end")
    start = 0 if start is None else int(start)
    end = size if end is None else int(end)
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(start, min(size, end + size if end < 0 else end))
    return axis, start, end, size


def _check_slice(node: Node, graph: Graph, dialect: str) -> str | None:
    if int(node.args.get("step", 1)) != 1:
        return "strided slicing (step != 1) has no Caffe layer"
    axis, start, end, size = _slice_bounds(node, graph)
    if start >= end:
        return "empty slice"
    return None


@rule("slice", check=_check_slice)
def _emit_slice(ctx: LowerCtx, node: Node) -> None:
    axis, start, end, size = _slice_bounds(node, ctx.graph)
    slice_axis(ctx, node, ctx.blob(first(node)), axis, start, end, size, final=True)


@rule("select")
def _emit_select(ctx: LowerCtx, node: Node) -> None:
    src = in_shape(ctx.graph, node)
    axis = norm_dim(int(node.args["dim"]), len(src))
    idx = int(node.args["index"])
    idx = idx + src[axis] if idx < 0 else idx
    kept = list(src)
    kept[axis] = 1
    x = slice_axis(ctx, node, ctx.blob(first(node)), axis, idx, idx + 1, src[axis], final=False)
    reshape_to(ctx, node, x, tuple(node.shape), tuple(kept))


def pad_amounts(node: Node, graph: Graph) -> tuple[list[int], float] | str:
    if node.args.get("mode", "constant") != "constant":
        return f"padding mode '{node.args['mode']}' (Caffe pads with constants only)"
    pad = [int(p) for p in node.args["pad"]]
    rank = len(in_shape(graph, node))
    if rank != 4 or any(pad[4:]):
        return "padding along the channel or batch axis has no Caffe layer"
    pad = (pad + [0, 0, 0, 0])[:4]
    value = node.args.get("value")
    return pad, 0.0 if value is None else float(value)


def foldable_pads(graph: Graph) -> dict[str, tuple[Ref, tuple[int, int]]]:
    """Symmetric zero pads read only by convolutions: they become the convolutions' pad."""
    out = {}
    for node in graph.nodes:
        if node.op not in ("pad", "constant_pad_nd") or node.name in graph.outputs:
            continue
        pads = pad_amounts(node, graph)
        if isinstance(pads, str) or pads[1] != 0.0:
            continue
        left, right, top, bottom = pads[0]
        users = graph.consumers(node.name)
        if left != right or top != bottom or min(left, top) < 0 or not users:
            continue
        if all(u.op == "conv2d" and first(u) == Ref(node.name) for u in users):
            out[node.name] = (first(node), (top, left))
    return out


@rule("pad", "constant_pad_nd",
      check=lambda n, g, d: r if isinstance(r := pad_amounts(n, g), str) else None)
def _emit_pad(ctx: LowerCtx, node: Node) -> None:
    if node.name in ctx.folded:
        return  # the consuming convolutions pad by themselves
    pads, value = pad_amounts(node, ctx.graph)
    left, right, top, bottom = pads
    shape = in_shape(ctx.graph, node)
    ph, pw = max(top, bottom, 0), max(left, right, 0)
    h, w = shape[2] + 2 * ph, shape[3] + 2 * pw
    crop_h = (ph - top, h - (ph - bottom))
    crop_w = (pw - left, w - (pw - right))
    need_h, need_w = crop_h != (0, h), crop_w != (0, w)
    x = ctx.blob(first(node))
    if ph or pw:
        last = not (value or need_h or need_w)
        if value:
            x = power(ctx, node, x, shift=-value)
        c = shape[1]
        x = ctx.step(node, "Convolution", [x], {"convolution_param": {
            "num_output": c, "bias_term": False, "kernel_size": 1, "group": c,
            **hw("pad", (ph, pw), "pad", 0)}}, [np.ones((c, 1, 1, 1), np.float32)], final=last)
        if value:
            x = power(ctx, node, x, shift=value, final=not (need_h or need_w))
    if need_h:
        x = slice_axis(ctx, node, x, 2, crop_h[0], crop_h[1], h, final=not need_w)
    if need_w:
        x = slice_axis(ctx, node, x, 3, crop_w[0], crop_w[1], w, final=True)
    if node.name not in ctx.value_blobs:
        ctx.alias(node, x)


def _check_argmax(node: Node, graph: Graph, dialect: str) -> str | None:
    if node.args.get("dim") is None:
        return "argmax over the flattened tensor (give dim=...)"
    return None


@rule("argmax", check=_check_argmax)
def _emit_argmax(ctx: LowerCtx, node: Node) -> None:
    src = in_shape(ctx.graph, node)
    axis = norm_dim(int(node.args["dim"]), len(src))
    keep = bool(node.args.get("keepdim", False))
    x = ctx.step(node, "ArgMax", [ctx.blob(first(node))],
                 {"argmax_param": {"axis": axis, "top_k": 1}}, final=keep)
    if not keep:
        kept = list(src)
        kept[axis] = 1
        reshape_to(ctx, node, x, tuple(node.shape), tuple(kept))
