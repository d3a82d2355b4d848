"""Adaptive average pooling and mean/sum over H, W as plain average pooling.

* ``adaptive_avg_pool2d`` to ``(oh, ow)`` with ``H % oh == W % ow == 0`` uses equal,
  non-overlapping bins: exactly ``avg_pool2d(kernel=stride=(H/oh, W/ow))``, which every
  Caffe-family target has. (Output 1 is the global-pooling special case.)
* ``mean``/``sum`` over H and/or W (refused by om, which has no reductions over spatial
  axes) are an average pool over the reduced axes; ``sum`` multiplies by the element count.

Windows over the target's pooling limit are split into stages by the pooling rule on the
next decomposition round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.registry import register_rule
from deployplug.decompositions.rules._common import in_shape, pair


class AvgPoolBins(nn.Module):
    """Average pool with kernel == stride, then an optional reshape and scale."""

    def __init__(self, kernel: tuple[int, int], out_shape: tuple[int, ...], scale: float = 1.0):
        super().__init__()
        self.kernel, self.out_shape, self.scale = tuple(kernel), tuple(out_shape), float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(x, self.kernel, self.kernel)
        if self.scale != 1.0:
            y = y * self.scale
        return y if tuple(y.shape) == self.out_shape else y.reshape(self.out_shape)


def _even_bins(node: Node, graph: Graph) -> bool:
    shape = in_shape(node, graph)
    if len(shape) != 4:
        return False
    oh, ow = node.shape[2:]
    return shape[2] % oh == 0 and shape[3] % ow == 0


@register_rule(name="adaptive_avg_pool2d_as_avg_pool", op="adaptive_avg_pool2d",
               predicate=_even_bins, priority=10,
               description="adaptive average pooling with equal bins as avg_pool2d",
               requires="input H, W divisible by the output size")
def build_adaptive(node: Node, graph: Graph) -> nn.Module:
    h, w = in_shape(node, graph)[2:]
    oh, ow = node.shape[2:]
    return AvgPoolBins((h // oh, w // ow), node.shape)


def _spatial_dims(node: Node, graph: Graph) -> set[int] | None:
    shape = in_shape(node, graph)
    dims = node.args.get("dim")
    if len(shape) != 4 or dims is None or node.args.get("dtype") is not None:
        return None
    axes = {d % 4 for d in pair(dims, 1)} if dims else set()
    return axes if axes and axes <= {2, 3} else None


def _build_reduction(node: Node, graph: Graph) -> nn.Module:
    h, w = in_shape(node, graph)[2:]
    axes = _spatial_dims(node, graph)
    kernel = (h if 2 in axes else 1, w if 3 in axes else 1)
    scale = kernel[0] * kernel[1] if node.op == "sum" else 1.0
    return AvgPoolBins(kernel, node.shape, scale)


for _op in ("mean", "sum"):
    register_rule(name=f"{_op}_hw_as_avg_pool", op=_op,
                  predicate=lambda n, g: _spatial_dims(n, g) is not None, priority=10,
                  description=f"{_op} over H and/or W as an average pool",
                  requires="a 4-D input reduced over H and/or W only, no dtype cast")(
        _build_reduction)
