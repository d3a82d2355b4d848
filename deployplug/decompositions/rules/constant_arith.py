"""Elementwise arithmetic a target cannot run as written.

* ``x + c``, ``x - c``, ``c - x``, ``x * c``, ``x / c`` with a scalar or per-channel constant
  are one affine map per channel: a depthwise 1x1 conv (weight = scale, bias = shift). It is
  exact for add/sub/mul (``1*x + c``, ``c*x + 0``); division becomes multiplication by the
  reciprocal (one rounding, <= 1 ulp).
* Two activations whose shapes differ only by a 1x1 map (SE-style ``x * s``): the small one
  is repeated to the map's size by an integer nearest upsample, which targets without
  broadcasting (MsnhNet's varop) have.
* Caffe and om broadcast a *product* by a per-channel ``(N, C, 1, 1)`` tensor (two-bottom
  Scale) but not a sum. There ``x - m`` becomes ``x - (x * 0 + 1) * m``: ``x * 0 + 1`` is an
  all-ones map (Caffe Power layers) and the product broadcasts, so no resize is needed
  (cheaper than the upsample: InstanceNorm's mean subtraction is exactly this case).
  ``pow(x, 0)`` would be one layer but measured ~5x slower in onnxruntime. Caveat: an
  inf/NaN pixel of ``x`` makes its ones-entry NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node, Ref
from deployplug.decompositions.registry import register_rule
from deployplug.decompositions.rules._common import is_number

ARITH_OPS = ("add", "sub", "rsub", "mul", "div")


def _split(node: Node) -> tuple[Ref, object, bool] | None:
    """(activation, constant, activation_first) for a node with exactly one activation."""
    a, b = node.args.get("self"), node.args.get("other")
    if isinstance(a, Ref) and not isinstance(b, Ref):
        return a, b, True
    if isinstance(b, Ref) and not isinstance(a, Ref):
        return b, a, False
    return None


def _per_channel(value: object, channels: int, rank: int) -> torch.Tensor | None:
    """The constant as ``channels`` float64 values, if it broadcasts per channel only."""
    if is_number(value):
        return torch.full((channels,), float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor) or value.dim() > rank or not value.is_floating_point():
        return None
    shape = (1,) * (rank - value.dim()) + tuple(value.shape)
    if shape[0] != 1 or any(s != 1 for s in shape[2:]) or shape[1] not in (1, channels):
        return None
    return value.detach().reshape(-1).to(torch.float64).expand(channels).clone()


def _affine(node: Node, graph: Graph) -> tuple[torch.Tensor, torch.Tensor] | None:
    split = _split(node)
    if split is None:
        return None
    act, const, act_first = split
    shape = graph.shape_of(act.name)
    if len(shape) not in (2, 4) or tuple(node.shape or ()) != tuple(shape):
        return None
    c = _per_channel(const, shape[1], len(shape))
    if c is None:
        return None
    alpha = float(node.args.get("alpha", 1))
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if node.op == "mul":
        return c, zero
    if node.op == "div":
        return (1.0 / c, zero) if act_first else None
    if node.op == "add":
        return (one, alpha * c) if act_first else (alpha * one, c)
    if node.op == "sub":
        return (one, -alpha * c) if act_first else (-alpha * one, c)
    if node.op == "rsub":  # rsub(self, other) = other - alpha * self
        return (-alpha * one, c) if act_first else (one, -alpha * c)
    return None


class ChannelAffine(nn.Module):
    """``y = x * scale[c] + shift[c]`` as a depthwise 1x1 convolution."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", scale.to(dtype).reshape(-1, 1, 1, 1).clone())
        self.register_buffer("bias", shift.to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.conv2d(x[:, :, None, None], self.weight, self.bias,
                            groups=self.weight.shape[0]).flatten(1)
        return F.conv2d(x, self.weight, self.bias, groups=self.weight.shape[0])


def _build_affine(node: Node, graph: Graph) -> nn.Module:
    scale, shift = _affine(node, graph)
    return ChannelAffine(scale, shift, node.dtype or torch.float32)


class BroadcastByUpsample(nn.Module):
    """Binary op on a map and a 1x1 map, with the 1x1 operand repeated to full size first."""

    def __init__(self, op: str, small_index: int, hw: tuple[int, int], alpha: float,
                 same_input: bool):
        super().__init__()
        self.op, self.small, self.hw, self.alpha = op, small_index, tuple(hw), alpha
        self.same_input = same_input

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        a, b = (xs[0], xs[0]) if self.same_input else xs
        big = F.interpolate((a, b)[self.small], scale_factor=tuple(float(s) for s in self.hw),
                            mode="nearest")
        a, b = (big, b) if self.small == 0 else (a, big)
        if self.op == "add":
            return a + b * self.alpha if self.alpha != 1 else a + b
        if self.op == "sub":
            return a - b * self.alpha if self.alpha != 1 else a - b
        if self.op == "mul":
            return a * b
        return a / b


def _broadcast_plan(node: Node, graph: Graph) -> tuple[int, tuple[int, int]] | None:
    a, b = node.args.get("self"), node.args.get("other")
    if node.op not in ("add", "sub", "mul", "div") or not (isinstance(a, Ref)
                                                         and isinstance(b, Ref)):
        return None
    sa, sb = graph.shape_of(a.name), graph.shape_of(b.name)
    if len(sa) != 4 or len(sb) != 4 or sa[:2] != sb[:2] or sa == sb:
        return None
    if tuple(sb[2:]) == (1, 1):
        return 1, tuple(sa[2:])
    if tuple(sa[2:]) == (1, 1):
        return 0, tuple(sb[2:])
    return None


def _build_broadcast(node: Node, graph: Graph) -> nn.Module:
    small, hw = _broadcast_plan(node, graph)
    same = node.args["self"] == node.args["other"]
    return BroadcastByUpsample(node.op, small, hw, float(node.args.get("alpha", 1)), same)


class BroadcastByOnes(nn.Module):
    """add/sub of a map and a 1x1 map, the 1x1 operand spread by a broadcasting product."""

    def __init__(self, op: str, small_index: int, alpha: float):
        super().__init__()
        self.op, self.small, self.alpha = op, small_index, alpha

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        big, small = (b, a) if self.small == 0 else (a, b)
        spread = (big * 0.0 + 1.0) * small
        a, b = (spread, b) if self.small == 0 else (a, spread)
        if self.op == "add":
            return a + b * self.alpha if self.alpha != 1 else a + b
        return a - b * self.alpha if self.alpha != 1 else a - b


def _build_ones(node: Node, graph: Graph) -> nn.Module:
    small, _ = _broadcast_plan(node, graph)
    return BroadcastByOnes(node.op, small, float(node.args.get("alpha", 1)))


def _two_distinct_broadcast(node: Node, graph: Graph) -> bool:
    return node.op in ("add", "sub") and _broadcast_plan(node, graph) is not None and (
        node.args["self"] != node.args["other"])


for _op in ("add", "sub"):
    register_rule(name=f"{_op}_broadcast_by_ones", op=_op, predicate=_two_distinct_broadcast,
                  targets=frozenset({"caffe", "om"}), priority=5,
                  description="1x1-map operand spread by (x * 0 + 1) * s (broadcast product)",
                  requires="two distinct 4-D activations with equal N, C, one of them 1x1")(
        _build_ones)
for _op in ARITH_OPS:
    register_rule(name=f"{_op}_constant_as_channel_affine", op=_op,
                  predicate=lambda n, g: _affine(n, g) is not None, priority=10,
                  description="arithmetic with a scalar/per-channel constant as a 1x1 "
                              "depthwise conv",
                  requires=("one activation (2-D or 4-D, not expanded by the constant) and a "
                            "scalar or per-channel constant"))(_build_affine)
for _op in ("add", "sub", "mul", "div"):
    register_rule(name=f"{_op}_broadcast_by_upsample", op=_op,
                  predicate=lambda n, g: _broadcast_plan(n, g) is not None, priority=10,
                  description="1x1-map operand repeated by nearest upsample, then elementwise",
                  requires="two 4-D activations with equal N, C, one of them 1x1")(
        _build_broadcast)
