"""Cross-layer equalization: exact in fp32, ranges evened out, only provably safe pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_harness import one_thread, plant_compensated_outlier, trained_tiny
from torch import nn

import deployplug as dp
from deployplug.quant import equalize
from deployplug.quant.equalization import (
    equalization_scales,
    find_pairs,
    input_ranges,
    output_ranges,
)
from deployplug.testing import normalized_error


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Chain(nn.Module):
    """conv -> act -> conv -> act -> conv with per-channel outliers, optionally grouped."""

    def __init__(self, c: int, groups: int, act: nn.Module, linear_head: bool):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.act1 = act
        self.b = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.c = nn.Conv2d(c, 2 * c, 1)
        self.head = nn.Linear(2 * c, 4) if linear_head else None

    def forward(self, x):
        y = self.c(F.relu(self.b(self.act1(self.a(x)))))
        return self.head(y.mean((2, 3))) if self.head is not None else y


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.sampled_from(["relu", "leaky"]), st.booleans(),
       st.floats(1.0, 1e3), st.integers(0, 2**16))
def test_equalization_is_exact_in_fp32_and_evens_out_ranges(groups, act, head, outlier, seed):
    torch.manual_seed(seed)
    c = 4 * groups
    model = Chain(c, groups, nn.ReLU() if act == "relu" else nn.LeakyReLU(0.1), head).eval()
    with torch.no_grad():  # channels a BatchNorm blew up, the way fused RepVGG kernels have
        model.a.weight[1] *= outlier
        model.a.bias[1] *= outlier
        model.b.weight[:, :, 0] *= 1 / outlier
    x = [(torch.randn(2, 3, 7, 7),) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, record = equalize(model, x)
    assert record.pairs == [["a", "b"], ["b", "c"]]
    with torch.no_grad():
        for (batch,) in x:
            assert normalized_error(out(batch), model(batch)) <= 1e-5
    assert record.check_error is not None and record.check_error <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # after it settles, each pair's shared channels have equal ranges on both sides
    r1 = output_ranges(out.a.weight)
    r2 = input_ranges(out.b.weight, groups)
    assert torch.allclose(r1, r2, rtol=1e-2)
    if outlier >= 10:  # the blown-up channel now shares its range with the next layer
        spread = lambda r: float(r.max() / r.min())  # noqa: E731
        assert spread(r1) < spread(output_ranges(model.a.weight)) / 2


def test_scales_leave_dead_channels_alone():
    first = torch.ones(3, 2, 1, 1)
    first[1] = 0
    second = torch.ones(4, 3, 1, 1) * 4
    scale = equalization_scales(first, second, 1)
    assert scale.tolist() == pytest.approx([0.5, 1.0, 0.5])


def test_only_safe_pairs_are_equalized():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
            self.c, self.d = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
            self.e, self.f = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))       # safe
            y = self.b(torch.relu(y))               # b called twice: refused
            z = F.relu6(self.c(y))                   # relu6 is not homogeneous
            w = self.e(x)
            v = self.f(F.relu(w)) + w               # e's output read twice
            return self.d(z) + v

    pairs, skipped = find_pairs(Shared())
    assert pairs == []
    assert any("more than once" in s["reason"] for s in skipped)


def test_a_fused_repvgg_chain_is_found_and_the_planted_channel_shrinks():
    model = plant_compensated_outlier(trained_tiny(), channel=3, factor=40.0)
    fused = dp.reparameterize(model)
    pairs, _ = find_pairs(fused)
    assert ["stage1.1.reparam", "stage2.0.reparam"] in [list(p) for p in pairs]
    assert len(pairs) == 4  # five convs in a chain; the linear head sits after the pooling
    x = [(torch.randn(4, 1, 8, 8),)]
    out, record = equalize(fused, x)
    before = output_ranges(fused.stage1[1].reparam.weight)
    after = output_ranges(out.stage1[1].reparam.weight)
    assert float(before.max() / before.median()) > 20
    assert float(after.max() / after.median()) < float(before.max() / before.median()) / 4
    assert record.largest_scale > 5


def test_an_untraceable_model_is_left_alone_with_the_reason():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be traced
                return self.b(F.relu(self.a(x)))
            return x

    out, record = equalize(Dynamic(), [(torch.ones(1, 1, 2, 2),)])
    assert record.pairs == [] and "torch.fx cannot trace" in record.skipped[0]["reason"]
    assert out is not None
