"""Adaptive average pooling, mean/sum over H, W, and global pooling staged for om."""

import pytest
import torch
from decompose_harness import A, check_aten, no_rule
from hypothesis import given, settings
from hypothesis import strategies as st

from deployplug.capture import Graph, Node
from deployplug.decompositions import decompose

adaptive = torch.ops.aten.adaptive_avg_pool2d.default
mean = torch.ops.aten.mean.dim
sum_ = torch.ops.aten.sum.dim_IntList


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5),
       st.integers(0, 2**16))
def test_adaptive_avg_pool_even_bins(oh, ow, fh, fw, seed):
    x = torch.randn(1, 3, oh * fh, ow * fw, generator=torch.Generator().manual_seed(seed))
    check_aten("adaptive_avg_pool2d_as_avg_pool", adaptive, [x], A(0), [oh, ow])


def test_adaptive_avg_pool_uneven_bins_refused():
    assert no_rule(adaptive, [torch.randn(1, 1, 7, 7)], A(0), [3, 3])


@pytest.mark.parametrize("is_sum", [False, True], ids=["mean", "sum"])
@settings(max_examples=200, deadline=None)
@given(st.sampled_from([[2, 3], [-1, -2], [2], [3], [-1]]), st.booleans(),
       st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**16))
def test_mean_and_sum_over_hw(is_sum, dims, keep, h, w, seed):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    if is_sum:
        check_aten("sum_hw_as_avg_pool", sum_, [x], A(0), dims, keep)
    else:
        check_aten("mean_hw_as_avg_pool", mean, [x], A(0), dims, keep)


def _om_like() -> object:
    """Refuses pooling windows over 32, global pooling over 32 and spatial reductions."""

    def pool(node: Node, graph: Graph) -> str | None:
        kernel = node.args["kernel_size"]
        return "window over 32" if max(kernel) > 32 else None

    def gap(node: Node, graph: Graph) -> str | None:
        shape = graph.shape_of(node.inputs[0])
        return "global pooling over 32" if max(shape[2:]) > 32 else None

    def reduction(node: Node, graph: Graph) -> str | None:
        return "no reductions over H, W"

    from deployplug.profiles import TargetProfile
    from deployplug.profiles.caffe import OM_LIMITS

    return TargetProfile("om", "caffe", "test", ops={"max_pool2d": pool, "avg_pool2d": pool,
                                                     "adaptive_avg_pool2d": gap,
                                                     "mean": reduction, "sum": reduction},
                         accepts_everything=True, limits=OM_LIMITS)


def test_global_pool_and_big_windows_staged_by_fixpoint():
    class Net(torch.nn.Module):
        def forward(self, x):
            a = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            b = x.mean((2, 3), keepdim=True)
            c = torch.nn.functional.max_pool2d(x, 70, 1)
            return a + b + c.amax((2, 3), keepdim=True)

    om = _om_like()
    x = torch.randn(1, 2, 96, 72)
    out = decompose(Net(), om, x)
    torch.testing.assert_close(out(x), Net()(x), atol=1e-5, rtol=1e-5)
    from deployplug.capture import capture

    graph = capture(out, x)
    assert all(om.refusal(n, graph) is None for n in graph)
    assert graph.ops()["avg_pool2d"] >= 4
