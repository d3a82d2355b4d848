"""The quant-friendly (QARepVGG) block: its structure, and a fusion as exact as the plain one."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_blocks import block_cases
from torch import nn

import deployplug as dp
from deployplug.blocks import RepVGGBlock
from deployplug.testing import normalized_error, randomize_batchnorm

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def test_structure_has_no_branch_batchnorms_and_one_after_the_sum():
    block = RepVGGBlock(8, 8, quant_friendly=True)
    assert isinstance(block.conv_kxk.bn, nn.BatchNorm2d)
    assert not hasattr(block.conv_1x1, "bn") and block.conv_1x1.conv.bias is None
    assert isinstance(block.identity, nn.Identity)
    assert isinstance(block.post_bn, nn.BatchNorm2d)
    norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2  # the plain block has three
    assert RepVGGBlock(8, 16, stride=2, quant_friendly=True).identity is None
    assert "quant_friendly=True" in repr(block)
    plain = RepVGGBlock(8, 8)
    assert plain.post_bn is None and "quant_friendly" not in repr(plain)


def test_plain_block_keeps_its_state_dict_keys():
    """Checkpoints of plain blocks written before the option existed still load."""
    keys = set(RepVGGBlock(4, 4).state_dict())
    assert not any(k.startswith("post_bn") for k in keys)
    assert {"identity.weight", "conv_1x1.bn.weight", "conv_kxk.bn.weight"} <= keys


@settings(max_examples=40, deadline=None)
@given(block_cases(), st.floats(0.1, 10.0))
def test_quant_friendly_block_fuses_exactly(case, one_by_one_gain):
    kwargs, (n, h, w), dtype, seed = case
    torch.manual_seed(seed)
    block = randomize_batchnorm(RepVGGBlock(**kwargs, quant_friendly=True), seed)
    with torch.no_grad():  # a 1x1 branch as large as training can make it
        block.conv_1x1.conv.weight.mul_(one_by_one_gain)
    block = block.to(dtype).eval()
    x = torch.randn(n, kwargs["in_channels"], h, w, dtype=dtype)
    with torch.no_grad():
        out = block.conv_kxk(x) + block.conv_1x1(x)
        if block.identity is not None:
            out = out + x
        ref = block.post_bn(out)
        ref_out = block(x)
        kernel, bias = block.get_equivalent_kernel_bias()
        block.reparameterize()
        fused = block.reparam(x)
    assert block.deployed and not hasattr(block, "post_bn")
    assert normalized_error(fused, ref) <= TOL[dtype]
    assert normalized_error(block(x), ref_out, floor=float(ref.abs().max())) <= TOL[dtype]
    assert torch.equal(block.reparam.weight, kernel) and torch.equal(block.reparam.bias, bias)
    assert block.reparam.weight.dtype == dtype


def test_models_build_quant_friendly_and_reparameterize_exactly():
    for name, shape in (("repvgg_tiny", (2, 1, 32, 32)), ("repvgg_a0", (1, 1, 32, 32))):
        model = dp.models.build(name, num_classes=10, in_channels=shape[1],
                                quant_friendly=True)
        blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
        assert blocks and all(b.quant_friendly for b in blocks)
        randomize_batchnorm(model, 1).eval()
        x = torch.randn(*shape)
        fused = dp.reparameterize(model, example_input=x)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        with torch.no_grad():
            assert normalized_error(fused(x), model(x)) <= 1e-5
    assert not any(b.quant_friendly for b in dp.models.build("repvgg_a0").modules()
                   if isinstance(b, RepVGGBlock))


def test_equivalent_kernel_is_differentiable_through_every_branch():
    block = RepVGGBlock(4, 4, quant_friendly=True)
    kernel, bias = block.get_equivalent_kernel_bias()
    (kernel.square().sum() + bias.sum()).backward()
    for p in (block.conv_kxk.conv.weight, block.conv_1x1.conv.weight, block.post_bn.weight,
              block.conv_kxk.bn.weight):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
