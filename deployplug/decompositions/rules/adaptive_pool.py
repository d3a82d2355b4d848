"""Adaptive average pooling and mean/sum over H, W as plain average pooling.

* ``adaptive_avg_pool2d`` to ``(oh, ow)`` with ``H % oh == W % ow == 0`` uses equal,
  non-overlapping bins: exactly ``avg_pool2d(kernel=stride=(H/oh, W/ow))``, which every
  Caffe-family target has. (Output 1 is the global-pooling special case.)
* ``mean``/``sum`` over H and/or W (refused by om, which has no reductions over spatial
  axes) are an average pool over the reduced axes; ``sum`` multiplies by the element count.

Windows over the target's pooling limit are split into stages by the pooling rule on the
next decomposition round. Which targets lack a spatial reduction is their business
(``limits.spatial_reductions``); these rules only say how.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.errors import OpAttributeError
from deployplug.ops.attrs import in_shape, reduce_dims
from deployplug.profiles import TargetProfile

_ATEN = torch.ops.aten
_MAP = torch.arange(2 * 48 * 48, dtype=torch.float32).reshape(1, 2, 48, 48)


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


def _even_bins(node: Node, graph: Graph, target: TargetProfile) -> bool:
    shape = in_shape(node, graph)
    if len(shape) != 4:
        return False
    oh, ow = node.out_shape[2:]
    return shape[2] % oh == 0 and shape[3] % ow == 0


@register_rule(name="adaptive_avg_pool2d_as_avg_pool", op="adaptive_avg_pool2d",
               check=needs(_even_bins, "input H, W divisible by the output size"), priority=10,
               description="adaptive average pooling with equal bins as avg_pool2d",
               examples=examples(
                   lambda: aten_node(_ATEN.adaptive_avg_pool2d.default, [_MAP], A(0), [1, 1]),
                   lambda: aten_node(_ATEN.adaptive_avg_pool2d.default, [_MAP], A(0), [2, 1])))
def build_adaptive(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    h, w = in_shape(node, graph)[2:]
    oh, ow = node.out_shape[2:]
    return AvgPoolBins((h // oh, w // ow), node.out_shape)


def _spatial_dims(node: Node, graph: Graph) -> set[int] | None:
    shape = in_shape(node, graph)
    dims = node.args.get("dim")
    if len(shape) != 4 or not dims or node.args.get("dtype") is not None:
        return None
    axes = set(reduce_dims(node, graph)[0])
    return axes if axes <= {2, 3} else None


def _build_reduction(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    h, w = in_shape(node, graph)[2:]
    axes = _spatial_dims(node, graph)
    if axes is None:  # the rule's check admits only reductions over H and/or W
        raise OpAttributeError(f"{node.name} ({node.op} at '{node.where}'): not a reduction "
                               "over the spatial axes only")
    kernel = (h if 2 in axes else 1, w if 3 in axes else 1)
    scale = kernel[0] * kernel[1] if node.op == "sum" else 1.0
    return AvgPoolBins(kernel, node.out_shape, scale)


def _reduction_examples(op: str):
    overload = _ATEN.mean.dim if op == "mean" else _ATEN.sum.dim_IntList
    return examples(lambda: aten_node(overload, [_MAP], A(0), [2, 3], True),
                    lambda: aten_node(overload, [_MAP], A(0), [-1]))


for _op in ("mean", "sum"):
    register_rule(name=f"{_op}_hw_as_avg_pool", op=_op,
                  check=needs(lambda n, g, t: _spatial_dims(n, g) is not None,
                              "a 4-D input reduced over H and/or W only, no dtype cast"),
                  priority=10, description=f"{_op} over H and/or W as an average pool",
                  examples=_reduction_examples(_op))(_build_reduction)
