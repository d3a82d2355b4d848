"""The export pipeline for ONNX: manifest, reference data, atomicity, verification, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import deployplug as dp
from deployplug.errors import (
    ExportFailedError,
    InputShapeError,
    OutputDirectoryError,
    VerificationError,
)
from deployplug.manifest import load_manifest
from deployplug.runtimes.onnxruntime import make_session
from deployplug.testing import randomize_batchnorm
from deployplug.verification import load_reference


def small_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return randomize_batchnorm(net, seed=3)


class Drifting(nn.Module):
    """A model whose output changes on every call: no artifact can ever match it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * float(self.calls)


@pytest.fixture()
def exported(tmp_path):
    net = small_net()
    manifest = dp.export(net, torch.zeros(1, 3, 13, 10), tmp_path / "art")
    return net, manifest


def test_manifest_records_files_shapes_versions_and_verification(exported):
    _, manifest = exported
    assert manifest.passed
    data = json.loads((manifest.dir / "manifest.json").read_text())
    assert data["passed"] is True
    assert data["stages"] == {"reparameterize": True, "decompose": True, "verify": True}
    assert data["inputs"] == [{"name": "input", "shape": [1, 3, 13, 10], "dtype": "float32"}]
    assert data["outputs"][0]["shape"] == [1, 5]
    assert data["formats"]["onnx"]["info"]["opset"] == 17
    assert data["formats"]["onnx"]["info"]["exporter"] == "torchscript"
    for entry in data["files"]:
        digest = hashlib.sha256((manifest.dir / entry["name"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"]
    assert {e["name"] for e in data["files"]} == {"model.onnx", "reference.npz", "report.md"}
    for package in ("torch", "onnx", "onnxruntime", "deployplug"):
        assert package in data["versions"]
    assert data["verification"]["formats"]["onnx"]["max_error"] <= 1e-5
    assert manifest.metrics()["deploy/onnx/passed"] == 1.0
    assert "PASSED" in str(manifest)


def test_fused_graph_has_no_batchnorm_and_checker_passes(exported):
    _, manifest = exported
    proto = onnx.load(str(manifest.artifact("onnx")))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops
    assert ops <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}


def test_reference_npz_replays_in_onnxruntime(exported):
    net, manifest = exported
    samples, outputs = load_reference(manifest.dir / "reference.npz")
    assert len(samples) == 3 and all(s[0].std() > 0.5 for s in samples[1:])  # example + 2 random
    session = make_session(manifest.artifact("onnx"))
    for ins, outs in zip(samples, outputs):
        got = session.run(None, {"input": ins[0]})[0]
        with torch.no_grad():
            ref = net.eval()(torch.from_numpy(ins[0])).numpy()
        np.testing.assert_allclose(outs[0], ref, rtol=0, atol=1e-6)
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-5


def test_training_model_is_not_touched(tmp_path):
    net = small_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dp.export(net, torch.randn(1, 3, 8, 8), tmp_path / "a")
    assert net.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_verify_directory_without_and_with_model(exported):
    net, manifest = exported
    report = dp.verify(manifest.dir)
    assert report.passed and report.formats() == ["onnx"]
    report = dp.verify(manifest.dir, model=net, inputs=torch.randn(1, 3, 13, 10))
    assert report.passed
    assert {c.source for c in report.comparisons} == {"recorded", "model"}


def test_verify_detects_a_tampered_artifact(exported):
    net, manifest = exported
    path = manifest.artifact("onnx")
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0, 0, 0, 0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(path))
    # re-record the file's hash, so the numbers (not the integrity check) must catch it
    data = json.loads((manifest.dir / "manifest.json").read_text())
    entry = next(e for e in data["files"] if e["name"] == path.name)
    entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (manifest.dir / "manifest.json").write_text(json.dumps(data))
    report = dp.verify(manifest.dir)
    assert not report.passed
    assert "MISMATCH" in str(report)
    with pytest.raises(VerificationError):
        dp.verify(manifest.dir, raise_on_failure=True)


def test_verify_against_a_different_model_fails(exported):
    _, manifest = exported
    other = small_net()
    with torch.no_grad():
        other[0].weight.mul_(1.5)
    assert not dp.verify(manifest.dir, model=other).passed


def test_failed_verification_raises_and_lands_beside_not_at_out_dir(tmp_path):
    with pytest.raises(VerificationError):
        dp.export(Drifting(), torch.randn(1, 3, 4, 4), tmp_path / "drift",
                  reparameterize=False)
    assert not (tmp_path / "drift").exists()
    failed = tmp_path / "drift.failed"
    assert json.loads((failed / "manifest.json").read_text())["passed"] is False
    assert load_manifest(failed).passed is False
    manifest = dp.export(Drifting(), torch.randn(1, 3, 4, 4), tmp_path / "drift2",
                         reparameterize=False, strict=False)
    assert not manifest.passed and manifest.dir == tmp_path / "drift2.failed"
    assert not (tmp_path / "drift2").exists()


def test_dynamo_exporter_single_file_and_dynamic_batch(tmp_path):
    net = small_net()
    manifest = dp.export(net, torch.randn(1, 3, 12, 12), tmp_path / "dyn",
                         onnx_options={"dynamo": True, "dynamic_batch": True, "opset": 18})
    assert manifest.passed
    assert sorted(p.name for p in manifest.dir.iterdir()) == [
        "manifest.json", "model.onnx", "reference.npz", "report.md"]
    info = manifest.formats["onnx"]["info"]
    assert info["exporter"] == "dynamo" and info["opset"] >= 18
    proto = onnx.load(str(manifest.artifact("onnx")))
    inits = {t.name for t in proto.graph.initializer}
    assert not [v for v in proto.graph.value_info if v.name in inits]
    batch = torch.randn(3, 3, 12, 12)
    got = make_session(manifest.artifact("onnx")).run(None, {"input": batch.numpy()})[0]
    with torch.no_grad():
        ref = net.eval()(batch).numpy()
    assert got.shape == (3, 5)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-5


def test_torchscript_exporter_dynamic_batch_and_opset(tmp_path):
    manifest = dp.export(small_net(), torch.randn(1, 3, 9, 9), tmp_path / "ts",
                         onnx_options={"opset": 13, "dynamic_batch": True})
    assert manifest.formats["onnx"]["info"]["opset"] == 13
    out = make_session(manifest.artifact("onnx")).run(
        None, {"input": np.random.rand(4, 3, 9, 9).astype(np.float32)})[0]
    assert out.shape == (4, 5)


def test_a_previous_export_is_replaced_whole(tmp_path):
    out = tmp_path / "art"
    dp.export(small_net(), torch.randn(1, 3, 8, 8), out, formats=("onnx", "caffe"))
    dp.export(small_net(), torch.randn(1, 3, 8, 8), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "model.onnx", "reference.npz", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "art"]


def test_wrong_input_shape_is_a_clear_error(tmp_path):
    with pytest.raises(InputShapeError, match=r"\(1, 1, 8, 8\).*batch dimension"):
        dp.export(small_net(), torch.randn(1, 1, 8, 8), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputDirectoryError, match="writable"):
        dp.export(small_net(), torch.randn(1, 3, 8, 8), blocker / "sub" / "art")


def test_exporter_failure_leaves_no_partial_directory(tmp_path, monkeypatch):
    from deployplug.exporters.onnx import OnnxExporter

    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportFailedError, match="simulated exporter crash"):
        dp.export(small_net(), torch.randn(1, 3, 8, 8), tmp_path / "art")
    assert list(tmp_path.iterdir()) == []
    assert OnnxExporter.format == "onnx"


def test_unknown_format_and_target(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        dp.export(small_net(), torch.randn(1, 3, 8, 8), tmp_path / "a", formats=("tflite",))
    with pytest.raises(ValueError, match="unknown target"):
        dp.export(small_net(), torch.randn(1, 3, 8, 8), tmp_path / "b", target="tensorrt")


def test_multiple_inputs_and_outputs(tmp_path):
    class TwoInTwoOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding=1)
            self.b = nn.Conv2d(2, 3, 1)

        def forward(self, x, y):
            s = self.a(x) + self.b(y)
            return s, s.mean((2, 3))

    manifest = dp.export(TwoInTwoOut(), (torch.randn(1, 2, 5, 7), torch.randn(1, 2, 5, 7)),
                         tmp_path / "mio")
    assert manifest.passed
    assert [i["name"] for i in manifest.inputs] == ["x", "y"]
    assert len(manifest.outputs) == 2
    assert dp.verify(manifest.dir, model=TwoInTwoOut()).passed is False  # other weights


def test_onnx_scope_names_map_back_to_module_paths():
    from deployplug.exporters.onnx import scope_to_module_path

    assert scope_to_module_path("/stage1/stage1.0/reparam/Conv") == "stage1.0.reparam"
    assert scope_to_module_path("/stage0/act/Relu") == "stage0.act"
    assert scope_to_module_path("/head/Gemm") == "head"
    assert scope_to_module_path("/Flatten") == ""
