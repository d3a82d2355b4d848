"""x + c, x * c, ... as a depthwise 1x1 conv; broadcasting binaries via nearest upsample."""

import pytest
import torch
from decompose_harness import A, check_aten, check_module, no_rule
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

OPS = {
    "add": torch.ops.aten.add.Tensor,
    "sub": torch.ops.aten.sub.Tensor,
    "mul": torch.ops.aten.mul.Tensor,
    "div": torch.ops.aten.div.Tensor,
    "rsub": torch.ops.aten.rsub.Scalar,
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
        form, first = "scalar", True
    elif op == "div" or form == "scalar":
        first = True  # c / x is not affine; aten's Tensor overloads take the tensor first
    else:
        first = draw(st.booleans())
    alpha = draw(st.sampled_from([1, 2, -0.5])) if op in ("add", "sub", "rsub") else None
    return op, rank, form, first, alpha


@pytest.mark.parametrize("operator", sorted(OPS))
@settings(max_examples=200, deadline=None)
@given(data=st.data(), c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_constant_arith(operator, data, c, seed):
    case = data.draw(arith_case(operator))
    op, rank, form, first, alpha = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*((2, c, 3, 4) if rank == 4 else (3, c)), generator=gen)
    const = _constant(form, c, gen)
    args = (A(0), const) if first else (const, A(0))
    kwargs = {} if alpha is None else {"alpha": alpha}
    check_aten(f"{op}_constant_as_channel_affine", OPS[op], [x], *args, **kwargs)


def test_constant_divided_by_activation_and_width_broadcast_are_refused():
    x = torch.randn(1, 3, 2, 3)
    assert no_rule(OPS["div"], [x], torch.rand(1, 3, 1, 1) + 1, A(0))
    assert no_rule(OPS["mul"], [x], A(0), torch.rand(3))  # (3,) broadcasts along W


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


def test_captured_scalar_add_and_buffer_mul():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.rand(1, 3, 1, 1) + 0.5)

        def forward(self, x):
            return x * self.s

    class AddThree(nn.Module):
        def forward(self, x):
            return x + 3

    check_module(Net(), torch.randn(1, 3, 4, 4), "mul", "mul_constant_as_channel_affine")
    check_module(AddThree(), torch.randn(1, 3, 4, 4), "add", "add_constant_as_channel_affine")


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
