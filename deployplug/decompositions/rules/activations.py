"""Activations as compositions of ReLU, Sigmoid, Exp, Pow and scalar/elementwise arithmetic.

Every rule here is offered to every target but fires only where the target profile refuses
the op, so a target that has ``hardswish`` keeps it. The compositions use scalar ``add`` and
``mul`` only (no ``sub``/``div``), which map to Caffe's Power/Scale and MsnhNet's constant
ops.

* ``clamp(x, lo, hi)``: ``lo + relu(x - lo)`` then ``hi - relu(hi - y)``; a branch whose
  bound is inactive returns the bound itself (exact), the other rounds once (<= 1 ulp of
  the bound). ``relu6``, ``hardtanh``, ``hardsigmoid`` and ``hardswish`` reduce to it.
* ``silu(x) = x * sigmoid(x)``.
* ``gelu`` (erf form) needs erf, which none of these targets has. Rewritten as
  ``relu(x) - |x|/2 * erfc(|x|/sqrt(2))`` with Abramowitz & Stegun 7.1.26 for erfc on a
  non-negative argument (|error| <= 1.5e-7) and ``|x| = relu(x) + relu(-x)``; the error is
  at most ~1e-7 of max|x|. The tanh form is exactly ``x * sigmoid(2u)``.
* ``mish(x) = x * tanh(softplus(x)) = x - 2x / ((1 + e^x)^2 + 1)``, which stays finite
  when ``e^x`` overflows (the fraction becomes 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.registry import register_rule
from deployplug.decompositions.rules._common import is_number

# Abramowitz & Stegun 7.1.26.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def clamp_by_relu(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    if lo is not None:
        x = torch.relu(x) if lo == 0 else torch.relu(x + (-lo)) + lo
    if hi is not None:
        x = torch.relu(x * -1.0 + hi) * -1.0 + hi
    return x


class Clamp(nn.Module):
    def __init__(self, lo: float | None, hi: float | None):
        super().__init__()
        self.lo = None if lo is None else float(lo)
        self.hi = None if hi is None else float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_by_relu(x, self.lo, self.hi)


class HardSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_by_relu(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


class HardSwish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * clamp_by_relu(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


class SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class GeluErf(nn.Module):
    """GELU (erf form) from ReLU, Exp and Pow; |error| <= ~1e-7 * max|x|."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.relu(x)
        mag = pos + torch.relu(x * -1.0)
        z = mag * (1.0 / math.sqrt(2.0))
        t = torch.pow(z * _P + 1.0, -1.0)
        poly = t * _A[4] + _A[3]
        for a in (_A[2], _A[1], _A[0]):
            poly = poly * t + a
        erfc = poly * t * torch.exp(z * z * -1.0)
        return pos + mag * erfc * -0.5


class GeluTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x * x * x * 0.044715 + x) * (2.0 * math.sqrt(2.0 / math.pi))
        return x * torch.sigmoid(u)


class Mish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.exp(x) + 1.0
        return x + x * torch.pow(u * u + 1.0, -1.0) * -2.0


def _numeric_bounds(node: Node, graph: Graph) -> bool:
    a = node.args
    keys = ("min", "max") if node.op == "clamp" else ("min_val", "max_val")
    return all(a.get(k) is None or is_number(a.get(k)) for k in keys)


def _clamp(node: Node, graph: Graph) -> nn.Module:
    a = node.args
    if node.op == "relu6":
        return Clamp(0.0, 6.0)
    if node.op == "hardtanh":
        return Clamp(a["min_val"], a["max_val"])
    return Clamp(a.get("min"), a.get("max"))


for _op in ("relu6", "hardtanh", "clamp"):
    register_rule(name=f"{_op}_by_relu", op=_op, predicate=_numeric_bounds, priority=10,
                  description="clamp as ReLU with scalar add/mul",
                  requires="constant (numeric) bounds")(_clamp)

register_rule(name="hardsigmoid_by_relu", op="hardsigmoid", priority=10,
              description="clamp(x/6 + 1/2, 0, 1) by ReLU")(lambda n, g: HardSigmoid())
register_rule(name="hardswish_by_relu", op="hardswish", priority=10,
              description="x * hardsigmoid(x) by ReLU")(lambda n, g: HardSwish())
register_rule(name="silu_by_sigmoid", op="silu", priority=10,
              description="x * sigmoid(x)")(lambda n, g: SiLU())
register_rule(name="mish_by_exp", op="mish", priority=10,
              description="x - 2x / ((1 + e^x)^2 + 1)")(lambda n, g: Mish())


@register_rule(name="gelu_by_exp", op="gelu", priority=10,
               description="erf GELU via Abramowitz-Stegun 7.1.26; tanh GELU via sigmoid",
               requires="approximate='none' or 'tanh'")
def build_gelu(node: Node, graph: Graph) -> nn.Module:
    return GeluTanh() if node.args.get("approximate", "none") == "tanh" else GeluErf()
