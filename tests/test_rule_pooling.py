"""Pooling windows over a target's limit as chains of smaller pools (max: always; average:
when tiling). The limit comes from the target: om's 32, or any other a target declares."""

import pytest
import torch
from decompose_harness import A, aten_node, check_aten, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deployplug.decompositions import all_rules
from deployplug.profiles import get_target

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
    if no_rule(max_pool, [x], A(0), k, s, p, [1, 1], False, target="om"):
        # Only allowed when no split keeps stage-1 padding legal (2 * pad > sub-window).
        assert max(p) * 2 > 32 or any(pp * 2 > kk for pp, kk in zip(p, k))
    else:
        check_aten("max_pool2d_split", max_pool, [x], A(0), k, s, p, [1, 1], False, target="om")


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
    # Non-negative inputs, like the post-ReLU maps large pools see: the mean of hundreds of
    # zero-mean values is tiny, and the fp32 rounding of *any* summation order (PyTorch's own
    # included) is then a large fraction of it, which says nothing about the rewrite.
    x = torch.rand(1, 2, *size, generator=torch.Generator().manual_seed(d(st.integers(0, 99))))
    args = (A(0), k, s, p, False, include, None)
    check_aten("avg_pool2d_split", avg_pool, [x], *args, target="om")


@pytest.mark.parametrize("big", [37, 41, 74])
def test_avg_pool_with_a_prime_factor_over_32_is_refused(big):
    """No chain of windows <= 32 averages exactly over a window with such a factor."""
    x = torch.randn(1, 2, big + 1, 5)
    assert no_rule(avg_pool, [x], A(0), [big, 3], [big, 1], [0, 1], False, True, None,
                   target="om")


def test_avg_pool_overlapping_large_window_is_refused():
    x = torch.randn(1, 1, 50, 50)
    assert no_rule(avg_pool, [x], A(0), [40, 40], [2, 2], [0, 0], False, True, None,
                   target="om")


@pytest.mark.parametrize("seed", range(20))
def test_avg_pool_split_is_accurate_on_zero_mean_inputs(seed):
    """Against float64 truth the chain is as accurate as PyTorch's own single pool.

    (On zero-mean inputs the output is tiny, so both fp32 results can sit ~1e-5 of it away from
    each other; the property that matters is closeness to the exact value.)
    """
    x = torch.randn(1, 2, 56, 7, generator=torch.Generator().manual_seed(seed))
    args = ([49, 7], [49, 1], [0, 0], False, True, None)
    node, graph, _ = aten_node(avg_pool, [x], A(0), *args)
    rule = next(r for r in all_rules() if r.name == "avg_pool2d_split")
    with torch.no_grad():
        ours = rule.build(node, graph, get_target("om"))(x).double()
    truth = avg_pool(x.double(), *args)
    scale = truth.abs().max()
    native_err = float((avg_pool(x, *args).double() - truth).abs().max() / scale)
    ours_err = float((ours - truth).abs().max() / scale)
    assert ours_err <= max(2 * native_err, 1e-6)
