"""Fusion maths, the generic conv->BN fold, the block protocol and whole-model equivalence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deployplug import models
from deployplug.blocks import RepVGGBlock
from deployplug.errors import BatchNormStatsError
from deployplug.reparam import reparameterize
from deployplug.reparam.fusion import (
    add_centred_,
    fold_bn,
    identity_kernel,
    pad_kernel,
    sum_branches,
)
from deployplug.testing import normalized_error, randomize_batchnorm

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


# ------------------------------------------------------------------------ pure functions

@settings(max_examples=40, deadline=None)
@given(kh=st.sampled_from([1, 3]), kw=st.sampled_from([1, 3, 5]),
       grow_h=st.sampled_from([0, 2, 4]), grow_w=st.sampled_from([0, 2]),
       h=st.integers(1, 7), w=st.integers(1, 7))
def test_pad_kernel_is_the_same_map(kh, kw, grow_h, grow_w, h, w):
    """A rectangular kernel padded to a larger centred one computes the same conv."""
    small = torch.randn(3, 2, kh, kw, dtype=torch.float64)
    big = pad_kernel(small, (kh + grow_h, kw + grow_w))
    assert big.shape == (3, 2, kh + grow_h, kw + grow_w)
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    ref = F.conv2d(x, small, padding=(kh // 2, kw // 2))
    out = F.conv2d(x, big, padding=((kh + grow_h) // 2, (kw + grow_w) // 2))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("small,big", [((1, 1), (3, 3)), ((1, 3), (3, 5)), ((3, 1), (5, 3)),
                                       ((1, 1, 1), (3, 1, 5)), ((3, 3), (3, 3))])
def test_add_centred_equals_pad_and_sum(small, big):
    k = torch.randn(4, 2, *big, dtype=torch.float64)
    s = torch.randn(4, 2, *small, dtype=torch.float64)
    expected, _ = sum_branches([(k, torch.zeros(4)), (pad_kernel(s, big), torch.zeros(4))])
    out = add_centred_(k.clone(), s)
    assert torch.equal(out, expected)


def test_add_centred_keeps_gradients():
    w = torch.randn(3, 3, 3, 3, requires_grad=True)
    s = torch.randn(3, 3, 1, 1, requires_grad=True)
    add_centred_(w * 2, s).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 2)) and torch.equal(s.grad, torch.ones_like(s))


def test_pad_kernel_orders_dims_correctly_for_rectangles():
    small = torch.ones(1, 1, 1, 3)
    big = pad_kernel(small, (3, 5))
    assert big.shape == (1, 1, 3, 5)
    assert big[0, 0, 1, 1:4].eq(1).all() and big.sum() == 3
    with pytest.raises(ValueError):
        pad_kernel(small, (2, 3))
    with pytest.raises(ValueError):
        pad_kernel(small, (1, 1))


@pytest.mark.parametrize("channels,groups", [(6, 1), (6, 2), (6, 3), (6, 6), (1, 1)])
@pytest.mark.parametrize("size", [(1,), (3, 3), (1, 5), (3, 1, 3)])
def test_identity_kernel_is_identity(channels, groups, size):
    kernel = identity_kernel(channels, groups, size, dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(size)]
    x = torch.randn(2, channels, *[4 + s for s in size], dtype=torch.float64)
    y = conv(x, kernel, groups=groups, padding=tuple(s // 2 for s in size))
    assert torch.equal(y, x)
    assert kernel.dtype == torch.float64


def test_identity_kernel_keeps_dtype():
    assert identity_kernel(4, 2, (3, 3), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_fold_bn_low_precision_is_one_rounding_of_the_fp32_result():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 4, 3, 3, generator=gen), torch.randn(8, generator=gen)
    mean, var = torch.randn(8, generator=gen), torch.rand(8, generator=gen) * 1e-3
    gamma, beta = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    args = [t.bfloat16() for t in (w, b, mean, var)]
    k16, b16 = fold_bn(*args, 1e-5, gamma.bfloat16(), beta.bfloat16())
    k32, b32 = fold_bn(*[t.float() for t in args], 1e-5, gamma.bfloat16().float(),
                       beta.bfloat16().float())
    assert k16.dtype == b16.dtype == torch.bfloat16
    assert torch.equal(k16, k32.bfloat16()) and torch.equal(b16, b32.bfloat16())


def test_sum_branches():
    k, b = sum_branches([(torch.ones(2, 1, 3, 3), torch.ones(2)),
                         (2 * torch.ones(2, 1, 3, 3), torch.zeros(2))])
    assert torch.equal(k, 3 * torch.ones(2, 1, 3, 3)) and torch.equal(b, torch.ones(2))


# ---------------------------------------------------------------------- generic conv->BN

@st.composite
def conv_bn_cases(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 3))
    out_ch = groups * draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    sync = dims > 1 and draw(st.booleans())
    mode = "zeros" if transposed else draw(st.sampled_from(["zeros", "reflect", "circular"]))
    size = draw(st.lists(st.integers(3, 7), min_size=dims, max_size=dims))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return dict(dims=dims, groups=groups, in_ch=in_ch, out_ch=out_ch, transposed=transposed,
                k=k, stride=stride, dilation=dilation, bias=bias, affine=affine, sync=sync,
                mode=mode, size=size, dtype=dtype, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, deadline=None)
@given(conv_bn_cases())
def test_generic_conv_bn_fold(case):
    torch.manual_seed(case["seed"])
    dims = case["dims"]
    if case["transposed"]:
        conv = CONVT[dims](case["in_ch"], case["out_ch"], case["k"], case["stride"],
                           groups=case["groups"], bias=case["bias"], dilation=case["dilation"])
    else:
        conv = CONV[dims](case["in_ch"], case["out_ch"], case["k"], case["stride"],
                          padding=case["dilation"] * (case["k"] // 2), groups=case["groups"],
                          bias=case["bias"], dilation=case["dilation"],
                          padding_mode=case["mode"])
    bn = BN[dims](case["out_ch"], affine=case["affine"])
    if case["sync"]:
        bn = nn.SyncBatchNorm(case["out_ch"], affine=case["affine"])
    model = randomize_batchnorm(nn.Sequential(conv, bn, nn.ReLU()), case["seed"])
    model = model.to(case["dtype"]).eval()
    x = torch.randn(2, case["in_ch"], *case["size"], dtype=case["dtype"])
    with torch.no_grad():
        ref = model[1](model[0](x))
        fused = reparameterize(model)
        out = fused[1](fused[0](x))
    assert isinstance(fused[1], nn.Identity) and count_bn(fused) == 0
    assert normalized_error(out, ref) <= TOL[case["dtype"]]
    assert fused[0].bias is not None and fused[0].weight.dtype == case["dtype"]
    assert fused[0].padding_mode == conv.padding_mode and fused[0].groups == conv.groups
    assert isinstance(model[1], _BatchNorm)  # original untouched


class Branchy(nn.Module):
    """Traceable: a stem pair, a pair whose conv output is reused (must not fold), a shared
    BN called twice (must not fold), and a pair inside a child module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.reused = nn.Conv2d(8, 8, 1, bias=False)
        self.reused_bn = nn.BatchNorm2d(8)
        self.twice = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.twice_bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        r = self.reused(x)
        x = self.reused_bn(r) + r
        x = self.twice_bn(self.twice(x)) + self.twice_bn(x)
        return self.head(x)


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: the Sequential children must still fold."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6))
        self.tail = Branchy()

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:
            y = y * 2
        return y


def test_fold_follows_dataflow_not_attribute_order():
    model = randomize_batchnorm(Branchy(), 4).eval()
    x = torch.randn(2, 3, 5, 6)
    fused = reparameterize(model)
    assert isinstance(fused.stem_bn, nn.Identity)
    assert isinstance(fused.head[1], nn.Identity)
    assert isinstance(fused.reused_bn, nn.BatchNorm2d)  # conv output also used elsewhere
    assert isinstance(fused.twice_bn, nn.BatchNorm2d)  # BN applied twice
    with torch.no_grad():
        assert normalized_error(fused(x), model(x)) <= 1e-6


def test_fold_falls_back_to_sequential_adjacency():
    model = randomize_batchnorm(Untraceable(), 5).eval()
    with pytest.raises(Exception):  # noqa: B017 - the premise: fx cannot trace this
        torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 6, 4)
    fused = reparameterize(model)
    assert isinstance(fused.body[1], nn.Identity) and isinstance(fused.body[4], nn.Identity)
    assert isinstance(fused.tail.stem_bn, nn.Identity)  # traced inside the child
    assert isinstance(fused.tail.twice_bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert normalized_error(fused(x), model(x)) <= 1e-6


def test_batchnorm_without_stats_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(BatchNormStatsError, match=r"'1'.*track_running_stats"):
        reparameterize(model)
    wrapped = nn.Sequential(nn.Identity(), RepVGGBlock(4, 4))
    wrapped[1].conv_1x1.bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(BatchNormStatsError, match=r"'1'.*conv_1x1"):
        reparameterize(wrapped)


def test_lone_batchnorm_without_stats_is_left_alone():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.Conv2d(3, 4, 1))
    fused = reparameterize(model)
    assert isinstance(fused[0], nn.BatchNorm2d)


# ------------------------------------------------------------------------- block protocol

class FuseReturns(nn.Module):
    calls = 0

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)

    def fuse(self) -> nn.Module:
        type(self).calls += 1
        conv = nn.Conv2d(2, 2, 1)
        conv.weight.data = self.a.weight + self.b.weight
        conv.bias.data = self.a.bias + self.b.bias
        bn = nn.BatchNorm2d(2)  # an exact identity, left for the generic pass to fold
        bn.running_var.fill_(1 - bn.eps)
        return nn.Sequential(conv, bn)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.deployed = False
        self.calls = 0

    def _deploy(self):
        self.calls += 1
        self.deployed = True

    def forward(self, x):
        return self.conv(x)


class Reparameterize(InPlace):
    def reparameterize(self):
        self._deploy()


class SwitchToDeploy(InPlace):
    def switch_to_deploy(self):
        self._deploy()


class VAEish(nn.Module):
    """``reparameterize(mu, logvar)`` is a different protocol and must not be called."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def reparameterize(self, mu, logvar):
        raise AssertionError("called")

    def forward(self, x):
        return self.conv(x)


def test_protocol_blocks_are_called():
    FuseReturns.calls = 0
    model = nn.Sequential(FuseReturns(), Reparameterize(), VAEish(), SwitchToDeploy())
    x = torch.randn(1, 2, 4, 4)
    fused = reparameterize(model)
    assert FuseReturns.calls == 1
    assert isinstance(fused[0], nn.Sequential) and isinstance(fused[0][1], nn.Identity)
    assert fused[1].deployed and fused[1].calls == 1
    assert fused[3].deployed and fused[3].calls == 1
    assert not model[1].deployed and not model[3].deployed  # original untouched
    assert isinstance(model[0], FuseReturns)
    with torch.no_grad():
        assert normalized_error(fused(x), model(x)) <= 1e-6


# ------------------------------------------------------------------------ model level

def a0(dtype=torch.float32, num_classes=1000):
    model = randomize_batchnorm(models.build("repvgg_a0", num_classes=num_classes), 7)
    return model.to(dtype)


@pytest.fixture(scope="module")
def a0_pair():
    torch.manual_seed(0)
    model = a0().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparameterize(model)
    return model, state, fused


def test_repvgg_a0_fp32(a0_pair):
    model, _, fused = a0_pair
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model.eval()
    try:
        with torch.no_grad():
            err = normalized_error(fused(x), model(x))
    finally:
        model.train()
    assert err <= 1e-6
    assert count_bn(fused) == 0
    assert not any(isinstance(m, RepVGGBlock) and not m.deployed for m in fused.modules())


def test_repvgg_a0_fp64():
    torch.manual_seed(1)
    model = a0(torch.float64, num_classes=10).eval()
    fused = reparameterize(model)
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        assert normalized_error(fused(x), model(x)) <= 1e-12
    assert all(p.dtype == torch.float64 for p in fused.parameters())


def test_original_untouched(a0_pair):
    model, state, fused = a0_pair
    assert model.training and not fused.training
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(not m.deployed for m in model.modules() if isinstance(m, RepVGGBlock))
    originals = {id(t) for t in model.state_dict(keep_vars=True).values()}
    assert not any(id(t) in originals for t in fused.state_dict(keep_vars=True).values())
    assert not ({id(m) for m in model.modules()} & {id(m) for m in fused.modules()})


class LazyBlock(RepVGGBlock):
    """Claims read-only fusion but keeps its branches: the copy must still not alias them."""

    def reparameterize(self):
        pass


def test_deploy_copy_never_aliases_the_original():
    model = nn.Sequential(LazyBlock(4, 4), RepVGGBlock(4, 4))
    fused = reparameterize(model, generic=False)  # keep the branches: they are the subject
    assert isinstance(fused[0].conv_kxk[1], nn.Identity)  # folded by the conv->BN pass
    assert isinstance(model[0].conv_kxk[1], nn.BatchNorm2d)
    ids = {id(m) for m in model.modules()} | {id(t) for t in model.state_dict(keep_vars=True)
                                             .values()}
    assert not any(id(m) in ids for m in fused.modules())
    assert not any(id(t) in ids for t in fused.state_dict(keep_vars=True).values())


def test_reparameterize_twice_is_a_no_op(a0_pair):
    _, _, fused = a0_pair
    again = reparameterize(fused)
    s1, s2 = fused.state_dict(), again.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert str(again) == str(fused)
    inplace = reparameterize(again, inplace=True)
    assert inplace is again


def test_inplace_converts_the_given_model():
    model = randomize_batchnorm(models.build("repvgg_tiny", num_classes=3), 2)
    out = reparameterize(model, inplace=True)
    assert out is model and not model.training and count_bn(model) == 0


def test_bfloat16_model_stays_bfloat16():
    model = randomize_batchnorm(models.build("repvgg_tiny", num_classes=3), 2)
    ref_model = reparameterize(model.double())
    fused = reparameterize(model.to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in fused.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = normalized_error(fused(x.bfloat16()).double(), ref_model(x.double()))
    assert err < 0.1


@pytest.mark.parametrize("name", ["resnet18_like", "mobilenetv2_like", "unet_like",
                                  "deeplabv3_like", "repvgg_tiny"])
def test_small_models_fold_completely(name):
    model = randomize_batchnorm(models.build(name, num_classes=5, in_channels=2), 3).eval()
    x = torch.randn(2, 2, 37, 29)
    fused = reparameterize(model)
    assert count_bn(fused) == 0
    with torch.no_grad():
        assert normalized_error(fused(x), model(x)) <= 1e-6


def test_fused_a0_onnx_graph_and_onnxruntime(a0_pair, tmp_path):
    model, _, fused = a0_pair
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "a0.onnx"
    torch.onnx.export(fused, (x,), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert set(ops) <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}, ops
    assert ops["Conv"] == 22 and ops["Relu"] == 22
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref_fused = fused(x).numpy()
        model.eval()
        ref_train = model(x).numpy()
        model.train()
    assert normalized_error(y, ref_fused) <= 1e-5
    assert normalized_error(y, ref_train) <= 1e-5
    assert np.isfinite(y).all()
