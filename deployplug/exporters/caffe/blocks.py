"""Small pieces every Caffe layer module builds with.

Argument normalization (pairs, scalars, negative axes), the square-or-H/W parameter spelling
Caffe uses, and the few layers that other lowerings compose from (Power, ReLU, a one-axis
Slice, a batch-preserving Reshape). Kept apart from the per-op modules so that those import
only this and :mod:`.net`, never each other's rules.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deployplug.capture import Graph, Node
from deployplug.exporters.caffe.net import LowerCtx


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(v) == 1:
        v = v * 2
    return int(v[0]), int(v[1])


def hw(prefix: str, v: tuple[int, int], scalar: str, default: int | None = None) -> dict:
    """``kernel_size: 3`` when square, ``kernel_h/kernel_w`` otherwise (``pad``, ``stride``)."""
    if v[0] == v[1]:
        return {} if v[0] == default else {scalar: v[0]}
    return {f"{prefix}_h": v[0], f"{prefix}_w": v[1]}


def in_shape(graph: Graph, node: Node, idx: int = 0) -> tuple[int, ...]:
    return graph.shape_of(node.inputs[idx])


def first(node: Node) -> Any:
    return node.args.get("self", node.args.get("input"))


def scalar(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.reshape(()).item())
    return None


def power(ctx: LowerCtx, node: Node, bottom: str, *, power: float = 1.0, scale: float = 1.0,
           shift: float = 0.0, final: bool = False) -> str:
    params = {}
    for key, val, default in (("power", power, 1.0), ("scale", scale, 1.0), ("shift", shift, 0.0)):
        if val != default:
            params[key] = float(val)
    return ctx.step(node, "Power", [bottom], {"power_param": params}, final=final)


def relu(ctx: LowerCtx, node: Node, bottom: str, final: bool = False) -> str:
    return ctx.step(node, "ReLU", [bottom], final=final)


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


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
