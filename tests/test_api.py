"""The public names stay what the documentation says, whatever was imported first."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

import deployplug as dp

SUBMODULES = ["pipeline", "verification", "preflight", "decompositions", "profiles", "reparam",
              "exporters", "exporters.onnx", "exporters.caffe", "exporters.msnhnet", "callback",
              "manifest", "capture", "models", "blocks"]


@pytest.mark.parametrize("name", sorted(set(dp.__all__) - {"__version__", "models"}))
def test_public_names_are_not_shadowed_by_submodules(name):
    for sub in SUBMODULES:  # importing a submodule must not replace a public function
        importlib.import_module(f"deployplug.{sub}")
    value = getattr(dp, name)
    assert not isinstance(value, types.ModuleType), f"dp.{name} is a module"
    assert inspect.isclass(value) or callable(value)


def test_models_namespace_and_targets():
    assert "repvgg_a0" in dp.models.names()
    assert {t.name for t in dp.targets()} == {"onnx", "caffe", "om", "msnhnet"}
    assert dp.__version__


def test_decompose_takes_model_input_target_and_still_accepts_the_old_order():
    import warnings

    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2))
    x = torch.randn(1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = dp.decompose(net, x, "caffe")
    with pytest.warns(DeprecationWarning, match="decompose\\(model, example_input, target\\)"):
        old = dp.decompose(net, "caffe", x)
    assert torch.equal(new(x), old(x))
    with pytest.raises(TypeError, match="needs a target"):
        dp.decompose(net, x)
