"""RepVGGBlock: the fused conv must equal the three-branch sum everywhere, borders included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.blocks import RepVGGBlock
from deployplug.errors import BatchNormStatsError
from deployplug.testing import normalized_error, randomize_batchnorm

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def preactivation(block: RepVGGBlock, x: torch.Tensor) -> torch.Tensor:
    """The branch sum before ReLU, so the error is measured on values that are not clipped."""
    if block.deployed:
        return block.reparam(x)
    out = block.conv_kxk(x) + block.conv_1x1(x)
    return out + block.identity(x) if block.identity is not None else out


@st.composite
def block_cases(draw):
    groups_kind = draw(st.sampled_from(["1", "2", "4", "depthwise"]))
    if groups_kind == "depthwise":
        channels = draw(st.sampled_from([1, 3, 8]))
        in_ch = out_ch = groups = channels
    else:
        groups = int(groups_kind)
        in_ch = groups * draw(st.integers(1, 4))
        same = draw(st.booleans())
        out_ch = in_ch if same else groups * draw(st.integers(1, 4))
    k = draw(st.sampled_from([3, 3, 3, 1, 5, (3, 1), (1, 5), (3, 5)]))
    kh, kw = (k, k) if isinstance(k, int) else k
    stride = draw(st.sampled_from([1, 2, (1, 2)]))
    dilation = draw(st.sampled_from([1, 2, (2, 1)]))
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    extra = draw(st.sampled_from([0, 0, 0, 1]))
    pad = (dh * (kh // 2) + extra, dw * (kw // 2) + extra)
    # reflect needs pad < size, circular pad <= size; zeros/replicate accept 1x1 inputs
    min_h = pad[0] + 1 if mode in ("reflect", "circular") else 1
    min_w = pad[1] + 1 if mode in ("reflect", "circular") else 1
    h = draw(st.integers(min_h, max(min_h, 11)))
    w = draw(st.integers(min_w, max(min_w, 11)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    padding = None if extra == 0 and draw(st.booleans()) else pad
    return dict(in_channels=in_ch, out_channels=out_ch, kernel_size=k, stride=stride,
                padding=padding, dilation=dilation, groups=groups, padding_mode=mode), \
        (draw(st.integers(1, 2)), h, w), dtype, draw(st.integers(0, 2**16))


@settings(max_examples=200, deadline=None)
@given(block_cases())
def test_fused_block_matches_branches(case):
    kwargs, (n, h, w), dtype, seed = case
    torch.manual_seed(seed)
    block = randomize_batchnorm(RepVGGBlock(**kwargs), seed).to(dtype).eval()
    x = torch.randn(n, kwargs["in_channels"], h, w, dtype=dtype)
    with torch.no_grad():
        ref = preactivation(block, x)
        ref_out = block(x)
        # Branches can cancel (one output pixel, one channel): rounding happens at the
        # branches' magnitude, so that is the scale an exact fusion is held to.
        branches = [block.conv_kxk(x), block.conv_1x1(x)] + (
            [block.identity(x)] if block.identity is not None else [])
        scale = max(float(b.abs().max()) for b in branches)
        kernel, bias = block.get_equivalent_kernel_bias()
        block.reparameterize()
        fused = preactivation(block, x)
        out = block(x)
    assert block.deployed and not hasattr(block, "conv_kxk")
    assert fused.shape == ref.shape
    assert normalized_error(fused, ref, floor=scale) <= TOL[dtype]
    # after ReLU most outputs can be zero: scale by the pre-activation magnitude instead
    assert normalized_error(out, ref_out, floor=float(ref.abs().max())) <= TOL[dtype]
    conv = block.reparam
    assert conv.weight.dtype == dtype and conv.bias.dtype == dtype
    assert torch.equal(conv.weight, kernel) and torch.equal(conv.bias, bias)
    assert conv.padding_mode == kwargs["padding_mode"]
    assert conv.groups == kwargs["groups"]
    assert conv.dilation == block.dilation and conv.stride == block.stride


def test_identity_branch_only_when_shape_is_kept():
    assert RepVGGBlock(8, 8).identity is not None
    assert RepVGGBlock(8, 8, stride=2).identity is None
    assert RepVGGBlock(8, 16).identity is None
    assert RepVGGBlock(8, 8, padding=2).identity is None  # output grows, cannot be identity
    assert RepVGGBlock(8, 8, dilation=3).padding == (3, 3)


def test_training_branches_use_dilation_and_padding_mode():
    block = RepVGGBlock(4, 4, dilation=2, padding_mode="reflect")
    assert block.conv_kxk.conv.dilation == (2, 2)
    assert block.conv_kxk.conv.padding_mode == "reflect"
    assert block.conv_1x1.conv.padding_mode == "reflect"


def test_reparameterize_is_idempotent():
    block = randomize_batchnorm(RepVGGBlock(6, 6, groups=3), 1).eval()
    block.reparameterize()
    weight = block.reparam.weight
    block.reparameterize()
    assert block.reparam.weight is weight


def test_equivalent_kernel_is_differentiable():
    block = RepVGGBlock(4, 4)
    block.eval()
    kernel, bias = block.get_equivalent_kernel_bias()
    (kernel.square().sum() + bias.sum()).backward()
    for p in (block.conv_kxk.conv.weight, block.conv_1x1.conv.weight,
              block.identity.weight, block.conv_kxk.bn.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fusion_keeps_dtype(dtype):
    block = randomize_batchnorm(RepVGGBlock(4, 4, groups=2), 2).to(dtype).eval()
    x = torch.randn(1, 4, 6, 5).to(dtype)
    with torch.no_grad():
        ref = preactivation(block, x).double()
        block.reparameterize()
        fused = preactivation(block, x)
    assert block.reparam.weight.dtype == dtype and block.reparam.bias.dtype == dtype
    assert fused.dtype == dtype
    assert normalized_error(fused.double(), ref) <= (5e-2 if dtype != torch.float64 else 1e-12)


def test_syncbatchnorm_identity_branch():
    block = randomize_batchnorm(RepVGGBlock(4, 4), 3).eval()
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        ref = preactivation(block, x)
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(block).eval()
        assert isinstance(sync.identity, nn.SyncBatchNorm)
        sync.reparameterize()
        assert normalized_error(preactivation(sync, x), ref) <= 1e-6


def test_batchnorm_without_stats_is_a_typed_error():
    block = RepVGGBlock(4, 4)
    block.identity = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(BatchNormStatsError, match="identity"):
        block.reparameterize()
    assert not block.deployed


def test_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        RepVGGBlock(4, 4, kernel_size=2)
    with pytest.raises(ValueError, match="padding"):
        RepVGGBlock(4, 4, kernel_size=3, padding=0)
