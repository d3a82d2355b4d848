"""Resize given a size: integer multiples are the writers' own factors; nearest to any other
size is an integer upsample + a strided pick."""

import torch
import torch.nn.functional as F
from decompose_harness import A, aten_node, caffe_error, check_aten, check_module, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.profiles import get_target, shipped_targets

nearest = torch.ops.aten.upsample_nearest2d.vec
bilinear = torch.ops.aten.upsample_bilinear2d.vec


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3), st.integers(0, 2**16))
def test_nearest_to_integer_multiple_size(ih, iw, kh, kw, c, seed):
    """Every shipped writer reads the integer factor off the sizes: no rule is needed."""
    x = torch.randn(1, c, ih, iw, generator=torch.Generator().manual_seed(seed))
    args = ([ih * kh, iw * kw], None)
    node, graph, _ = aten_node(nearest, [x], A(0), *args)
    for target in shipped_targets():
        assert target.refusal(node, graph) is None, target.name
    assert caffe_error(nearest, [x], A(0), *args) <= 1e-6


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 14), st.integers(1, 14),
       st.integers(1, 3), st.integers(0, 2**16))
def test_nearest_to_any_other_size(ih, iw, oh, ow, c, seed):
    assume(oh % ih or ow % iw)  # integer multiples take the factor rule (tested above)
    x = torch.randn(1, c, ih, iw, generator=torch.Generator().manual_seed(seed))
    check_aten("upsample_nearest2d_resample", nearest, [x], A(0), [oh, ow], None)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([0.5, 1.5, 2.5, 1.75, 3.0, 0.75]),
       st.integers(0, 2**16))
def test_nearest_fractional_scale(ih, iw, scale, seed):
    x = torch.randn(1, 2, ih, iw, generator=torch.Generator().manual_seed(seed))
    assume(int(ih * scale) >= 1 and int(iw * scale) >= 1 and scale != 3.0)
    check_aten("upsample_nearest2d_resample", nearest, [x], A(0), None, [scale, scale])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3),
       st.booleans(), st.integers(0, 2**16))
def test_bilinear_size_multiple(ih, iw, kh, kw, align, seed):
    """Caffe (align_corners=False) and MsnhNet (both) take a size multiple as it is."""
    x = torch.randn(1, 2, ih, iw, generator=torch.Generator().manual_seed(seed))
    args = ([ih * kh, iw * kw], align, None)
    node, graph, _ = aten_node(bilinear, [x], A(0), *args)
    assert get_target("msnhnet").refusal(node, graph) is None
    assert (get_target("caffe").refusal(node, graph) is None) == (not align)
    assert no_rule(bilinear, [x], A(0), *args)
    if not align:
        assert caffe_error(bilinear, [x], A(0), *args) <= 1e-5


def test_bilinear_non_multiple_is_refused_not_approximated():
    x = torch.randn(1, 1, 4, 4)
    assert no_rule(bilinear, [x], A(0), [6, 6], False, None)
    assert no_rule(bilinear, [x], A(0), None, False, [1.5, 1.5])


def test_functional_interpolate_size_is_captured():
    class Up(nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=(7, 10))

    check_module(Up(), torch.randn(1, 2, 3, 4), "upsample_nearest2d",
                 "upsample_nearest2d_resample")
