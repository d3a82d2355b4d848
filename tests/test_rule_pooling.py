"""Pooling windows over 32 as chains of smaller pools (max: always; average: when tiling)."""

import pytest
import torch
from decompose_harness import A, check_aten, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st

max_pool = torch.ops.aten.max_pool2d.default
avg_pool = torch.ops.aten.avg_pool2d.default
adaptive = torch.ops.aten.adaptive_avg_pool2d.default
mean = torch.ops.aten.mean.dim
sum_ = torch.ops.aten.sum.dim_IntList


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_max_pool_large_kernel(data):
    d = data.draw
    k = [d(st.integers(1, 80)), d(st.integers(1, 40))]
    if d(st.booleans()):
        k.reverse()
    assume(max(k) > 32)
    s = [d(st.integers(1, 40)) for _ in range(2)]
    p = [d(st.integers(0, min(kk // 2, 12))) for kk in k]
    size = [d(st.integers(max(kk - 2 * pp, 1), kk + 12)) for kk, pp in zip(k, p)]
    x = torch.randn(1, d(st.integers(1, 2)), *size,
                    generator=torch.Generator().manual_seed(d(st.integers(0, 2**16))))
    if no_rule(max_pool, [x], A(0), k, s, p, [1, 1], False):
        # Only allowed when no split keeps stage-1 padding legal (2 * pad > sub-window).
        assert max(p) * 2 > 32 or any(pp * 2 > kk for pp, kk in zip(p, k))
        return
    check_aten("max_pool2d_split", max_pool, [x], A(0), k, s, p, [1, 1], False)


@settings(max_examples=260, deadline=None)
@given(st.data())
def test_avg_pool_large_tiling_kernel(data):
    d = data.draw
    big = d(st.sampled_from([33, 34, 36, 40, 45, 48, 49, 50, 64, 66]))
    small = d(st.integers(1, 8))
    k = [big, small] if d(st.booleans()) else [small, big]
    s = [kk if kk > 32 else d(st.integers(1, 4)) for kk in k]
    p = [0 if kk > 32 else d(st.integers(0, kk // 2)) for kk in k]
    size = [kk + d(st.integers(0, kk // 2 + 3)) for kk in k]
    include = d(st.booleans())
    x = torch.randn(1, 2, *size, generator=torch.Generator().manual_seed(d(st.integers(0, 99))))
    args = (A(0), k, s, p, False, include, None)
    check_aten("avg_pool2d_split", avg_pool, [x], *args)


@pytest.mark.parametrize("big", [37, 41, 74])
def test_avg_pool_with_a_prime_factor_over_32_is_refused(big):
    """No chain of windows <= 32 averages exactly over a window with such a factor."""
    x = torch.randn(1, 2, big + 1, 5)
    assert no_rule(avg_pool, [x], A(0), [big, 3], [big, 1], [0, 1], False, True, None)


def test_avg_pool_overlapping_large_window_is_refused():
    x = torch.randn(1, 1, 50, 50)
    assert no_rule(avg_pool, [x], A(0), [40, 40], [2, 2], [0, 0], False, True, None)
