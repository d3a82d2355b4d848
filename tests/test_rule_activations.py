"""Activations a target lacks as ReLU/Sigmoid/Exp/Pow compositions (within 1e-5, most exact)."""

import pytest
import torch
import torch.nn.functional as F
from decompose_harness import A, check_aten, check_module, refusing
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.capture import capture
from deployplug.decompositions import choose_rule, decompose
from deployplug.decompositions.rules.activations import GeluErf

aten = torch.ops.aten
CASES = {
    "relu6": (aten.relu6.default, ()),
    "hardtanh": (aten.hardtanh.default, (-1.5, 2.25)),
    "clamp": (aten.clamp.default, (-0.5, 3.0)),
    "hardsigmoid": (aten.hardsigmoid.default, ()),
    "hardswish": (aten.hardswish.default, ()),
    "silu": (aten.silu.default, ()),
    "gelu": (aten.gelu.default, ()),
    "mish": (aten.mish.default, ()),
}
RULES = {"relu6": "relu6_by_relu", "hardtanh": "hardtanh_by_relu", "clamp": "clamp_by_relu",
         "hardsigmoid": "hardsigmoid_by_relu", "hardswish": "hardswish_by_relu",
         "silu": "silu_by_sigmoid", "gelu": "gelu_by_exp", "mish": "mish_by_exp"}


@pytest.mark.parametrize("op", ["relu6", "hardtanh", "clamp", "hardsigmoid"])
@settings(max_examples=200, deadline=None)
@given(scale=st.sampled_from([0.5, 3.0, 10.0, 60.0]), c=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_piecewise_linear_activation(op, scale, c, seed):
    x = torch.randn(2, c, 3, 5, generator=torch.Generator().manual_seed(seed)) * scale
    overload, extra = CASES[op]
    check_aten(RULES[op], overload, [x], A(0), *extra)


@settings(max_examples=40, deadline=None)
@given(st.floats(-3, 3), st.one_of(st.none(), st.floats(-3, 3)), st.integers(0, 2**16))
def test_clamp_one_sided_and_bounds(lo, hi, seed):
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed)) * 4
    if hi is not None and hi < lo:
        lo, hi = hi, lo
    check_aten("clamp_by_relu", aten.clamp.default, [x], A(0), lo, hi)


def test_gelu_tanh_and_extreme_inputs():
    x = torch.tensor([[-1e4, -88.0, -30.0, -5.0, -1e-6, 0.0, 1e-6, 5.0, 30.0, 88.0, 1e4]])
    x = x.view(1, 1, 1, -1)
    check_aten("gelu_by_exp", aten.gelu.default, [x * 1e-3], A(0), approximate="tanh")
    check_aten("gelu_by_exp", aten.gelu.default, [x], A(0))
    check_aten("mish_by_exp", aten.mish.default, [x], A(0))
    check_aten("silu_by_sigmoid", aten.silu.default, [x], A(0))


def test_erf_approximation_error_below_2e7():
    """Abramowitz-Stegun 7.1.26 promises |error| <= 1.5e-7; checked densely in float64."""
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    got = GeluErf().double()(x)
    truth = F.gelu(x)
    assert (got - truth).abs().max() <= 1.5e-7 * x.abs().clamp(min=1).max() / 2 + 1e-12
    # Relative to the erf term alone: |gelu error| / (|x| / 2) is the erf error.
    assert ((got - truth).abs() / (x.abs() / 2).clamp(min=1e-30)).max() <= 2e-7


def test_rule_used_only_where_refused():
    """A target that has hardswish keeps it; one that lacks it gets the composition."""
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Hardswish(), nn.GELU())
    x = torch.randn(1, 2, 4, 4)
    keeps = decompose(net, refusing("gelu"), x)
    ops = capture(keeps, x).ops()
    assert ops["hardswish"] == 1 and "gelu" not in ops
    lacks = decompose(net, refusing("gelu", "hardswish"), x)
    ops = capture(lacks, x).ops()
    assert "hardswish" not in ops and "gelu" not in ops and "erf" not in ops
    torch.testing.assert_close(lacks(x), net.eval()(x), atol=1e-5, rtol=1e-5)


def test_module_forms_captured():
    check_module(nn.ReLU6(), torch.randn(1, 2, 3, 3) * 5, "hardtanh", "hardtanh_by_relu")
    check_module(nn.Mish(), torch.randn(1, 2, 3, 3) * 5, "mish", "mish_by_exp")
    graph = capture(nn.SiLU(), torch.randn(1, 1, 2, 2))
    assert choose_rule(graph.nodes[0], graph, "msnhnet").name == "silu_by_sigmoid"
