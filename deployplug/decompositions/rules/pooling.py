"""Pooling windows larger than a target allows (om: 32), as a chain of smaller poolings.

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

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.registry import register_rule
from deployplug.decompositions.rules._common import in_shape, pair, split_factors

KERNEL_LIMIT = 32


def _attrs(node: Node) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    a = node.args
    kernel = pair(a["kernel_size"])
    stride = pair(a["stride"]) if a.get("stride") else kernel
    return kernel, stride, pair(a.get("padding", 0))


def _floor_out(length: int, k: int, s: int, p: int) -> int:
    return (length + 2 * p - k) // s + 1


def _rounding_agrees(node: Node, graph: Graph) -> bool:
    """Ceil mode is accepted only where it gives the floor-mode size anyway."""
    if not node.args.get("ceil_mode", False):
        return True
    kernel, stride, padding = _attrs(node)
    return tuple(node.shape[2:]) == tuple(
        _floor_out(n, k, s, p) for n, k, s, p in zip(in_shape(node, graph)[2:], kernel, stride,
                                                     padding))


class PoolChain(nn.Module):
    """A sequence of 2-D poolings followed by a crop to the original output size."""

    def __init__(self, kind: str, stages: list[dict], out_hw: tuple[int, int]):
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


def _max_axis(k: int, s: int, p: int) -> tuple[int, int, int, int] | None:
    """(a, d, n, s2) for one axis, or ``None`` when no split keeps the padding legal."""
    if k <= KERNEL_LIMIT:
        return k, s, 1, 1
    best = None
    for d in sorted((d for d in range(1, min(s, KERNEL_LIMIT) + 1) if s % d == 0), reverse=True):
        for a in range(KERNEL_LIMIT, d - 1, -1):
            if (k - a) % d == 0 and 2 * p <= a:
                n = (k - a) // d + 1
                if best is None or n < best[2]:
                    best = (a, d, n, s // d)
                break
    return best


def _max_plan(node: Node, graph: Graph) -> list[dict] | None:
    kernel, stride, padding = _attrs(node)
    if len(in_shape(node, graph)) != 4 or max(kernel) <= KERNEL_LIMIT:
        return None
    if any(d != 1 for d in pair(node.args.get("dilation", 1))) or not _rounding_agrees(node, graph):
        return None
    axes = [_max_axis(k, s, p) for k, s, p in zip(kernel, stride, padding)]
    if any(ax is None for ax in axes):
        return None
    (ah, dh, nh, sh), (aw, dw, nw, sw) = axes
    return [
        {"kernel": (ah, aw), "stride": (dh, dw), "padding": tuple(padding)},
        {"kernel": (nh, nw), "stride": (sh, sw), "padding": (0, 0)},
    ]


@register_rule(name="max_pool2d_split", op="max_pool2d",
               predicate=lambda n, g: _max_plan(n, g) is not None, priority=10,
               description="large max-pool window as max of covering sub-windows",
               requires=(f"a kernel over {KERNEL_LIMIT}, dilation 1, padding at most half "
                         f"of a sub-window, floor rounding (or ceil giving the same size)"))
def build_max_pool(node: Node, graph: Graph) -> nn.Module:
    return PoolChain("max", _max_plan(node, graph), node.shape[2:])


def _avg_plan(node: Node, graph: Graph) -> list[dict] | None:
    kernel, stride, padding = _attrs(node)
    a = node.args
    if len(in_shape(node, graph)) != 4 or max(kernel) <= KERNEL_LIMIT:
        return None
    if a.get("divisor_override") is not None or not _rounding_agrees(node, graph):
        return None
    per_axis = []
    for k, s, p in zip(kernel, stride, padding):
        if k <= KERNEL_LIMIT:
            per_axis.append([(k, s, p)])
            continue
        parts = split_factors(k, KERNEL_LIMIT)
        if s != k or p != 0 or parts is None:
            return None
        per_axis.append([(f, f, 0) for f in parts])
    depth = max(len(ax) for ax in per_axis)
    for ax in per_axis:
        ax.extend([(1, 1, 0)] * (depth - len(ax)))
    include = bool(a.get("count_include_pad", True))
    return [
        {"kernel": (h[0], w[0]), "stride": (h[1], w[1]), "padding": (h[2], w[2]),
         "count_include_pad": include}
        for h, w in zip(*per_axis)
    ]


@register_rule(name="avg_pool2d_split", op="avg_pool2d",
               predicate=lambda n, g: _avg_plan(n, g) is not None, priority=10,
               description="large tiling average pool as a chain of smaller tiling pools",
               requires=(f"on each axis with a kernel over {KERNEL_LIMIT}: stride == kernel, "
                         f"no padding and a kernel that factors into parts <= {KERNEL_LIMIT}"))
def build_avg_pool(node: Node, graph: Graph) -> nn.Module:
    return PoolChain("avg", _avg_plan(node, graph), node.shape[2:])
