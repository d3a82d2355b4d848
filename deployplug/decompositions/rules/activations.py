"""GELU and Mish, which neither Caffe nor MsnhNet has, from ReLU, Sigmoid, Exp and Pow.

The rules fire only where the target refuses the op, and use scalar ``add`` and ``mul`` only
(no ``sub``/``div``), which map to Caffe's Power/Scale and MsnhNet's constant ops. The
piecewise-linear activations (relu6, hardtanh, clamp, hardsigmoid, hardswish) and SiLU have
no rule here: every shipped writer expresses them (Caffe composes them from ReLU, Power and
Eltwise in its lowering; MsnhNet has them as activations), so a rule would be a second copy
that no target ever asks for.

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
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import register_rule
from deployplug.profiles import TargetProfile

# Abramowitz & Stegun 7.1.26.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


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


_X = torch.linspace(-6.0, 6.0, 24).reshape(1, 2, 3, 4)
_ATEN = torch.ops.aten

register_rule(name="mish_by_exp", op="mish", priority=10,
              description="x - 2x / ((1 + e^x)^2 + 1)",
              examples=examples(lambda: aten_node(_ATEN.mish.default, [_X], A(0))))(
    lambda n, g, t: Mish())


@register_rule(name="gelu_by_exp", op="gelu", priority=10,
               description="erf GELU via Abramowitz-Stegun 7.1.26; tanh GELU via sigmoid",
               examples=examples(lambda: aten_node(_ATEN.gelu.default, [_X], A(0)),
                                 lambda: aten_node(_ATEN.gelu.default, [_X], A(0),
                                                   approximate="tanh")))
def build_gelu(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    return GeluTanh() if node.args.get("approximate", "none") == "tanh" else GeluErf()
