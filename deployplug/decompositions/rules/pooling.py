"""Pooling windows larger than a target allows, as a chain of smaller poolings.

The limit is the target's ``limits.max_pool_window`` (om: 32); a target without one never
needs these rules.

* Max pooling is always decomposable: the max over a window of ``k`` equals the max over
  ``n`` sub-windows of size ``a`` whose starts are ``d`` apart, provided they cover it
  (``(n - 1) * d + a == k``, ``d <= a``). Stage 1 pools ``a`` with stride ``d`` (``d`` divides
  the stride ``s``), stage 2 pools ``n`` with stride ``s / d``. If ``n`` is still too large
  the next decomposition round splits stage 2 again.
* Average pooling is exact as a chain only when windows tile (``stride == kernel``) and the
  kernel factors into parts within the limit: a mean of equal-size means.

Every chain ends in an explicit crop to PyTorch's floor-mode output size. Caffe rounds
pooling outputs up; any extra windows that rounding adds are at the end of each axis, never
read by the next stage, and removed by the crop, so the rounding mode cannot change shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.decompositions.rules._common import split_factors
from deployplug.ops.attrs import PoolAttrs, in_shape, pool_attrs
from deployplug.ops.sizes import torch_pool_out
from deployplug.profiles import TargetProfile


def _limit(target: TargetProfile) -> int | None:
    return target.limits.max_pool_window


def _rounding_agrees(node: Node, graph: Graph, pa: PoolAttrs) -> bool:
    """Ceil mode is accepted only where it gives the floor-mode size anyway."""
    if not pa.ceil_mode:
        return True
    return tuple(node.out_shape[2:]) == tuple(
        torch_pool_out(n, k, s, p) for n, k, s, p in zip(in_shape(node, graph)[2:], pa.kernel,
                                                          pa.stride, pa.padding))


class PoolChain(nn.Module):
    """A sequence of 2-D poolings followed by a crop to the original output size."""

    def __init__(self, kind: str, stages: list[dict], out_hw: Sequence[int]):
        super().__init__()
        self.kind, self.stages, self.out_hw = kind, stages, tuple(out_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for st in self.stages:
            if self.kind == "max":
                x = F.max_pool2d(x, st["kernel"], st["stride"], st["padding"])
            else:
                x = F.avg_pool2d(x, st["kernel"], st["stride"], st["padding"],
                                 count_include_pad=st["count_include_pad"])
        return x[:, :, : self.out_hw[0], : self.out_hw[1]]


def _max_axis(k: int, s: int, p: int, limit: int) -> tuple[int, int, int, int] | None:
    """(a, d, n, s2) for one axis, or ``None`` when no split keeps the padding legal."""
    if k <= limit:
        return k, s, 1, 1
    best = None
    for d in sorted((d for d in range(1, min(s, limit) + 1) if s % d == 0), reverse=True):
        for a in range(limit, d - 1, -1):
            if (k - a) % d == 0 and 2 * p <= a:
                n = (k - a) // d + 1
                if best is None or n < best[2]:
                    best = (a, d, n, s // d)
                break
    return best


def _max_plan(node: Node, graph: Graph, target: TargetProfile) -> list[dict] | None:
    limit = _limit(target)
    pa = pool_attrs(node)
    kernel, stride, padding = pa.kernel, pa.stride, pa.padding
    if limit is None or len(in_shape(node, graph)) != 4 or max(kernel) <= limit:
        return None
    if any(d != 1 for d in pa.dilation) or not _rounding_agrees(node, graph, pa):
        return None
    axes = [_max_axis(k, s, p, limit) for k, s, p in zip(kernel, stride, padding)]
    if any(ax is None for ax in axes):
        return None
    (ah, dh, nh, sh), (aw, dw, nw, sw) = [ax for ax in axes if ax is not None]
    return [
        {"kernel": (ah, aw), "stride": (dh, dw), "padding": tuple(padding)},
        {"kernel": (nh, nw), "stride": (sh, sw), "padding": (0, 0)},
    ]


_ATEN = torch.ops.aten
_BIG = torch.arange(2 * 96 * 96, dtype=torch.float32).reshape(1, 2, 96, 96)


@register_rule(name="max_pool2d_split", op="max_pool2d",
               check=needs(lambda n, g, t: _max_plan(n, g, t) is not None,
                           "a kernel over the target's window limit, dilation 1, padding at "
                           "most half of a sub-window, floor rounding (or ceil giving the "
                           "same size)"),
               priority=10, description="large max-pool window as max of covering sub-windows",
               examples=examples(lambda: aten_node(_ATEN.max_pool2d.default, [_BIG], A(0),
                                                   [40, 40], [3, 3], [1, 1])))
def build_max_pool(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    plan = _max_plan(node, graph, target)
    assert plan is not None
    return PoolChain("max", plan, node.out_shape[2:])


def _avg_plan(node: Node, graph: Graph, target: TargetProfile) -> list[dict] | None:
    limit = _limit(target)
    pa = pool_attrs(node)
    kernel, stride, padding = pa.kernel, pa.stride, pa.padding
    if limit is None or len(in_shape(node, graph)) != 4 or max(kernel) <= limit:
        return None
    if pa.divisor_override is not None or not _rounding_agrees(node, graph, pa):
        return None
    per_axis = []
    for k, s, p in zip(kernel, stride, padding):
        if k <= limit:
            per_axis.append([(k, s, p)])
            continue
        parts = split_factors(k, limit)
        if s != k or p != 0 or parts is None:
            return None
        per_axis.append([(f, f, 0) for f in parts])
    depth = max(len(ax) for ax in per_axis)
    for ax in per_axis:
        ax.extend([(1, 1, 0)] * (depth - len(ax)))
    include = pa.count_include_pad
    return [
        {"kernel": (h[0], w[0]), "stride": (h[1], w[1]), "padding": (h[2], w[2]),
         "count_include_pad": include}
        for h, w in zip(*per_axis)
    ]


@register_rule(name="avg_pool2d_split", op="avg_pool2d",
               check=needs(lambda n, g, t: _avg_plan(n, g, t) is not None,
                           "on each axis with a kernel over the target's window limit: stride "
                           "== kernel, no padding and a kernel that factors into parts within "
                           "the limit"),
               priority=10,
               description="large tiling average pool as a chain of smaller tiling pools",
               examples=examples(lambda: aten_node(_ATEN.avg_pool2d.default, [_BIG], A(0),
                                                   [48, 48], [48, 48])))
def build_avg_pool(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    plan = _avg_plan(node, graph, target)
    assert plan is not None
    return PoolChain("avg", plan, node.out_shape[2:])
