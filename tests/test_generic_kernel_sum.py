"""``KernelSum``: a composed kernel held as scaled, placed terms, summed only when written.

Against a plain float64 reference (each term regrouped with ``regroup_kernel``, scaled per
output channel, added at its place): the dense value, and the written one in every dtype and
for every block size, which must be exactly the dense value rounded once. Also the algebra
(scaling, constants, placing in a larger extent, sums) against the same arithmetic on dense
kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deployplug.reparam import kernel_sum
from deployplug.reparam.fusion import regroup_kernel
from deployplug.reparam.kernel_sum import KernelSum, Term

SETTINGS = settings(max_examples=200, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def kernel_sums(draw) -> KernelSum:
    dims = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    out_ch = groups * draw(st.integers(1, 3))
    in_ch = out_ch if draw(st.booleans()) else groups * draw(st.integers(1, 3))
    extent = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    # a term may be grouped more finely than the kernel (an identity or depthwise branch)
    choices = [g for g in range(groups, math.gcd(out_ch, in_ch) + 1, groups)
               if out_ch % g == 0 and in_ch % g == 0]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    terms = []
    for _ in range(draw(st.integers(1, 4))):
        g = draw(st.sampled_from(choices))
        size = tuple(draw(st.integers(1, e)) for e in extent)
        start = tuple(draw(st.integers(0, e - k)) for e, k in zip(extent, size))
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        base = torch.randn(out_ch, in_ch // g, *size, generator=gen).to(dtype)
        row = (torch.randn(out_ch, generator=gen, dtype=torch.float64)
               if draw(st.booleans()) else None)
        terms.append(Term(base, g, row, start))
    return KernelSum(tuple(terms), groups, in_ch, extent)


def reference(ks: KernelSum) -> torch.Tensor:
    out = torch.zeros(ks.shape, dtype=torch.float64)
    for t in ks.terms:
        part = regroup_kernel(t.base.to(torch.float64), t.groups, ks.groups)
        if t.row is not None:
            part = part * t.row.view(-1, *([1] * (part.dim() - 1)))
        index = (slice(None), slice(None), *(slice(b, b + k) for b, k in zip(
            t.start, t.base.shape[2:])))
        out[index] += part
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() <= 1e-14 * (1 + b.abs())).all())


@SETTINGS
@given(kernel_sums(), st.sampled_from([1, 5, 64, 1 << 19]))
def test_dense_and_written_kernels_are_the_sum_of_the_terms(ks, block):
    dense = ks.dense()
    assert dense.shape == ks.shape and dense.dtype == torch.float64
    assert close(dense, reference(ks))
    before = kernel_sum.BLOCK_ELEMENTS
    kernel_sum.BLOCK_ELEMENTS = block  # blocks of output channels of every size
    try:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            written = ks.write(dtype)
            assert written.dtype == dtype and written.shape == ks.shape
            assert torch.equal(written, dense.to(dtype))  # one rounding of the same sum
    finally:
        kernel_sum.BLOCK_ELEMENTS = before


@SETTINGS
@given(kernel_sums(), kernel_sums(), st.floats(-3, 3), st.integers(0, 2))
def test_algebra_matches_dense_arithmetic(a, b, alpha, grow):
    factor = torch.randn(a.out_channels, dtype=torch.float64)
    assert close(a.scaled(factor).dense(), a.dense() * factor.view(-1, *[1] * (a.dims + 1)))
    assert close(a.times(alpha).dense(), a.dense() * alpha)
    extent = tuple(e + grow for e in a.extent)
    start = tuple(grow // 2 for _ in a.extent)
    placed = a.placed(start, extent, 1)
    expected = torch.zeros(placed.shape, dtype=torch.float64)
    index = (slice(None), slice(None), *(slice(s, s + e) for s, e in zip(start, a.extent)))
    expected[index] = regroup_kernel(a.dense(), a.groups, 1)
    assert close(placed.dense(), expected)
    if b.shape == a.shape and b.groups == a.groups:
        assert close(a.plus(b).dense(), a.dense() + b.dense())


def test_terms_are_never_written_to():
    base = torch.randn(4, 4, 3, 3)
    keep = base.clone()
    ident = torch.ones(4, 1, 1, 1, dtype=torch.float64)
    ks = KernelSum((Term(base, 1, torch.rand(4, dtype=torch.float64), (0, 0)),
                    Term(ident, 4, torch.rand(4, dtype=torch.float64), (1, 1))), 1, 4, (3, 3))
    ks.write(torch.float32)
    ks.dense()
    assert torch.equal(base, keep) and torch.equal(ident, torch.ones_like(ident))


def test_a_factor_that_is_not_finite_is_refused():
    row = torch.tensor([1.0, math.inf], dtype=torch.float64)
    ks = KernelSum((Term(torch.randn(2, 2, 1), 1, row, (0,)),), 1, 2, (1,))
    with pytest.raises(ValueError, match="not finite"):
        ks.write(torch.float32)


def test_placing_outside_the_extent_or_regrouping_coarser_is_refused():
    ks = KernelSum.of(torch.randn(2, 1, 3), 2)
    with pytest.raises(ValueError, match="does not fit"):
        ks.placed((1,), (3,), 2)
    with pytest.raises(ValueError, match="regroup"):
        KernelSum.of(torch.randn(2, 2, 3), 1).placed((0,), (3,), 2)
