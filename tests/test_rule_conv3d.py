"""Conv3d -> one Conv2d, and BatchNorm3d -> 2-D BatchNorm: exact in PyTorch and onnxruntime."""

import torch
from decompose_harness import A, caffe_error, check_aten, check_module, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.capture import capture
from deployplug.decompositions.rules.conv3d import Conv3dAsConv2d

conv3d = torch.ops.aten.conv3d.default


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_conv3d_matches_native(data):
    d = data.draw
    groups = d(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * d(st.integers(1, 2)), groups * d(st.integers(1, 2))
    k = [d(st.integers(1, 3)) for _ in range(3)]
    stride = [d(st.integers(1, 3)) for _ in range(3)]
    dil = [d(st.integers(1, 2)) for _ in range(3)]
    pad = [d(st.integers(0, 2)) for _ in range(3)]
    size = [d(st.integers(1, 7)) for _ in range(3)]
    assume(all(s + 2 * p - dl * (kk - 1) - 1 >= 0 for s, p, dl, kk in zip(size, pad, dil, k)))
    gen = torch.Generator().manual_seed(d(st.integers(0, 2**16)))
    x = torch.randn(d(st.integers(1, 2)), cin, *size, generator=gen)
    w = torch.randn(cout, cin // groups, *k, generator=gen)
    b = torch.randn(cout, generator=gen) if d(st.booleans()) else None
    check_aten("conv3d_as_conv2d", conv3d, [x], A(0), w, b, stride, pad, dil, groups)


def test_conv3d_module_capture_and_caffe_legal_ops():
    """One shared weight for interior depths; only step-1 slices, no permute or stack."""
    conv = nn.Conv3d(2, 4, (4, 3, 3), stride=(4, 1, 1), padding=(0, 1, 1))
    x = torch.randn(1, 2, 12, 5, 6)
    check_module(conv, x, "conv3d", "conv3d_as_conv2d")
    mod = Conv3dAsConv2d(conv.weight, conv.bias, (4, 1, 1), (0, 1, 1), 1, 1, 12)
    assert {w for _, w in mod.plan} == {"weight_0"} and len(mod.plan) == 3
    graph = capture(mod, x)
    assert graph.ops()["conv2d"] == 3
    assert not {"permute", "stack", "select", "conv3d"} & set(graph.ops())
    assert all(n.args.get("step", 1) == 1 for n in graph if n.op == "slice")


def test_conv3d_padding_only_output_depth_is_bias():
    """An output depth that sees only padding must equal the bias (no tap is valid)."""
    conv = nn.Conv3d(1, 2, (1, 1, 1), padding=(2, 0, 0))
    x = torch.randn(1, 1, 1, 3, 3)
    check_module(conv, x, "conv3d", "conv3d_as_conv2d")


bn = torch.ops.aten._native_batch_norm_legit_no_training.default


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.sampled_from([2, 3, 5]), st.booleans(), st.integers(0, 2**16))
def test_batch_norm_3d_and_1d(c, rank, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = {2: (3, c), 3: (2, c, 5), 5: (2, c, 3, 4, 5)}[rank]
    x = torch.randn(*shape, generator=gen)
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    w = torch.rand(c, generator=gen) + 0.5 if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    # Caffe's BatchNorm + Scale take any rank, so this is the writer's job, not a rule's
    assert no_rule(bn, [x], A(0), w, b, mean, var, 0.1, 1e-5)
    assert caffe_error(bn, [x], A(0), w, b, mean, var, 0.1, 1e-5) <= 1e-5
