"""The ``onnx_int8`` format of ``dp.export``: lands only within the drop limit, repairs
recorded and real, re-verifiable from its directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from quant_harness import (
    calibration_batches,
    digits,
    one_thread,
    plant_compensated_outlier,
    plant_dead_feature_outlier,
    trained_tiny,
)
from torch.utils.data import DataLoader, TensorDataset

import deployplug as dp
from deployplug.errors import (
    ConfigError,
    InputShapeError,
    OutputDirectoryError,
    VerificationError,
)
from deployplug.exporters import get_exporter
from deployplug.manifest import load_manifest
from deployplug.onnx_model import load_checked
from deployplug.profiles import get_target
from deployplug.quant.ort_quant import float_weight_nodes, nodes_for
from deployplug.runtimes import get_runner

EXAMPLE = torch.zeros(1, 1, 8, 8)


def export_int8(model, calibration, out, formats=("onnx_int8",), strict=True, **int8):
    """``dp.export`` of the int8 format with the given ``Int8Options`` fields."""
    return dp.export(model, EXAMPLE, out, formats=formats, calibration=calibration, int8=int8,
                     strict=strict)


def int8_record(manifest):
    return manifest.formats["onnx_int8"]["info"]


def judgement(manifest):
    return manifest.verification.judgements["onnx_int8"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def val_batches() -> tuple[list[torch.Tensor], torch.Tensor]:
    _, _, xv, yv = digits()
    return [xv[:180], xv[180:]], yv


def test_int8_lands_only_within_the_drop_limit(tmp_path):
    """A channel 100x larger (function unchanged) breaks per-tensor int8: the plain file is
    refused and kept in ``.failed``; equalization (picked by ``auto``) makes one that lands."""
    model = plant_compensated_outlier(trained_tiny(), channel=5, factor=100.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xv, yv = val_batches()
    out = tmp_path / "int8"
    with pytest.raises(VerificationError) as info:
        export_int8(model, calibration_batches(), out, eval_inputs=xv, eval_labels=yv,
                    weights="per_tensor", repair="none")
    failed = tmp_path / "int8.failed"
    assert not out.exists() and info.value.failed_dir == failed
    assert "FAILED" in str(info.value) and "accuracy" in str(info.value)
    manifest = load_manifest(failed)
    assert set(manifest.failed_formats) == {"onnx_int8"}
    assert {f["name"] for f in manifest.files} >= {"model_int8.onnx", "int8_report.json",
                                                   "int8_eval.npz", "reference.npz"}
    assert judgement(manifest)["accuracy_drop"] > 0.05
    assert not dp.verify(failed).passed  # the stored batches judge it the same way again

    landed = export_int8(model, calibration_batches(), out, eval_inputs=xv, eval_labels=yv,
                         weights="per_tensor", repair="auto")
    info8 = int8_record(landed)
    assert landed.passed and landed.dir == out and info8["repair"] == "equalize"
    assert judgement(landed)["accuracy_drop"] <= 0.01
    assert [t["repair"] for t in info8["tried"]] == ["none", "equalize"]
    assert not info8["tried"][0]["passed"] and info8["tried"][1]["passed"]
    assert ["stage1.1.reparam", "stage2.0.reparam"] in info8["equalization"]["pairs"]
    assert info8["equalization"]["check_error"] <= 1e-5
    assert {p.name for p in out.iterdir()} >= {
        "int8_eval.npz", "int8_report.json", "manifest.json", "model_int8.onnx",
        "reference.npz"}
    report = json.loads((out / "int8_report.json").read_text())
    top = report["reports"]["plain"]["layers"][0]
    assert top["path"] == "stage1.1.reparam" and top["largest"]["branch"] == "identity"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = dp.verify(out, model=model)
    assert again.passed and again.judgements["onnx_int8"]["samples"] == 256
    assert again.judgements["onnx_int8"]["source"] == "model"  # judged against the model


def test_auto_keeps_the_measured_culprit_in_float_when_equalization_cannot_help(tmp_path):
    model = plant_dead_feature_outlier(trained_tiny(), feature=3, value=500.0)
    xv, yv = val_batches()
    manifest = export_int8(model, calibration_batches(), tmp_path / "out", eval_inputs=xv,
                           eval_labels=yv, weights="per_channel", repair="auto")
    info = int8_record(manifest)
    assert manifest.passed and info["repair"] == "keep_float:1"
    assert info["float_layers"] == ["linear"]
    assert info["float_ranking"] == "measured (onnxruntime, greedy)"
    measured = json.loads((manifest.dir / "int8_report.json").read_text())["reports"]["plain"][
        "measured_float_ranking"]
    assert measured[0]["path"] == "linear" and measured[0]["kl"] >= 0.0
    assert [t["repair"] for t in info["tried"]] == ["none", "equalize", "keep_float:1"]
    nodes = float_weight_nodes(manifest.dir / "model_int8.onnx")
    assert nodes == info["float_nodes"] and len(nodes) == 1


def test_exporter_contract_write_run_judge(tmp_path):
    """What the pipeline calls: write -> run_samples -> judge."""
    exporter = get_exporter("onnx_int8")
    assert exporter.statistical and "onnx_int8" in dp.exporters.formats()
    fused = dp.reparameterize(trained_tiny())
    example = (torch.zeros(1, 1, 8, 8),)
    record = exporter.write(fused, example, tmp_path, get_target("onnx"),
                            calibration=calibration_batches(128), int8_weights="per_tensor",
                            int8_repair="keep_float", int8_float_layers=["stage1.1.reparam"],
                            sensitivity_samples=32)
    assert record.files == ["model_int8.onnx", "int8_report.json"]
    json.dumps(record.to_dict())  # the manifest stores it
    info = record.info
    assert info["weights"] == "per_tensor" and info["judged_on"] == "calibration"
    assert info["float_layers"] == ["stage1.1.reparam"]
    proto = load_checked(tmp_path / "model_int8.onnx")[0]
    assert sorted(float_weight_nodes(tmp_path / "model_int8.onnx")) == sorted(
        nodes_for(proto, ["stage1.1.reparam"]))
    assert info["nodes"]["QuantizeLinear"] > 0 and info["nodes"]["DequantizeLinear"] > 0
    xv, yv = val_batches()
    samples = [[x.numpy()] for x in xv]
    runner = get_runner("onnx_int8")
    outputs = runner.run_samples(tmp_path, record, samples)
    references = [[fused(x).detach().numpy()] for x in xv]
    passed, metrics = exporter.judge(outputs, references, yv.numpy(), max_drop=0.02)
    assert passed and metrics["samples"] == 360
    assert {"agreement", "fp32_accuracy", "int8_accuracy", "max_error"} <= set(metrics)
    assert 0 < metrics["max_error"] < 1
    single = runner.run(tmp_path, record, [xv[0][:3].numpy()])
    assert single[0].shape == (3, 10)


def test_one_export_writes_exact_and_int8_formats_and_logs_int8_metrics(tmp_path):
    """``onnx`` is held to 1e-5, ``onnx_int8`` to its drop limit, in one export; validation
    parity over a loader gives the same int8 numbers as the export's own verdict."""
    from deployplug.parity import validation_parity

    model = trained_tiny()
    _, _, x, y = digits()
    manifest = export_int8(model, calibration_batches(), tmp_path / "out",
                           formats=("onnx", "onnx_int8"), eval_inputs=[x], eval_labels=y)
    assert manifest.passed and set(manifest.formats) == {"onnx", "onnx_int8"}
    assert manifest.verification.max_error("onnx") <= 1e-5
    metrics = manifest.metrics("deploy")
    verdict = judgement(manifest)
    assert metrics["deploy/onnx_int8/val_acc"] == pytest.approx(verdict["int8_accuracy"])
    assert metrics["deploy/onnx_int8/val_agreement"] == pytest.approx(verdict["agreement"])
    assert "onnx_int8: top-1 agreement" in str(manifest)
    assert "onnx_int8: int8 readiness, per-channel weights" in str(manifest)
    loader = DataLoader(TensorDataset(x, y), batch_size=120)
    parity = validation_parity(manifest, model.eval(), loader).metrics("deploy")
    assert parity["deploy/onnx_int8/val_acc"] == pytest.approx(verdict["int8_accuracy"])
    assert parity["deploy/onnx_int8/val_agreement"] == pytest.approx(verdict["agreement"])


def test_refusals_come_before_any_work(tmp_path):
    model = trained_tiny()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirectoryError, match="notes.txt"):
        export_int8(model, calibration_batches(64), mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ConfigError, match="repair"):
        export_int8(model, calibration_batches(64), tmp_path / "a", repair="magic")
    with pytest.raises(ConfigError, match="unknown int8 option"):
        export_int8(model, calibration_batches(64), tmp_path / "a", wieghts="per_tensor")
    with pytest.raises(ConfigError, match="calibration="):
        dp.export(model, EXAMPLE, tmp_path / "a", formats="onnx_int8")
    with pytest.raises(ValueError, match="onnx_int8"):
        dp.export(model, EXAMPLE, tmp_path / "a", formats="onnx",
                  calibration=calibration_batches(64))
    with pytest.raises(InputShapeError, match="exported shape"):
        export_int8(model, [torch.zeros(4, 1, 9, 9)], tmp_path / "a")
    with pytest.raises(ConfigError, match="not quantized layers"):
        export_int8(model, calibration_batches(64), tmp_path / "b", repair="keep_float",
                    float_layers=["stage9.reparam"])
    with pytest.raises(ConfigError, match="calibration="):
        get_exporter("onnx_int8").write(model, (torch.zeros(1, 1, 8, 8),), tmp_path,
                                        get_target("onnx"))
    with pytest.raises(ConfigError, match="int8_runner"):  # auto must run its candidates
        get_exporter("onnx_int8").write(model, (torch.zeros(1, 1, 8, 8),), tmp_path,
                                        get_target("onnx"), calibration=calibration_batches(64),
                                        int8_repair="auto")
    assert not any(p.name.startswith(("a", "b")) for p in tmp_path.iterdir())


def test_the_stored_evaluation_is_bounded_and_read_as_untrusted(tmp_path):
    """``int8_eval.npz`` keeps at most ``stored_samples``; a tampered copy whose manifest was
    rewritten to match is still refused with a typed reason, and the caller's drop limit, not
    the recorded one, decides."""
    import hashlib

    model = trained_tiny()
    manifest = export_int8(model, calibration_batches(128), tmp_path / "out", max_drop=0.05,
                           stored_samples=100)
    info = int8_record(manifest)
    assert info["eval_samples"] == 100 and info["judged_on"] == "calibration"
    ref = np.load(tmp_path / "out" / "reference.npz")
    with torch.no_grad():
        expected = model(torch.from_numpy(ref["s0_in0"])).numpy()
    assert np.allclose(ref["s0_out0"], expected, atol=1e-6)
    strict_limit = dp.verify(manifest.dir, int8_max_drop=0.0)
    assert strict_limit.judgements["onnx_int8"]["max_drop"] == 0.0

    path = manifest.dir / "int8_eval.npz"
    arrays = dict(np.load(path))
    arrays["s0_in0"] = arrays["s0_in0"][:, :, :4]  # wrong per-sample shape
    np.savez(path, **arrays)
    data = json.loads((manifest.dir / "manifest.json").read_text())
    for entry in data["files"]:
        if entry["name"] == "int8_eval.npz":
            blob = path.read_bytes()
            entry["bytes"], entry["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
    (manifest.dir / "manifest.json").write_text(json.dumps(data))
    report = dp.verify(manifest.dir)
    assert not report.passed
    assert "ArtifactFormatError" in report.failures["onnx_int8"]
    assert "input 0" in report.failures["onnx_int8"]
