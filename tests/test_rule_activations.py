"""Activations: GELU and Mish as compositions (rules), the piecewise-linear ones and SiLU as
the Caffe lowering's own compositions (no rule: every shipped writer expresses them)."""

import pytest
import torch
import torch.nn.functional as F
from decompose_harness import A, aten_node, caffe_error, check_aten, check_module
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.capture import capture
from deployplug.decompositions import choose_rule, decompose, rules_for
from deployplug.decompositions.rules.activations import GeluErf
from deployplug.profiles import get_target, shipped_targets

aten = torch.ops.aten
TOL = 1e-5
LOWERED = {
    "relu6": (aten.relu6.default, ()),
    "hardtanh": (aten.hardtanh.default, (-1.5, 2.25)),
    "clamp": (aten.clamp.default, (-0.5, 3.0)),
    "hardsigmoid": (aten.hardsigmoid.default, ()),
    "hardswish": (aten.hardswish.default, ()),
    "silu": (aten.silu.default, ()),
}


@pytest.mark.parametrize("op", sorted(LOWERED))
def test_no_rule_duplicates_a_lowered_activation(op):
    """The composition lives in the writers only: no rule, and no shipped target refuses."""
    overload, extra = LOWERED[op]
    node, graph, _ = aten_node(overload, [torch.randn(1, 2, 3, 3)], A(0), *extra)
    assert rules_for(op) == []
    for target in shipped_targets():
        assert target.refusal(node, graph) is None, target.name


@pytest.mark.parametrize("op", sorted(LOWERED))
@settings(max_examples=200, deadline=None)
@given(scale=st.sampled_from([0.5, 3.0, 10.0, 60.0]), c=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_caffe_lowers_activation_exactly(op, scale, c, seed):
    x = torch.randn(2, c, 3, 5, generator=torch.Generator().manual_seed(seed)) * scale
    overload, extra = LOWERED[op]
    assert caffe_error(overload, [x], A(0), *extra) <= TOL


@settings(max_examples=200, deadline=None)
@given(st.floats(-3, 3), st.one_of(st.none(), st.floats(-3, 3)), st.integers(0, 2**16))
def test_caffe_clamp_one_sided_and_bounds(lo, hi, seed):
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed)) * 4
    if hi is not None and hi < lo:
        lo, hi = hi, lo
    assert caffe_error(aten.clamp.default, [x], A(0), lo, hi) <= TOL


def test_gelu_tanh_and_extreme_inputs():
    x = torch.tensor([[-1e4, -88.0, -30.0, -5.0, -1e-6, 0.0, 1e-6, 5.0, 30.0, 88.0, 1e4]])
    x = x.view(1, 1, 1, -1)
    check_aten("gelu_by_exp", aten.gelu.default, [x * 1e-3], A(0), approximate="tanh")
    check_aten("gelu_by_exp", aten.gelu.default, [x], A(0))
    check_aten("mish_by_exp", aten.mish.default, [x], A(0))


def test_erf_approximation_error_below_2e7():
    """Abramowitz-Stegun 7.1.26 promises |error| <= 1.5e-7; checked densely in float64."""
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    got = GeluErf().double()(x)
    truth = F.gelu(x)
    assert (got - truth).abs().max() <= 1.5e-7 * x.abs().clamp(min=1).max() / 2 + 1e-12
    # Relative to the erf term alone: |gelu error| / (|x| / 2) is the erf error.
    assert ((got - truth).abs() / (x.abs() / 2).clamp(min=1e-30)).max() <= 2e-7


def test_rule_used_only_where_refused():
    """MsnhNet has mish and keeps it; Caffe lacks it and gets the composition."""
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Mish(), nn.GELU())
    x = torch.randn(1, 2, 4, 4)
    keeps = decompose(net, "msnhnet", x)
    ops = capture(keeps, x).ops()
    assert ops["mish"] == 1 and "gelu" not in ops
    lacks = decompose(net, "caffe", x)
    ops = capture(lacks, x).ops()
    assert "mish" not in ops and "gelu" not in ops and "erf" not in ops
    torch.testing.assert_close(lacks(x), net.eval()(x), atol=1e-5, rtol=1e-5)


def test_module_forms_captured():
    check_module(nn.Mish(), torch.randn(1, 2, 3, 3) * 5, "mish", "mish_by_exp")
    graph = capture(nn.SiLU(), torch.randn(1, 1, 2, 2))
    assert get_target("msnhnet").refusal(graph.nodes[0], graph) is None
    assert choose_rule(graph.nodes[0], graph, "msnhnet") is None
