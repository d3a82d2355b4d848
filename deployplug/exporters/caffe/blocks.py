"""Small pieces every Caffe layer module builds with.

The square-or-H/W parameter spelling Caffe uses, and the few layers that other lowerings
compose from (Power, ReLU, a one-axis Slice, a batch-preserving Reshape). Kept apart from the
per-op modules so that those import only this and :mod:`.net`, never each other's emitters.
Attribute normalisation is :mod:`deployplug.ops.attrs`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deployplug.capture import Node

__all__ = ["first", "hw", "power", "relu", "reshape_to", "slice_axis", "to_np"]
from deployplug.exporters.caffe.net import LowerCtx, hw


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def first(node: Node) -> Any:
    return node.args.get("self", node.args.get("input"))


def power(ctx: LowerCtx, node: Node, bottom: str, *, power: float = 1.0, scale: float = 1.0,
           shift: float = 0.0, final: bool = False) -> str:
    params = {}
    for key, val, default in (("power", power, 1.0), ("scale", scale, 1.0), ("shift", shift, 0.0)):
        if val != default:
            params[key] = float(val)
    return ctx.step(node, "Power", [bottom], {"power_param": params}, final=final)


def relu(ctx: LowerCtx, node: Node, bottom: str, final: bool = False) -> str:
    return ctx.step(node, "ReLU", [bottom], final=final)


def slice_axis(ctx: LowerCtx, node: Node, bottom: str, axis: int, start: int, end: int, size: int,
           final: bool) -> str:
    """Keep ``[start, end)`` of ``axis`` with one Slice layer; the other parts go unused."""
    if start == 0 and end == size:
        if final:
            ctx.alias(node, bottom)
        return bottom
    points = [p for p in (start, end) if 0 < p < size]
    keep = 0 if start == 0 else 1
    name = node.name if final else ctx.fresh(node.name)
    tops = [name if i == keep else ctx.fresh(node.name) for i in range(len(points) + 1)]
    ctx.add(name, "Slice", [bottom], tops,
            {"slice_param": {"axis": axis, "slice_point": points}}, node=node.name)
    if final:
        ctx.value_blobs[node.name] = name
    return name


def reshape_to(ctx: LowerCtx, node: Node, x: str, out: tuple[int, ...],
               src: tuple[int, ...]) -> None:
    """Bind ``node`` to ``x`` reshaped to ``out``: an alias, a Flatten, or a Reshape."""
    if tuple(out) == tuple(src):
        ctx.alias(node, x)
        return
    if len(out) == 2 and len(src) > 2 and out[0] == src[0]:
        ctx.step(node, "Flatten", [x], final=True)
        return
    dims = list(out)
    if dims and src and dims[0] == src[0]:
        dims[0] = 0  # copy the batch axis, like every Caffe net does
    ctx.step(node, "Reshape", [x], {"reshape_param": {"shape": {"dim": dims}}}, final=True)
