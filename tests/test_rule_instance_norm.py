"""InstanceNorm -> global pooling + broadcast statistics: exact in PyTorch and onnxruntime."""

import torch
import torch.nn.functional as F
from decompose_harness import A, check_aten, check_module
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.capture import capture
from deployplug.decompositions import choose_rule
from deployplug.decompositions.rules.instance_norm import InstanceNormBroadcast
from deployplug.profiles.caffe import CAFFE

inorm = torch.ops.aten.instance_norm.default


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9),
       st.booleans(), st.sampled_from([1e-5, 1e-3, 0.1]), st.floats(0.01, 20.0),
       st.floats(-20.0, 20.0), st.integers(0, 2**16))
def test_instance_norm_input_stats(n, c, h, w, affine, eps, scale, offset, seed):
    assume(h * w > 1)  # one pixel: the output is exactly the bias, tested below
    gen = torch.Generator().manual_seed(seed)
    # |offset| / scale bounds the fp32 conditioning (any fp32 algorithm loses
    # ~1e-7 * offset/scale); ill-conditioned inputs are compared with fp64 below.
    x = torch.randn(n, c, h, w, generator=gen) * scale + offset * scale
    spread = x.double().std((2, 3), unbiased=False)
    assume(bool(((x.double().mean((2, 3)).abs() + 1e-3) / spread).max() < 20))
    wt = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    check_aten("instance_norm_broadcast", inorm, [x], A(0), wt, b, None, None, True, 0.1, eps,
               False)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.booleans(), st.integers(0, 2**16))
def test_instance_norm_1d(c, length, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, length, generator=gen)
    wt = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    check_aten("instance_norm_broadcast", inorm, [x], A(0), wt, b, None, None, True, 0.1, 1e-5,
               False)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.booleans(), st.integers(0, 2**16))
def test_instance_norm_running_stats(c, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 3, 5, generator=gen)
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    wt = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    check_aten("instance_norm_running_stats", inorm, [x], A(0), wt, b, mean, var, False, 0.1,
               1e-5, False)


@settings(max_examples=20, deadline=None)
@given(st.floats(1e-3, 1e-2), st.floats(10.0, 1000.0), st.integers(0, 2**16))
def test_ill_conditioned_input_error_is_bounded_by_conditioning(scale, offset, seed):
    """Large mean, tiny spread: the fp32 error stays within a few eps * |mean| / std."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64) * scale + offset).float()
    truth = F.instance_norm(x.double())
    ours = InstanceNormBroadcast(None, None, 1e-5)(x)
    cond = (x.double().mean((2, 3)).abs() / x.double().std((2, 3), unbiased=False)).max()
    assert (ours.double() - truth).abs().max() <= 4 * 2.0**-24 * cond + 1e-6


def test_single_pixel_map_gives_the_bias():
    x = torch.randn(2, 3, 1, 1) * 5
    bias = torch.randn(3)
    got = InstanceNormBroadcast(torch.ones(3), bias, 1e-5)(x)
    torch.testing.assert_close(got, bias.view(1, 3, 1, 1).expand(2, 3, 1, 1), atol=1e-6, rtol=0)


def test_module_and_functional_forms_are_captured_and_rewritten():
    check_module(nn.InstanceNorm2d(3, affine=True), torch.randn(1, 3, 6, 7) * 3 + 1,
                 "instance_norm", "instance_norm_broadcast")

    class Fn(nn.Module):
        def forward(self, x):
            return F.instance_norm(x)

    check_module(Fn(), torch.randn(2, 4, 5, 3), "instance_norm", "instance_norm_broadcast")


def test_replacement_has_no_reduction_over_hw():
    """The whole point: the rewritten graph uses pooling, never mean/var/sum."""
    x = torch.randn(1, 3, 6, 6)
    graph = capture(nn.InstanceNorm2d(3, affine=True), x)
    node = graph.nodes[0]
    replacement = choose_rule(node, graph, "caffe").build(node, graph, CAFFE)
    ops = capture(replacement, x).ops()
    assert ops["adaptive_avg_pool2d"] == 2
    assert not {"mean", "var", "sum", "var_mean", "std", "instance_norm"} & set(ops)
