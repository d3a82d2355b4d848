"""ConvTranspose2d with output_padding -> without it, plus crop/pad: exact."""

import torch
from decompose_harness import A, check_aten, check_module
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.capture import capture
from deployplug.decompositions import choose_rule
from deployplug.profiles.caffe import CAFFE

convt = torch.ops.aten.conv_transpose2d.input


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_conv_transpose_output_padding(data):
    d = data.draw
    groups = d(st.sampled_from([1, 1, 2]))
    cin, cout_g = groups * d(st.integers(1, 2)), d(st.integers(1, 2))
    k = [d(st.integers(1, 4)) for _ in range(2)]
    stride = [d(st.integers(1, 3)) for _ in range(2)]
    dil = [d(st.integers(1, 2)) for _ in range(2)]
    pad = [d(st.integers(0, 3)) for _ in range(2)]
    opad = [d(st.integers(0, max(s, dl) - 1)) for s, dl in zip(stride, dil)]
    assume(any(opad))
    size = [d(st.integers(1, 6)) for _ in range(2)]
    out = [(i - 1) * s - 2 * p + dl * (kk - 1) + op + 1
           for i, s, p, dl, kk, op in zip(size, stride, pad, dil, k, opad)]
    assume(min(out) >= 1)
    gen = torch.Generator().manual_seed(d(st.integers(0, 2**16)))
    x = torch.randn(d(st.integers(1, 2)), cin, *size, generator=gen)
    w = torch.randn(cin, cout_g, *k, generator=gen)
    b = torch.randn(cout_g * groups, generator=gen) if d(st.booleans()) else None
    check_aten("conv_transpose2d_crop", convt, [x], A(0), w, b, stride, pad, opad, groups, dil)


def test_module_form_and_no_output_padding_left():
    m = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=0, output_padding=1)
    x = torch.randn(1, 3, 4, 5)
    check_module(m, x, "conv_transpose2d", "conv_transpose2d_crop")
    graph = capture(m, x)
    node = graph.nodes[0]
    rebuilt = capture(choose_rule(node, graph, "caffe").build(node, graph, CAFFE), x)
    for n in rebuilt:
        if n.op == "conv_transpose2d":
            assert not any(n.args["output_padding"])
        if n.op == "pad":
            p = n.args["pad"]
            assert p[0] == p[1] and p[2] == p[3]
