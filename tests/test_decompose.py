"""decompose(): whole models, functional forms, fixpoint, errors, and the user's model untouched."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from decompose_harness import onnx_run, refusing
from torch import nn

from deployplug.capture import capture
from deployplug.decompositions import decompose, run_decompose
from deployplug.errors import UnsupportedOpError
from deployplug.profiles import get_target, shipped_targets
from deployplug.testing import normalized_error, randomize_batchnorm


class Mixed(nn.Module):
    """Module and functional forms of every concept the Caffe profile refuses."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, stride=(2, 1, 1), padding=1)
        self.bn3 = nn.BatchNorm3d(4)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.up = nn.ConvTranspose2d(12, 6, 3, stride=2, output_padding=1)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = self.bn3(self.c3(x)).flatten(1, 2)
        y = self.inorm(y)
        y = F.instance_norm(y)
        y = F.pad(y, (1, 2, 0, 1))
        y = F.pad(y, (0, 0, 0, 0, 1, 1), value=0.25)[:, :12]
        y = self.up(y)
        y = F.interpolate(y, size=(20, 30))
        y = F.interpolate(y, size=(40, 60), mode="bilinear")
        y = F.gelu(y) + 3
        y = F.mish(y) * 0.5
        y = F.adaptive_avg_pool2d(y, (5, 6))
        return self.head(y)


def _ops(model, x):
    return capture(model, x).ops()


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    return randomize_batchnorm(Mixed()).eval(), torch.randn(1, 2, 6, 8, 8)


def test_caffe_decompose_removes_every_refused_op_and_matches(mixed):
    model, x = mixed
    profile = get_target("caffe")
    out = decompose(model, x, profile)
    graph = capture(out, x)
    assert [n.op for n in graph if profile.refusal(n, graph)] == []
    assert not {"conv3d", "instance_norm", "gelu", "mish"} & set(graph.ops())
    assert not any(isinstance(m, (nn.Conv3d, nn.InstanceNorm2d)) for m in out.modules())
    with torch.no_grad():
        ref = model(x)
        assert normalized_error(out(x), ref) <= 1e-5


def test_rewritten_module_runs_in_onnxruntime():
    """The rewritten GraphModule takes train(False) and exports, so ONNX can check a rule."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.GELU(), nn.Mish()).eval()
    x = torch.randn(1, 2, 6, 6)
    out = decompose(net, x, "caffe")
    assert not {"gelu", "mish"} & set(_ops(out, x))
    with torch.no_grad():
        ref = net(x)
    assert normalized_error(onnx_run(out, [x]), ref.numpy()) <= 1e-5


def test_om_fixpoint_stages_global_pooling_of_large_maps():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inorm = nn.InstanceNorm2d(3, affine=True)

        def forward(self, x):
            return self.inorm(x).mean((2, 3))

    om = get_target("om")
    x = torch.randn(1, 3, 64, 40) * 2 + 1
    result = run_decompose(Net(), om, x)
    assert not result.offenders
    rules = [a.rule for a in result.applied]
    assert "instance_norm_broadcast" in rules and "avg_pool2d_split" in rules
    graph = capture(result.module, x)
    assert all(om.refusal(n, graph) is None for n in graph)
    assert max(max(n.args["kernel_size"]) for n in graph if n.op == "avg_pool2d") <= 32
    torch.testing.assert_close(result.module(x), Net().eval()(x), atol=1e-5, rtol=1e-5)


def test_every_offender_reported_at_once():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.spectral = nn.Identity()
            self.inorm = nn.InstanceNorm2d(2)

        def forward(self, x):
            y = self.inorm(x)
            y = F.interpolate(y, size=(7, 7), mode="bilinear")
            return torch.fft.rfft2(y).abs()

    with pytest.raises(UnsupportedOpError) as info:
        decompose(Bad(), torch.randn(1, 2, 5, 5), "caffe")
    found = {o.op: o for o in info.value.offenders}
    assert {"upsample_bilinear2d", "fft_rfft2"} <= set(found)
    assert "instance_norm" not in found  # that one has a rule
    assert all(o.target == "caffe" for o in info.value.offenders)
    assert "is not an integer factor" in found["upsample_bilinear2d"].reason
    assert any("no decomposition rule exists for 'upsample_bilinear2d'" in s
               for s in found["upsample_bilinear2d"].suggestions)
    assert "fft_rfft2" in str(info.value)


def test_onnx_target_returns_plain_copy_and_user_model_untouched(mixed):
    model, x = mixed
    model.train()
    before = copy.deepcopy(model.state_dict())
    out = decompose(model, x, "onnx")
    assert type(out) is Mixed and not out.training and model.training
    assert out is not model
    decompose(model, x, "caffe")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model.eval()


def test_no_refused_node_returns_the_plain_copy():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    out = decompose(net, torch.randn(1, 3, 8, 8), "caffe")
    assert isinstance(out, nn.Sequential)


def test_functional_forms():
    class Fn(nn.Module):
        def forward(self, x):
            y = F.instance_norm(x)
            y = F.pad(y, (0, 1, 2, 0))
            y = F.interpolate(y, size=(y.shape[2] * 2 + 1, y.shape[3] * 3))
            return 3 - y

    x = torch.randn(2, 3, 5, 4)
    profile = refusing("instance_norm", "pad", "upsample_nearest2d", "rsub")
    result = run_decompose(Fn(), profile, x)
    assert sorted(a.rule for a in result.applied if a.round == 0) == sorted([
        "instance_norm_broadcast", "pad_symmetric_crop", "upsample_nearest2d_resample",
        "rsub_constant_as_channel_affine"])
    assert np.allclose(result.module(x).numpy(), Fn()(x).numpy(), atol=1e-5)


def test_needs_example_input_for_a_restrictive_target():
    with pytest.raises(ValueError, match="example_input"):
        run_decompose(nn.Conv2d(1, 1, 1), "caffe")


@pytest.mark.parametrize(
    "profile",
    [p for p in shipped_targets() if p.name != "onnx"], ids=lambda p: p.name)
def test_profiles_conv3d_and_instance_norm(profile):
    """Shipped targets: nothing refused survives, or exactly that is reported."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3 = nn.Conv3d(1, 2, (2, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1))
            self.inorm = nn.InstanceNorm2d(4, affine=True)

        def forward(self, x):
            return self.inorm(self.c3(x).flatten(1, 2))

    x = torch.randn(1, 1, 4, 6, 6)
    net = Net().eval()
    result = run_decompose(net, profile, x)
    graph = capture(result.module, x)
    left = [n for n in graph if profile.refusal(n, graph)]
    offenders = [(o.op, o.module_path) for o in result.offenders]
    assert offenders == [(n.op, n.module_path) for n in left]
    if not left:
        assert not {"conv3d", "instance_norm"} & set(graph.ops())
        torch.testing.assert_close(result.module(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["caffe", "om"])
def test_real_caffe_and_om_profiles_leave_nothing_forbidden(target, mixed):
    """The shipped targets: every op of the mixed model is rewritten into legal ones."""
    model, x = mixed
    profile = get_target(target)
    out = decompose(model, x, target)
    graph = capture(out, x)
    assert [n.op for n in graph if profile.refusal(n, graph)] == []
    assert not {"conv3d", "instance_norm", "gelu", "mish"} & set(graph.ops())
    with torch.no_grad():
        assert normalized_error(out(x), model(x)) <= 1e-5
