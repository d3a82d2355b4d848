"""Property tests of the generic linear-region pass: exact, or left alone with a reason.

Families of random blocks (float64, random BatchNorm statistics), 200 examples each:

* parallel branches: k x k convs with odd or even, square or rectangular kernels (1-7),
  stride 1-2, dilation, groups and depthwise, with or without BN and bias, identity and
  per-channel-scale branches, differences as well as sums, and DBB-style 1x1 -> k x k
  branches whose intermediate is zero-padded (exact only without a bias) or padded with its
  bias; then optionally a BN and a scale after the sum;
* sequential chains of convs, BatchNorms, scales, explicit padding and average pooling in 1, 2
  and 3 spatial dims;
* padding modes (reflect, replicate, circular) mixed with centre-tap and zero-padded branches;
* and the kernel maths on its own: composed kernels and biases against the two convolutions.

Whether the result is exact is checked on input sizes the pass never saw.

Whatever the draw, the fused model must match the original (normalized error <= 1e-12) and
a region that was not collapsed must say why; where the algebra says one conv is exact, the
region must have been collapsed.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.reparam import ReparamReport, reparameterize
from deployplug.reparam.fusion import (
    compose_bias,
    compose_kernels,
    compress_dilation,
    contract_pointwise,
    dilate_kernel,
    pointwise_after,
    regroup_kernel,
)
from deployplug.testing import normalized_error, randomize_batchnorm

EXAMPLES = 200
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
PAD = {1: nn.ZeroPad1d, 2: nn.ZeroPad2d, 3: nn.ZeroPad3d}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every op here is tiny: with intra-op threads on a loaded machine, waking the pool
    costs more than the work, and the examples would take ten times longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Scale(nn.Module):
    """A learned per-channel factor, written as user code."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, *([1] * self.dims))


class BiasPadded(nn.Module):
    """BN, then padding with the BN's own value for a zero input."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        value = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
        value = value.view(1, -1, 1, 1)
        return F.pad(bn(x) - value, [self.pad] * 4) + value


class Branches(nn.Module):
    """``post(sum_i sign_i * branch_i(x))``."""

    def __init__(self, branches: list[nn.Module], signs: list[float], post: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.signs = signs
        self.post = post
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for sign, branch in zip(self.signs[1:], self.branches[1:]):
            out = out + branch(x) if sign > 0 else out - branch(x)
        return self.act(self.post(out))


def _check(model: nn.Module, inputs: list[torch.Tensor], must_collapse: bool | None) -> None:
    model = randomize_batchnorm(model.double().eval(), seed=3)
    report = ReparamReport()
    with warnings.catch_warnings():
        # LinearRegionWarning for refused multi-branch draws; torch's note on 'same' padding
        warnings.simplefilter("ignore")
        fused = reparameterize(model, report=report)
        with torch.no_grad():
            for x in inputs:
                assert normalized_error(fused(x), model(x)) <= 1e-12
    for skipped in report.left_alone:
        assert skipped.reason
    event("collapsed" if report.collapsed else "left alone" if report.left_alone else "none")
    if must_collapse is True:
        assert [r.reason for r in report.left_alone] == []
        assert len(report.collapsed) == 1
    elif must_collapse is False:
        assert report.collapsed == [] and len(report.left_alone) == 1


# ----------------------------------------------------------------------------- branches

@st.composite
def branch_blocks(draw):
    cin = draw(st.sampled_from([2, 4]))
    cout = draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 1)]))
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dilation = (draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2])))
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    padding = [draw(st.integers(0, e // 2 + 1)) for e in extent]
    offset = [2 * p - e for p, e in zip(padding, extent)]  # what every branch must share
    common = math.gcd(cin, cout)
    branches: list[nn.Module] = []
    exact = True
    kinds = ["conv", "conv", "seq"]
    if cin == cout and stride == (1, 1) and offset == [-1, -1]:
        kinds += ["identity", "scale"]  # the only branches that keep the input's size
    if padding[0] == padding[1]:
        kinds.append("seq_bias_pad")  # pads all sides alike, with the main kernel
    for i in range(draw(st.integers(2, 4))):
        kind = "conv" if i == 0 else draw(st.sampled_from(kinds))
        groups = draw(st.sampled_from([g for g in (1, 2, common) if common % g == 0]))
        if kind in ("identity", "scale"):
            branches.append(nn.BatchNorm2d(cin) if kind == "identity" else Scale(cin, 2))
            continue
        if kind != "seq_bias_pad" and i > 0:
            # any kernel and dilation whose reach gives the same output size
            k_d = []
            for o in offset:
                fits = [(kk, dd) for kk in range(1, 8) for dd in (1, 2)
                        if (o + dd * (kk - 1) + 1) % 2 == 0 and o + dd * (kk - 1) + 1 >= 0]
                k_d.append(draw(st.sampled_from(fits)))
            k, d = (k_d[0][0], k_d[1][0]), (k_d[0][1], k_d[1][1])
        else:
            k, d = kernel, dilation
        ext = [dd * (kk - 1) + 1 for dd, kk in zip(d, k)]
        pad = tuple((o + e) // 2 for o, e in zip(offset, ext))
        bias = draw(st.booleans())
        with_bn = draw(st.booleans())
        if kind == "conv":
            conv = nn.Conv2d(cin, cout, k, stride, pad, d, groups, bias=bias)
            branches.append(nn.Sequential(conv, nn.BatchNorm2d(cout)) if with_bn else conv)
            continue
        # 1x1 (stride 1) -> [BN] -> k x k with the padding moved onto the intermediate
        mid = draw(st.sampled_from([2, 4]))
        first = nn.Conv2d(cin, mid, 1, 1, 0, 1, math.gcd(groups, mid), bias=bias)
        if kind == "seq_bias_pad":
            middle: nn.Module = BiasPadded(mid, pad[0])
            second = nn.Conv2d(mid, cout, k, stride, 0, d, math.gcd(groups, mid), bias=bias)
            if any(pad) and bias:
                exact = False  # pads with BN(0), but the border of BN(conv + bias) differs
        else:
            middle = nn.BatchNorm2d(mid) if with_bn else nn.Identity()
            second = nn.Conv2d(mid, cout, k, stride, pad, d, math.gcd(groups, mid), bias=bias)
            if any(pad) and (with_bn or bias):
                exact = False  # zero padding of a biased intermediate
        branches.append(nn.Sequential(first, middle, second))
    signs = [draw(st.sampled_from([1.0, 1.0, -1.0])) for _ in branches]
    post_kind = draw(st.sampled_from(["none", "bn", "scale"]))
    post = {"none": nn.Identity(), "bn": nn.BatchNorm2d(cout), "scale": Scale(cout, 2)}[
        post_kind]
    model = Branches(branches, signs, post)
    low = [max(1, e - 2 * p) for e, p in zip(extent, padding)]
    sizes = [(draw(st.integers(lo, lo + 5)), draw(st.integers(lo, lo + 5))) for lo in
             [max(low)] * 2]
    inputs = [torch.randn(draw(st.integers(1, 2)), cin, *s, dtype=torch.float64)
              for s in sizes]
    return model, inputs, exact


@SETTINGS
@given(branch_blocks())
def test_parallel_branches_exact_or_refused(case):
    model, inputs, exact = case
    _check(model, inputs, must_collapse=exact)


# ----------------------------------------------------------------------------- chains

@st.composite
def chains(draw):
    dims = draw(st.sampled_from([2, 2, 2, 1, 3]))
    kmax = 3 if dims == 3 else 7
    channels = draw(st.sampled_from([2, 4]))
    layers: list[nn.Module] = []
    must = True  # exact by construction: no padding after the first op, no border division
    convs = 0
    for i in range(draw(st.integers(2, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "bn", "scale", "pool", "pad"]))
        first = i == 0
        if kind == "conv":
            out = draw(st.sampled_from([2, 4]))
            k = tuple(draw(st.integers(1, kmax)) for _ in range(dims))
            s = tuple(draw(st.integers(1, 2)) for _ in range(dims))
            d = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(dims))
            p: tuple[int, ...] | str = tuple(draw(st.integers(0, 2)) for _ in range(dims))
            if draw(st.integers(0, 4)) == 0:  # torch's 'same': asymmetric for even reach
                p, s = "same", (1,) * dims
            g = draw(st.sampled_from([1, math.gcd(channels, out)]))
            layers.append(CONV[dims](channels, out, k, s, p, d, g,
                                     bias=draw(st.booleans())))
            channels = out
            convs += 1
            if p == "same":
                symmetric = all(dd * (kk - 1) % 2 == 0 for dd, kk in zip(d, k))
                must = must and first and symmetric
            else:
                must = must and (first or not any(p))
        elif kind == "bn":
            layers.append(BN[dims](channels))
        elif kind == "scale":
            layers.append(Scale(channels, dims))
        elif kind == "pool":
            k = draw(st.integers(1, 3))
            p = draw(st.integers(0, k // 2))
            include = draw(st.booleans())
            layers.append(POOL[dims](k, draw(st.integers(1, 2)), p, count_include_pad=include))
            must = must and (first or not p) and (include or not p)
        else:
            pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * dims))
            layers.append(PAD[dims](pads))
            symmetric = all(pads[2 * j] == pads[2 * j + 1] for j in range(dims))
            must = must and first and symmetric
    assume(convs >= 1)
    kinds = [type(m).__name__ for m in layers]
    assume(kinds not in (["Conv1d"], ["Conv2d"], ["Conv3d"]))
    assume(not (len(layers) == 2 and convs == 1 and kinds[0].startswith("Conv")
                and kinds[1].startswith("BatchNorm")))
    model = nn.Sequential(*layers, nn.ReLU())
    cin = next(m for m in layers if isinstance(m, nn.modules.conv._ConvNd)).in_channels
    first_conv = next(i for i, m in enumerate(layers)
                      if isinstance(m, nn.modules.conv._ConvNd))
    assume(all(not isinstance(m, (nn.modules.batchnorm._BatchNorm, Scale))
               or getattr(m, "num_features", None) in (None, cin)
               for m in layers[:first_conv]))
    for m in layers[:first_conv]:
        if isinstance(m, Scale):
            assume(m.weight.numel() == cin)
    side = 24 if dims < 3 else 14
    n = draw(st.integers(1, 2))
    inputs = [torch.randn(n, cin, *([side + j] * dims), dtype=torch.float64) for j in (0, 1)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for x in inputs:
                model.double()(x)
        except RuntimeError:
            assume(False)  # the random chain shrinks the input below a kernel
    return model, inputs, True if must else None


@SETTINGS
@given(chains())
def test_sequential_chains_exact_or_refused(case):
    model, inputs, must = case
    _check(model, inputs, must_collapse=must)


# ----------------------------------------------------------------------------- padding modes

@st.composite
def padding_mode_blocks(draw):
    """A k x k conv with reflect / replicate / circular padding, plus branches that read only
    the centre (1x1, identity), read the same padding (k' x k' with the same mode, or a 1x1
    then a padded conv: padding commutes with a pointwise map), or read other padding (zero
    padding, or a padded conv after a spatial one), which one conv cannot reproduce."""
    c = draw(st.sampled_from([2, 4]))
    mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    k = draw(st.sampled_from([3, 5]))
    bias = draw(st.booleans())
    branches: list[nn.Module] = [nn.Conv2d(c, c, k, 1, k // 2, padding_mode=mode, bias=bias)]
    exact = True
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["1x1", "identity", "same_mode", "zeros", "pointwise_then",
                                     "spatial_then"]))
        k2 = draw(st.sampled_from([3, 5]))
        if kind == "1x1":
            branches.append(nn.Sequential(nn.Conv2d(c, c, 1, bias=bias), nn.BatchNorm2d(c)))
        elif kind == "identity":
            branches.append(nn.BatchNorm2d(c))
        elif kind == "same_mode":
            branches.append(nn.Conv2d(c, c, k2, 1, k2 // 2, padding_mode=mode))
        elif kind == "zeros":
            branches.append(nn.Conv2d(c, c, k2, 1, k2 // 2))
            exact = False
        elif kind == "pointwise_then":
            branches.append(nn.Sequential(nn.Conv2d(c, c, 1, bias=bias), nn.BatchNorm2d(c),
                                          nn.Conv2d(c, c, k2, 1, k2 // 2, padding_mode=mode)))
        else:
            branches.append(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False),
                                          nn.Conv2d(c, c, k2, 1, k2 // 2, padding_mode=mode)))
            exact = False
    model = Branches(branches, [1.0] * len(branches), nn.Identity())
    sizes = [(draw(st.integers(5, 9)), draw(st.integers(5, 9))) for _ in range(2)]
    return model, [torch.randn(1, c, *s, dtype=torch.float64) for s in sizes], exact


@SETTINGS
@given(padding_mode_blocks())
def test_padding_modes_exact_or_refused(case):
    model, inputs, exact = case
    _check(model, inputs, must_collapse=exact)


# ----------------------------------------------------------------------------- kernel maths

@st.composite
def kernel_pairs(draw):
    g = draw(st.sampled_from([1, 2]))
    cin, mid, cout = (g * draw(st.integers(1, 2)) for _ in range(3))
    dims = draw(st.sampled_from([1, 2]))
    k1 = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    k2 = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    s1 = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    s2 = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    d2 = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    inner = torch.randn(mid, cin // g, *k1, dtype=torch.float64)
    outer = torch.randn(cout, mid // g, *k2, dtype=torch.float64)
    # at least the composed window, so both convs have an output
    size = tuple(s * d * (k - 1) + kk + draw(st.integers(0, 5))
                 for s, d, k, kk in zip(s1, d2, k2, k1))
    return g, inner, outer, s1, s2, d2, size


@SETTINGS
@given(kernel_pairs())
def test_kernel_composition_is_the_sequence(case):
    """compose_kernels / compose_bias / dilate_kernel / regroup_kernel / contract_pointwise /
    pointwise_after against running the two convolutions one after the other."""
    g, inner, outer, s1, s2, d2, size = case
    dims = inner.dim() - 2
    conv = (F.conv1d, F.conv2d)[dims - 1]
    x = torch.randn(2, inner.shape[1] * g, *size, dtype=torch.float64)
    b1 = torch.randn(inner.shape[0], dtype=torch.float64)
    b2 = torch.randn(outer.shape[0], dtype=torch.float64)
    ref = conv(conv(x, inner, b1, s1, groups=g), outer, b2, s2, dilation=d2, groups=g)
    dilated = dilate_kernel(outer, d2)
    assert compress_dilation(dilated, d2)[0].shape == outer.shape or any(
        k == 1 for k in outer.shape[2:])
    kernel = compose_kernels(dilated, inner, s1, g)
    bias = compose_bias(dilated, b2, b1, g)
    out = conv(x, kernel, bias, tuple(a * b for a, b in zip(s1, s2)), groups=g)
    assert out.shape == ref.shape
    assert normalized_error(out, ref) <= 1e-12
    if all(k == 1 for k in inner.shape[2:]) and all(s == 1 for s in s1):
        assert torch.allclose(contract_pointwise(dilated, inner, g), kernel, rtol=0,
                              atol=1e-12)
    if all(k == 1 for k in outer.shape[2:]):  # a 1x1 conv after any conv: a matrix product
        assert torch.allclose(pointwise_after(dilated, inner, g), kernel, rtol=0, atol=1e-12)
    dense = regroup_kernel(kernel, g, 1)
    assert normalized_error(conv(x, dense, bias, tuple(a * b for a, b in zip(s1, s2))),
                            ref) <= 1e-12
