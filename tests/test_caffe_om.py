"""The om target (Caffe for Huawei Ascend's converter): profile limits, Upsample, the checker."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fn_module import Fn
from google.protobuf import text_format
from torch import nn

from deployplug.capture import capture
from deployplug.errors import ArtifactFormatError, UnsupportedOpError
from deployplug.exporters import get_exporter
from deployplug.exporters.caffe import om_check
from deployplug.exporters.caffe.schema import messages
from deployplug.exporters.caffe.writer import read_prototxt
from deployplug.profiles import get_target
from deployplug.runtimes import get_runner
from deployplug.testing import normalized_error, randomize_batchnorm

EXPORTER = get_exporter("caffe")
RUNNER = get_runner("caffe")
TOL = 1e-5


def _decoder():
    return Fn(lambda m, x: (m.conv2(F.interpolate(m.conv(x), scale_factor=2)),
                            F.interpolate(x, scale_factor=(2, 3))),
              conv=nn.Sequential(nn.Conv2d(3, 6, 3, padding=1),
                                 randomize_batchnorm(nn.BatchNorm2d(6), seed=4), nn.ReLU()),
              conv2=nn.Conv2d(6, 2, 1)).eval()


@pytest.mark.parametrize("target", ["caffe", "om"])
def test_nearest_upsample_by_integer_factors(target, tmp_path):
    model = _decoder()
    x = torch.randn(1, 3, 5, 7)
    record = EXPORTER.write(model, (x,), tmp_path, target)
    got = RUNNER.run(tmp_path, record, [x.numpy()])
    ref = model(x)
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape)
        assert normalized_error(g, r) <= TOL
    net = read_prototxt(tmp_path / "model.prototxt", "om" if target == "om" else "bvlc")
    ups = [layer for layer in net.layer if layer.type in ("Upsample", "Deconvolution")]
    assert len(ups) == 2
    if target == "om":
        assert record.info["dialect"] == "om"
        assert {(u.upsample_param.stride_h, u.upsample_param.stride_w) for u in ups} == {
            (2, 2), (2, 3)}
        assert any("Upsample" in note for note in record.info["runtime_notes"])
    else:
        assert all(u.type == "Deconvolution" for u in ups)
        assert "upsample_param" not in (tmp_path / "model.prototxt").read_text()


def test_om_profile_refuses_every_violation_at_once(tmp_path):
    model = Fn(lambda m, x: (
        F.max_pool2d(x, 34),  # window > 32
        F.adaptive_avg_pool2d(x, 1),  # global pooling over 40x36
        F.pad(x, (0, 1, 1, 1)),  # asymmetric
        x.mean((2, 3)),  # spatial reduction
        x.mean(1, keepdim=True),  # channel reduction: allowed
        F.max_pool2d(x, 3, 2, 1),  # small window: allowed
    )).eval()
    x = torch.randn(1, 2, 40, 36)
    with pytest.raises(UnsupportedOpError) as info:
        EXPORTER.write(model, (x,), tmp_path / "om", "om")
    offenders = info.value.offenders
    assert sorted(o.op for o in offenders) == ["adaptive_avg_pool2d", "max_pool2d", "mean", "pad"]
    assert all(o.target == "om" and o.suggestions for o in offenders)
    assert "34x34" in next(o.reason for o in offenders if o.op == "max_pool2d")
    assert "40x36" in next(o.reason for o in offenders if o.op == "adaptive_avg_pool2d")
    assert not (tmp_path / "om").exists()
    # the same model is fine for plain Caffe, and exact in OpenCV
    record = EXPORTER.write(model, (x,), tmp_path / "caffe", "caffe")
    got = RUNNER.run(tmp_path / "caffe", record, [x.numpy()])
    for g, r in zip(got, model(x)):
        assert normalized_error(g, r) <= TOL


def test_profiles_agree_with_lowering_on_common_ops():
    om, caffe = get_target("om"), get_target("caffe")
    assert om.format == caffe.format == "caffe"
    assert set(om.ops) == set(caffe.ops)
    for absent in ("conv3d", "instance_norm", "gelu", "mish", "erf", "permute"):
        assert absent not in caffe.ops
    model = Fn(lambda m, x: F.relu6(m.conv(x)) + F.hardswish(x[:, :2]),
               conv=nn.Conv2d(3, 2, 3, padding=1))
    graph = capture(model.eval(), (torch.randn(1, 3, 8, 8),))
    for node in graph.nodes:
        assert caffe.refusal(node, graph) is None, node.op
        assert om.refusal(node, graph) is None, node.op


def test_checker_passes_an_exported_om_net(tmp_path):
    record = EXPORTER.write(_decoder(), (torch.randn(1, 3, 5, 7),), tmp_path, "om")
    net = read_prototxt(tmp_path / "model.prototxt", "om")
    assert om_check.violations(net) == []
    assert record.files == ["model.prototxt", "model.caffemodel"]


VIOLATING = """
name: "bad"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 40 dim: 40 } } }
layer { name: "r6" type: "ReLU6" bottom: "data" top: "r6" }
layer { name: "big" type: "Pooling" bottom: "data" top: "big"
        pooling_param { pool: MAX kernel_size: 33 stride: 1 } }
layer { name: "gap" type: "Pooling" bottom: "data" top: "gap"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "up0" type: "Upsample" bottom: "data" top: "up0"
        upsample_param { stride_h: 0 stride_w: 2 } }
layer { name: "up_scaled" type: "Upsample" bottom: "data" top: "up_scaled"
        upsample_param { scale: 0.5 stride_h: 2 stride_w: 2 } }
layer { name: "red" type: "Reduction" bottom: "data" top: "red"
        reduction_param { operation: MEAN axis: 2 } }
layer { name: "zeros" type: "DummyData" top: "zeros" }
layer { name: "chpad" type: "Concat" bottom: "data" bottom: "zeros" top: "chpad"
        concat_param { axis: 1 } }
layer { name: "ok" type: "Pooling" bottom: "data" top: "ok"
        pooling_param { pool: MAX kernel_size: 32 stride: 32 } }
"""


def test_checker_rejects_a_violating_prototxt():
    net = text_format.Parse(VIOLATING, messages("om").NetParameter())
    found = {v.layer: v.reason for v in om_check.violations(net, {"data": (1, 3, 40, 40)})}
    assert set(found) == {"r6", "big", "gap", "up0", "up_scaled", "red", "chpad"}
    assert "33x33" in found["big"] and "40x40" in found["gap"]
    with pytest.raises(ArtifactFormatError, match="7 om constraint"):
        om_check.enforce(net, {"data": (1, 3, 40, 40)})
    # without shapes a global pooling cannot be proven small enough
    unknown = {v.layer: v.reason for v in om_check.violations(net)}
    assert "unknown size" in unknown["gap"]


def test_global_pooling_within_limit_is_accepted(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 33, 30)
    record = EXPORTER.write(model, (x,), tmp_path, "om")
    got = RUNNER.run(tmp_path, record, [x.numpy()])
    assert normalized_error(got[0], model(x)) <= TOL


def test_unet_with_asymmetric_pad_after_decomposition(tmp_path):
    """om refuses the U-Net's asymmetric pad; the decomposition rules make it legal."""
    import deployplug.models as models
    from deployplug.decompositions import decompose

    model = randomize_batchnorm(models.build("unet_like", num_classes=4), seed=3).eval()
    x = torch.randn(1, 3, 21, 18)
    with pytest.raises(UnsupportedOpError, match="pad"):
        EXPORTER.write(model, (x,), tmp_path / "raw", "om")
    legal = decompose(model, "om", x)
    record = EXPORTER.write(legal, (x,), tmp_path / "om", "om")
    got = RUNNER.run(tmp_path / "om", record, [x.numpy()])
    assert normalized_error(got[0], model(x)) <= TOL
