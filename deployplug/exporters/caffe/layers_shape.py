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
from deployplug.exporters.caffe.blocks import first, hw, power, reshape_to, slice_axis
from deployplug.exporters.caffe.net import LowerCtx, rule
from deployplug.ops.attrs import in_shape, norm_dim, slice_spec
from deployplug.profiles.caffe_checks import caffe_pads


@rule("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze")
def _emit_reshape(ctx: LowerCtx, node: Node) -> None:
    reshape_to(ctx, node, ctx.blob(first(node)), node.out_shape, in_shape(node, ctx.graph))


@rule("cat", "concat")
def _emit_cat(ctx: LowerCtx, node: Node) -> None:
    refs = node.args["tensors"]
    rank = len(node.out_shape)
    axis = norm_dim(int(node.args.get("dim", 0)), rank)
    blobs = [ctx.blob(r) for r in refs]
    if len(blobs) == 1:
        ctx.alias(node, blobs[0])
        return
    ctx.step(node, "Concat", blobs, {"concat_param": {"axis": axis}}, final=True)


@rule("split", "split_with_sizes", "chunk")
def _emit_split(ctx: LowerCtx, node: Node) -> None:
    src = in_shape(node, ctx.graph)
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


@rule("getitem")
def _emit_getitem(ctx: LowerCtx, node: Node) -> None:
    if node.name not in ctx.value_blobs:  # the Slice of the split binds it
        raise AssertionError(f"split output {node.name} was not bound")


@rule("slice")
def _emit_slice(ctx: LowerCtx, node: Node) -> None:
    spec = slice_spec(node, ctx.graph)
    slice_axis(ctx, node, ctx.blob(first(node)), spec.dim, spec.start, spec.end, spec.size,
               final=True)


@rule("select")
def _emit_select(ctx: LowerCtx, node: Node) -> None:
    src = in_shape(node, ctx.graph)
    axis = norm_dim(int(node.args["dim"]), len(src))
    idx = int(node.args["index"])
    idx = idx + src[axis] if idx < 0 else idx
    kept = list(src)
    kept[axis] = 1
    x = slice_axis(ctx, node, ctx.blob(first(node)), axis, idx, idx + 1, src[axis], final=False)
    reshape_to(ctx, node, x, node.out_shape, tuple(kept))


def foldable_pads(graph: Graph) -> dict[str, tuple[Ref, tuple[int, int]]]:
    """Symmetric zero pads read only by convolutions: they become the convolutions' pad."""
    out = {}
    for node in graph.nodes:
        if node.op not in ("pad", "constant_pad_nd") or node.name in graph.outputs:
            continue
        pads = caffe_pads(node, graph)
        if isinstance(pads, str) or pads[1] != 0.0:
            continue
        left, right, top, bottom = pads[0]
        users = graph.consumers(node.name)
        if left != right or top != bottom or min(left, top) < 0 or not users:
            continue
        if all(u.op == "conv2d" and first(u) == Ref(node.name) for u in users):
            out[node.name] = (first(node), (top, left))
    return out


@rule("pad", "constant_pad_nd")
def _emit_pad(ctx: LowerCtx, node: Node) -> None:
    if node.name in ctx.folded:
        return  # the consuming convolutions pad by themselves
    found = caffe_pads(node, ctx.graph)
    assert not isinstance(found, str), found  # the target refused it before lowering
    pads, value = found
    left, right, top, bottom = pads
    shape = in_shape(node, ctx.graph)
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


@rule("argmax")
def _emit_argmax(ctx: LowerCtx, node: Node) -> None:
    src = in_shape(node, ctx.graph)
    axis = norm_dim(int(node.args["dim"]), len(src))
    keep = bool(node.args.get("keepdim", False))
    x = ctx.step(node, "ArgMax", [ctx.blob(first(node))],
                 {"argmax_param": {"axis": axis, "top_k": 1}}, final=keep)
    if not keep:
        kept = list(src)
        kept[axis] = 1
        reshape_to(ctx, node, x, node.out_shape, tuple(kept))
