"""Asymmetric/negative pads as symmetric pad + crop; channel pads as conv + concat."""

import torch
import torch.nn.functional as F
from decompose_harness import A, check_aten, check_module, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

pad = torch.ops.aten.pad.default
constant_pad_nd = torch.ops.aten.constant_pad_nd.default


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_asymmetric_spatial_pad(data):
    d = data.draw
    mode = d(st.sampled_from(["constant", "constant", "reflect", "replicate", "circular"]))
    h, w = d(st.integers(2, 7)), d(st.integers(2, 7))
    lo = -2 if mode == "constant" else 0
    pads = [d(st.integers(lo, 4)) for _ in range(4)]
    assume(pads[0] != pads[1] or pads[2] != pads[3] or min(pads) < 0)
    assume(w + pads[0] + pads[1] >= 1 and h + pads[2] + pads[3] >= 1)
    if mode in ("reflect", "circular"):
        assume(max(pads[:2]) < w and max(pads[2:]) < h)
    value = d(st.sampled_from([None, 0.0, 1.5, -3.0])) if mode == "constant" else None
    x = torch.randn(d(st.integers(1, 2)), 2, h, w,
                    generator=torch.Generator().manual_seed(d(st.integers(0, 2**16))))
    check_aten("pad_symmetric_crop", pad, [x], A(0), pads, mode, value)


def test_batch_pad_is_refused():
    assert no_rule(pad, [torch.randn(1, 1, 3, 3)], A(0), [0, 0, 0, 0, 0, 0, 1, 0], "constant",
                   None)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(-2, 3), st.integers(-2, 3), st.lists(
    st.integers(0, 2), min_size=4, max_size=4), st.sampled_from([None, 0.0, 2.5]),
    st.integers(0, 2**16))
def test_channel_pad(c, before, after, spatial, value, seed):
    assume(before or after)
    assume(c + min(before, 0) + min(after, 0) >= 1)
    x = torch.randn(2, c + 2, 3, 4, generator=torch.Generator().manual_seed(seed))
    check_aten("pad_channels_concat", pad, [x], A(0), spatial + [before, after], "constant",
               value)


def test_functional_and_module_forms():
    class Fn(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 2, 0, 1), value=0.5)

    check_module(Fn(), torch.randn(1, 2, 4, 5), "pad", "pad_symmetric_crop")
    check_module(nn.ReflectionPad2d((0, 2, 1, 0)), torch.randn(1, 2, 4, 5), "pad",
                 "pad_symmetric_crop")


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 7), st.integers(2, 7), st.lists(st.integers(-2, 4), min_size=4, max_size=4),
       st.sampled_from([0.0, 1.5, -3.0]), st.integers(0, 2**16))
def test_constant_pad_nd_spatial(h, w, pads, value, seed):
    """The ``constant_pad_nd`` spelling of an asymmetric pad takes the same rewrite."""
    assume(pads[0] != pads[1] or pads[2] != pads[3] or min(pads) < 0)
    assume(w + pads[0] + pads[1] >= 1 and h + pads[2] + pads[3] >= 1)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    check_aten("constant_pad_nd_symmetric_crop", constant_pad_nd, [x], A(0), pads, value)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(-2, 3), st.integers(-2, 3), st.lists(
    st.integers(0, 2), min_size=4, max_size=4), st.sampled_from([0.0, 2.5]),
    st.integers(0, 2**16))
def test_constant_pad_nd_channels(c, before, after, spatial, value, seed):
    assume(before or after)
    assume(c + min(before, 0) + min(after, 0) >= 1)
    x = torch.randn(2, c + 2, 3, 4, generator=torch.Generator().manual_seed(seed))
    check_aten("constant_pad_nd_channels_concat", constant_pad_nd, [x], A(0),
               spatial + [before, after], value)
