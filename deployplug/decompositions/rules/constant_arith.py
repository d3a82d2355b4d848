"""Elementwise arithmetic a target cannot run as written.

* ``rsub(x, c)`` (``c - alpha * x``) with a per-channel constant, which Caffe's Power cannot
  take, is one affine map per channel: a depthwise 1x1 conv (weight = scale, bias = shift),
  exact. (The same map for add/sub/mul/div is what the writers emit themselves.)
* Two activations whose shapes differ only by a 1x1 map (SE-style ``x * s``): the small one
  is repeated to the map's size by an integer nearest upsample, which targets without
  broadcasting (MsnhNet's varop) have.
* Targets that broadcast only a *product* by a per-channel ``(N, C, 1, 1)`` tensor
  (``limits.broadcast == "channel_product"``: Caffe's two-bottom Scale) but not a sum. There
  ``x - m`` becomes ``x - (x * 0 + 1) * m``: ``x * 0 + 1`` is an
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
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.ops.attrs import channel_vector
from deployplug.profiles import TargetProfile


def _split(node: Node) -> tuple[Ref, object, bool] | None:
    """(activation, constant, activation_first) for a node with exactly one activation."""
    a, b = node.args.get("self"), node.args.get("other")
    if isinstance(a, Ref) and not isinstance(b, Ref):
        return a, b, True
    if isinstance(b, Ref) and not isinstance(a, Ref):
        return b, a, False
    return None


def _affine(node: Node, graph: Graph) -> tuple[torch.Tensor, torch.Tensor] | None:
    split = _split(node)
    if split is None or node.args.get("rounding_mode") is not None:
        return None
    act, const, act_first = split
    shape = graph.shape_of(act.name)
    if len(shape) not in (2, 4) or tuple(node.shape or ()) != tuple(shape):
        return None
    if isinstance(const, torch.Tensor) and not const.is_floating_point():
        return None
    c = channel_vector(const, shape)
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

    #: registered buffers, declared for the type checker
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", scale.to(dtype).reshape(-1, 1, 1, 1).clone())
        self.register_buffer("bias", shift.to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.conv2d(x[:, :, None, None], self.weight, self.bias,
                            groups=self.weight.shape[0]).flatten(1)
        return F.conv2d(x, self.weight, self.bias, groups=self.weight.shape[0])


def _build_affine(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    found = _affine(node, graph)
    assert found is not None
    scale, shift = found
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
        return 1, (sa[2], sa[3])
    if tuple(sa[2:]) == (1, 1):
        return 0, (sb[2], sb[3])
    return None


def _build_broadcast(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    plan = _broadcast_plan(node, graph)
    assert plan is not None
    small, hw = plan
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


def _build_ones(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    plan = _broadcast_plan(node, graph)
    assert plan is not None
    small, _ = plan
    return BroadcastByOnes(node.op, small, float(node.args.get("alpha", 1)))


def _two_distinct_broadcast(node: Node, graph: Graph, target: TargetProfile) -> bool:
    return (target.limits.broadcast == "channel_product" and node.op in ("add", "sub")
            and _broadcast_plan(node, graph) is not None
            and node.args["self"] != node.args["other"])


_ATEN = torch.ops.aten
_MAP = torch.linspace(-3.0, 3.0, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
_FLAT = torch.linspace(-3.0, 3.0, 2 * 3).reshape(2, 3)
_DOT = torch.linspace(0.5, 2.0, 2 * 3).reshape(2, 3, 1, 1)
_PER_CHANNEL = torch.tensor([0.5, -2.0, 3.0]).reshape(3, 1, 1)


def _binary(op: str, *args: object):
    overload = getattr(_ATEN, op).Tensor
    acts = [_MAP, _DOT]
    return lambda: aten_node(overload, acts, *args)


def _constant_examples(op: str):
    """A per-channel constant (what Caffe's scalar-only Power refuses), 4-D and 2-D."""
    overload = getattr(_ATEN, op).Tensor
    return examples(lambda: aten_node(overload, [_MAP], A(0), _PER_CHANNEL),
                    lambda: aten_node(overload, [_FLAT], A(0), _PER_CHANNEL.reshape(3)))


for _op in ("add", "sub"):
    register_rule(name=f"{_op}_broadcast_by_ones", op=_op,
                  check=needs(_two_distinct_broadcast,
                              "a target that broadcasts products only, and two distinct 4-D "
                              "activations with equal N, C, one of them 1x1"),
                  priority=5,
                  description="1x1-map operand spread by (x * 0 + 1) * s (broadcast product)",
                  examples=examples(_binary(_op, A(0), A(1)), _binary(_op, A(1), A(0))))(
        _build_ones)
# Only rsub: a scalar or per-channel constant with add/sub/mul/div is a layer of every
# shipped writer already (Caffe Power/Scale, MsnhNet varop/batchnorm), so a rule for them
# would be a second copy of that composition that no target asks for.
for _op in ("rsub",):
    register_rule(name=f"{_op}_constant_as_channel_affine", op=_op,
                  check=needs(lambda n, g, t: _affine(n, g) is not None,
                              "one activation (2-D or 4-D, not expanded by the constant) and a "
                              "scalar or per-channel constant"),
                  priority=10,
                  description="arithmetic with a scalar/per-channel constant as a 1x1 "
                              "depthwise conv",
                  examples=_constant_examples(_op))(_build_affine)
for _op in ("add", "sub", "mul", "div"):
    register_rule(name=f"{_op}_broadcast_by_upsample", op=_op,
                  check=needs(lambda n, g, t: _broadcast_plan(n, g) is not None,
                              "two 4-D activations with equal N, C, one of them 1x1"),
                  priority=10,
                  description="1x1-map operand repeated by nearest upsample, then elementwise",
                  examples=examples(_binary(_op, A(0), A(1)), _binary(_op, A(1), A(0))))(
        _build_broadcast)
