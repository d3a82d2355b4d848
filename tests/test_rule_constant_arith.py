"""Arithmetic with constants (writers' own layers; rsub by a rule) and broadcasting binaries
(nearest upsample, or a broadcast product for targets that only broadcast products)."""

import pytest
import torch
from decompose_harness import A, aten_node, caffe_error, check_aten, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.capture import capture
from deployplug.decompositions import choose_rule, decompose
from deployplug.profiles import get_target

OPS = {
    "add": torch.ops.aten.add.Tensor,
    "sub": torch.ops.aten.sub.Tensor,
    "mul": torch.ops.aten.mul.Tensor,
    "div": torch.ops.aten.div.Tensor,
    "rsub": torch.ops.aten.rsub.Tensor,
}


def _constant(form, c, gen):
    return {
        "scalar": 1.75,
        "c": torch.rand(c, generator=gen) + 0.5,
        "1c11": torch.rand(1, c, 1, 1, generator=gen) + 0.5,
        "c11": torch.rand(c, 1, 1, generator=gen) + 0.5,
        "one": torch.rand(1, generator=gen) + 0.5,
    }[form]


@st.composite
def arith_case(draw, op):
    """(op, rank, constant form, activation first, alpha): only well-formed, affine cases."""
    rank = draw(st.sampled_from([2, 4]))
    forms = ["scalar", "one"] + (["1c11", "c11"] if rank == 4 else ["c"])
    form = draw(st.sampled_from(forms))
    if op == "rsub":
        first = True  # rsub(x, c) = c - alpha * x
    elif op == "div" or form == "scalar":
        first = True  # c / x is not affine; aten's Tensor overloads take the tensor first
    else:
        first = draw(st.booleans())
    alpha = draw(st.sampled_from([1, 2, -0.5])) if op in ("add", "sub", "rsub") else None
    return op, rank, form, first, alpha


def _case(operator, data, c, seed):
    op, rank, form, first, alpha = data.draw(arith_case(operator))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*((2, c, 3, 4) if rank == 4 else (3, c)), generator=gen)
    const = _constant(form, c, gen)
    if op == "rsub" and form == "scalar":
        const = torch.tensor(const)
    args = (A(0), const) if first else (const, A(0))
    kwargs = {} if alpha is None else {"alpha": alpha}
    return op, x, args, kwargs


@pytest.mark.parametrize("operator", ["add", "sub", "mul", "div"])
@settings(max_examples=200, deadline=None)
@given(data=st.data(), c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_constant_arith_is_the_writers_layer(operator, data, c, seed):
    """Scalar and per-channel constants: Caffe (Power/Scale) and MsnhNet take them as they
    are, so no rule duplicates that; the Caffe layers reproduce PyTorch."""
    op, x, args, kwargs = _case(operator, data, c, seed)
    node, graph, _ = aten_node(OPS[op], [x], *args, **kwargs)
    for target in ("caffe", "om", "msnhnet"):
        assert get_target(target).refusal(node, graph) is None, target
    assert no_rule(OPS[op], [x], *args, **kwargs)
    assert caffe_error(OPS[op], [x], *args, **kwargs) <= 1e-6


@settings(max_examples=200, deadline=None)
@given(data=st.data(), c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rsub_constant_as_channel_affine(data, c, seed):
    op, x, args, kwargs = _case("rsub", data, c, seed)
    check_aten("rsub_constant_as_channel_affine", OPS[op], [x], *args, **kwargs)


def test_rsub_by_a_per_channel_constant_reaches_the_rule_for_caffe():
    x = torch.randn(1, 3, 2, 3)
    node, graph, _ = aten_node(OPS["rsub"], [x], A(0), torch.rand(1, 3, 1, 1))
    assert get_target("caffe").refusal(node, graph) is not None
    check_aten("rsub_constant_as_channel_affine", OPS["rsub"], [x], A(0), torch.rand(1, 3, 1, 1))


def test_constant_divided_by_activation_and_width_broadcast_are_refused():
    x = torch.randn(1, 3, 2, 3)
    assert no_rule(OPS["div"], [x], torch.rand(1, 3, 1, 1) + 1, A(0))
    assert no_rule(OPS["mul"], [x], A(0), torch.rand(3))  # (3,) broadcasts along W


def test_rounding_division_is_refused_not_turned_into_a_product():
    """``x // 2`` is no affine map: every target refuses it and no rule claims it."""
    x = torch.randn(1, 3, 2, 3) * 5
    node, graph, _ = aten_node(torch.ops.aten.div.Tensor_mode, [x], A(0), torch.tensor(2.0),
                               rounding_mode="floor")
    for target in ("caffe", "om", "msnhnet"):
        assert get_target(target).refusal(node, graph) is not None
        assert choose_rule(node, graph, target) is None


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@settings(max_examples=200, deadline=None)
@given(small_first=st.booleans(), c=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_broadcast_binary_by_upsample(op, small_first, c, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(2, c, h, w, generator=gen)
    small = torch.rand(2, c, 1, 1, generator=gen) + 0.5
    assume((h, w) != (1, 1))
    acts = [small, big] if small_first else [big, small]
    check_aten(f"{op}_broadcast_by_upsample", OPS[op], acts, A(0), A(1), target="msnhnet")


def test_captured_scalar_add_and_buffer_mul_stay_native():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.rand(1, 3, 1, 1) + 0.5)

        def forward(self, x):
            return x * self.s + 3

    x = torch.randn(1, 3, 4, 4)
    graph = capture(Net(), x)
    for target in ("caffe", "om", "msnhnet"):
        assert [n.op for n in graph if get_target(target).refusal(n, graph)] == []
        out = decompose(Net(), target, x)
        assert isinstance(out, Net)  # nothing to rewrite: the module itself comes back


@pytest.mark.parametrize("op", ["add", "sub"])
@settings(max_examples=200, deadline=None)
@given(small_first=st.booleans(), alpha=st.sampled_from([1, 2, -0.5]), c=st.integers(1, 3),
       h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_broadcast_sum_by_ones_for_caffe(op, small_first, alpha, c, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(2, c, h, w, generator=gen)
    small = torch.randn(2, c, 1, 1, generator=gen)
    assume((h, w) != (1, 1))
    acts = [small, big] if small_first else [big, small]
    for target in ("caffe", "om"):
        check_aten(f"{op}_broadcast_by_ones", OPS[op], acts, A(0), A(1), target=target,
                   alpha=alpha)
    check_aten(f"{op}_broadcast_by_upsample", OPS[op], acts, A(0), A(1), target="msnhnet",
               alpha=alpha)
