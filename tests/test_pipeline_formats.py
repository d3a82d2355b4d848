"""The whole pipeline across formats and targets: fusion, decomposition, three runtimes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deployplug as dp
from deployplug.errors import UnsupportedOpError
from deployplug.testing import randomize_batchnorm


def repvgg_net() -> nn.Module:
    net = nn.Sequential(
        dp.RepVGGBlock(3, 8, stride=2),
        dp.RepVGGBlock(8, 8),
        dp.RepVGGBlock(8, 8, groups=4),
        dp.RepVGGBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 7),
    )
    return randomize_batchnorm(net, seed=5).eval()


class NeedsRewrites(nn.Module):
    """Ops the Caffe/om toolchains lack, each with an exact rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.InstanceNorm2d(6, affine=True)
        self.head = nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = F.relu(self.norm(self.conv(x))) * 0.5 + 0.25
        y = F.pad(y, (0, 1, 1, 0))  # asymmetric
        y = F.interpolate(y, size=(2 * y.shape[2], 2 * y.shape[3]), mode="nearest")
        return self.head(y)


class Spectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.fft.rfft2(self.conv(x)).abs()


def test_all_three_formats_from_one_training_form_model(tmp_path):
    net = repvgg_net()
    manifest = dp.export(net, torch.randn(1, 3, 20, 18), tmp_path / "all",
                         formats=("onnx", "caffe", "msnhnet"))
    assert manifest.passed, str(manifest.verification)
    names = {p.name for p in manifest.dir.iterdir()}
    assert names == {"model.onnx", "model.prototxt", "model.caffemodel", "model.msnhnet",
                     "model.msnhbin", "reference.npz", "report.md", "manifest.json"}
    for fmt in ("onnx", "caffe", "msnhnet"):
        assert manifest.verification.max_error(fmt) <= 1e-5
    # the directory re-verifies without the model, in all three runtimes
    report = dp.verify(manifest.dir)
    assert report.passed and set(report.formats()) == {"onnx", "caffe", "msnhnet"}
    # the fused network has no BatchNorm left in the Caffe file either
    assert "BatchNorm" not in (manifest.dir / "model.prototxt").read_text()


@pytest.mark.parametrize("target", ["caffe", "om"])
def test_decompositions_are_applied_and_recorded_per_target(tmp_path, target):
    model = NeedsRewrites().eval()
    manifest = dp.export(model, torch.randn(1, 3, 11, 9), tmp_path / target,
                         formats=("onnx", "caffe"), target=target)
    assert manifest.passed, str(manifest.verification)
    data = json.loads((manifest.dir / "manifest.json").read_text())
    caffe_info = data["formats"]["caffe"]
    assert caffe_info["target"] == target
    rewritten = {r["op"] for r in caffe_info["info"]["decomposed"]}
    assert "instance_norm" in rewritten
    assert data["formats"]["onnx"]["target"] == "onnx"
    assert data["formats"]["onnx"]["info"]["decomposed"] == []
    # the pre-flight names exactly the ops the export rewrote
    report = dp.check(model, torch.randn(1, 3, 11, 9), target)
    assert report.passed
    replaced = {row.op for row in report.rows if row.status != "native"}
    assert replaced == rewritten


def test_decompose_flag_off_leaves_the_op_to_the_writer(tmp_path):
    with pytest.raises(UnsupportedOpError, match="instance_norm"):
        dp.export(NeedsRewrites().eval(), torch.randn(1, 3, 8, 8), tmp_path / "x",
                  formats=("caffe",), decompose=False)
    assert not (tmp_path / "x").exists()


def test_unconvertible_op_names_op_and_module_and_leaves_nothing(tmp_path):
    with pytest.raises(UnsupportedOpError) as info:
        dp.export(Spectral(), torch.randn(1, 2, 8, 8), tmp_path / "fft", formats=("caffe",))
    text = str(info.value)
    assert "fft" in text and "caffe" in text
    assert list(tmp_path.iterdir()) == []


def _rehash(directory, name):
    """Re-record a tampered file in the manifest, so the numbers (not integrity) must catch it."""
    from deployplug.manifest import describe_files

    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["files"] = [describe_files(directory, [name])[0] if e["name"] == name else e
                     for e in data["files"]]
    path.write_text(json.dumps(data))


def test_caffe_mismatch_names_the_first_diverging_layer(tmp_path):
    from deployplug.exporters.caffe.writer import read_caffemodel

    net = repvgg_net()
    manifest = dp.export(net, torch.randn(1, 3, 16, 16), tmp_path / "c",
                         formats=("caffe",))
    assert manifest.passed
    path = manifest.dir / "model.caffemodel"
    proto = read_caffemodel(path)
    layer = next(lay for lay in proto.layer if lay.type == "Convolution")
    data = np.array(layer.blobs[0].data, dtype=np.float32)
    data[:4] += 3.0
    del layer.blobs[0].data[:]
    layer.blobs[0].data.extend(data.tolist())
    path.write_bytes(proto.SerializeToString())
    _rehash(manifest.dir, path.name)
    report = dp.verify(manifest.dir, model=net)
    assert not report.passed
    assert report.divergence.get("caffe")
    # the tampered conv itself is named, not a later layer the error propagates into
    assert report.divergence["caffe"].startswith(f"layer '{layer.name}'")


class ParameterArithmetic(nn.Module):
    """Arithmetic on parameters alone (a learned log-scale, a flipped weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.log_scale = nn.Parameter(torch.randn(1, 4, 1, 1) * 0.3)

    def forward(self, x):
        return self.conv(x) * self.log_scale.exp().flip(1)


def test_parameter_arithmetic_is_folded_for_check_and_every_writer(tmp_path):
    model = ParameterArithmetic().eval()
    x = torch.randn(1, 3, 9, 7)
    for target in ("caffe", "om", "msnhnet"):
        report = dp.check(model, x, target)
        assert report.passed, str(report)
        assert not {"exp", "flip"} & {row.op for row in report.rows}
    manifest = dp.export(model, x, tmp_path / "fold", formats=("onnx", "caffe", "msnhnet"))
    assert manifest.passed, str(manifest.verification)


def test_onnx_mismatch_names_the_first_diverging_layer(tmp_path):
    import onnx

    net = repvgg_net()
    manifest = dp.export(net, torch.randn(1, 3, 16, 16), tmp_path / "o")
    assert manifest.passed
    path = manifest.artifact("onnx")
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if t.name == "2.reparam.weight")
    array = onnx.numpy_helper.to_array(weight).copy()
    array[:, :, 1, 1] += 2.0
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(path))
    _rehash(manifest.dir, path.name)
    report = dp.verify(manifest.dir, model=net)
    assert not report.passed
    # blocks 0 and 1 still agree; the fused conv of block 2 is named, not its ReLU
    assert report.divergence["onnx"].startswith("layer '/2/reparam/Conv_output_0'")
    assert "artifact layers '/2/reparam/Conv'" in report.divergence["onnx"]
