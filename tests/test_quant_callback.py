"""``onnx_int8`` from the callback: calibrated on training batches, judged on the validation
set with its labels, the verdict logged next to the exact formats' numbers."""

from __future__ import annotations

import pytest
import torch
from callback_harness import NormHeadModule, forward_copy, logged_metrics, make_trainer, tiny_data

from deployplug.callback import DeployCallback
from deployplug.errors import ConfigError
from deployplug.manifest import load_manifest


def test_the_callback_exports_int8_and_logs_its_accuracy_and_agreement(tmp_path):
    torch.manual_seed(0)
    module = NormHeadModule()
    data = tiny_data(num_samples=48, val_samples=40, batch_size=8)
    callback = DeployCallback(formats=["onnx", "onnx_int8"], fail_on_error=True,
                              int8={"weights": "per_tensor", "max_drop": 0.5,
                                    "calibration_samples": 24})
    make_trainer(tmp_path, [callback], limit_val_batches=1.0).fit(module, data)

    final = callback.exports["final"]
    manifest = load_manifest(final["dir"])
    assert set(manifest.formats) == {"onnx", "onnx_int8"} and manifest.passed
    info = manifest.formats["onnx_int8"]["info"]
    assert info["calibration_samples"] == 24 and info["judged_on"] == "eval_inputs"
    assert info["weights"] == "per_tensor" and info["eval_labels"] is True
    verdict = manifest.verification.judgements["onnx_int8"]
    assert verdict["samples"] == 40 and verdict["decided_by"] == "accuracy"
    x, y = data.val_set.tensors
    with torch.no_grad():
        fp32 = forward_copy(module)(x).argmax(1)
    assert verdict["fp32_accuracy"] == pytest.approx(float((fp32 == y).double().mean()))
    metrics = logged_metrics(tmp_path)
    assert metrics["deploy/onnx_int8/val_acc"] == pytest.approx(verdict["int8_accuracy"])
    assert metrics["deploy/onnx_int8/val_agreement"] == pytest.approx(verdict["agreement"])
    assert metrics["deploy/onnx_int8/passed"] == 1.0
    assert metrics["deploy/onnx/max_error"] <= 1e-5


def test_int8_settings_are_checked_when_the_callback_is_made():
    with pytest.raises(ConfigError, match="add it to formats"):
        DeployCallback(formats=["onnx"], int8={"weights": "per_tensor"})
    with pytest.raises(ConfigError, match="unknown int8 option"):
        DeployCallback(formats=["onnx_int8"], int8={"weigths": "per_tensor"})
    with pytest.raises(ConfigError, match="validation dataloader"):
        DeployCallback(formats=["onnx_int8"], int8={"eval_inputs": [torch.zeros(1)]})
    with pytest.raises(ConfigError, match="repair"):
        DeployCallback(formats=["onnx_int8"], int8={"repair": "magic"})
