"""Smooth activations no shipped target has (GELU, Mish) as ReLU/Sigmoid/Exp/Pow compositions."""

import pytest
import torch
from decompose_harness import A, check_aten
from hypothesis import given, settings
from hypothesis import strategies as st

aten = torch.ops.aten
CASES = {
    "gelu": (aten.gelu.default, "gelu_by_exp", {}),
    "gelu_tanh": (aten.gelu.default, "gelu_by_exp", {"approximate": "tanh"}),
    "mish": (aten.mish.default, "mish_by_exp", {}),
}


@pytest.mark.parametrize("op", sorted(CASES))
@settings(max_examples=200, deadline=None)
@given(scale=st.sampled_from([0.5, 3.0, 10.0, 60.0]), c=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_smooth_activation(op, scale, c, seed):
    x = torch.randn(2, c, 3, 5, generator=torch.Generator().manual_seed(seed)) * scale
    overload, rule, kwargs = CASES[op]
    check_aten(rule, overload, [x], A(0), **kwargs)
