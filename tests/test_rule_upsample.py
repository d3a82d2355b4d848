"""Resize given a size: integer factors, or nearest as integer upsample + strided pick."""

import torch
import torch.nn.functional as F
from decompose_harness import A, check_aten, check_module, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

nearest = torch.ops.aten.upsample_nearest2d.vec
bilinear = torch.ops.aten.upsample_bilinear2d.vec


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3), st.integers(0, 2**16))
def test_nearest_to_integer_multiple_size(ih, iw, kh, kw, c, seed):
    x = torch.randn(1, c, ih, iw, generator=torch.Generator().manual_seed(seed))
    check_aten("upsample_nearest2d_size_to_factor", nearest, [x], A(0), [ih * kh, iw * kw], None)


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
    if int(ih * scale) < 1 or int(iw * scale) < 1 or scale == 3.0:
        return
    check_aten("upsample_nearest2d_resample", nearest, [x], A(0), None, [scale, scale])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3),
       st.booleans(), st.integers(0, 2**16))
def test_bilinear_size_multiple(ih, iw, kh, kw, align, seed):
    x = torch.randn(1, 2, ih, iw, generator=torch.Generator().manual_seed(seed))
    check_aten("upsample_bilinear2d_size_to_factor", bilinear, [x], A(0), [ih * kh, iw * kw],
               align, None)


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
