"""Callback options: no fusion, format strings, metric prefixes, averaged weights, folders."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from callback_harness import (
    forward_copy,
    logged_metrics,
    make_trainer,
    run_dir,
    tiny_data,
    tiny_module,
)
from pytorch_lightning.callbacks import Callback

from deployplug.callback import DeployCallback
from deployplug.errors import OutputDirectoryError
from deployplug.verification import verify


class SwapInAverage(Callback):
    """An EMA-style callback: averages the weights over training, installs them at fit end."""

    def __init__(self):
        self.average: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.live: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        for key, value in pl_module.state_dict().items():
            if not value.is_floating_point():
                continue
            value = value.detach().clone()
            if key not in self.average:
                self.average[key] = value
            else:
                self.average[key] += (value - self.average[key]) / self.steps

    def on_fit_end(self, trainer, pl_module):
        self.live = copy.deepcopy(pl_module.state_dict())
        pl_module.load_state_dict({**pl_module.state_dict(), **self.average})


def test_no_reparameterize_exports_the_training_form(tmp_path):
    module = tiny_module()
    callback = DeployCallback(reparameterize=False, fail_on_error=True)
    make_trainer(tmp_path, [callback]).fit(module, tiny_data())
    final = run_dir(tmp_path) / "deploy" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["stages"]["reparameterize"] is False
    # the identity-branch BatchNorms (no conv before them) survive without fusion
    ops = {n.op_type for n in onnx.load(final / "model.onnx").graph.node}
    assert "BatchNormalization" in ops
    assert verify(final, model=forward_copy(module)).passed


def test_single_format_string_is_one_format():
    assert DeployCallback(formats="onnx").formats == ("onnx",)
    assert DeployCallback(formats="caffe", export_on="best_checkpoint").export_on == (
        "best_checkpoint",)


def test_each_callback_logs_under_its_own_prefix(tmp_path):
    first = DeployCallback(fail_on_error=True)
    second = DeployCallback(formats=["onnx", "msnhnet"], folder="deploy_msnhnet",
                            fail_on_error=True)
    named = DeployCallback(dirpath=str(tmp_path / "elsewhere"), metric_prefix="edge/",
                           fail_on_error=True)
    make_trainer(tmp_path, [first, second, named]).fit(tiny_module(), tiny_data())
    metrics = logged_metrics(tmp_path)
    assert metrics["deploy/onnx/passed"] == 1.0
    assert metrics["deploy_msnhnet/onnx/passed"] == 1.0
    assert metrics["deploy_msnhnet/msnhnet/passed"] == 1.0
    assert metrics["edge/onnx/passed"] == 1.0
    assert "deploy/msnhnet/passed" not in metrics
    assert named.metric_prefix == "edge"


def test_two_callbacks_with_one_prefix_are_refused_before_training(tmp_path):
    clash = [DeployCallback(dirpath=str(tmp_path / "a")),
             DeployCallback(dirpath=str(tmp_path / "b"))]  # same default prefix "deploy"
    trainer = make_trainer(tmp_path, clash)
    with pytest.raises(ValueError, match="metric_prefix"):
        trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 0


def test_weights_averaged_at_fit_end_are_exported_whatever_the_callback_order(tmp_path):
    module = tiny_module()
    average = SwapInAverage()
    deploy = DeployCallback(fail_on_error=True)
    make_trainer(tmp_path, [deploy, average], max_epochs=2).fit(module, tiny_data())
    final = run_dir(tmp_path) / "deploy" / "final"

    averaged = forward_copy(module)  # the module now holds the averaged weights
    live = forward_copy(module)
    live.load_state_dict(average.live)
    assert any(not torch.equal(average.live[k], v) for k, v in module.state_dict().items())
    assert verify(final, model=averaged).passed
    assert not verify(final, model=live).passed


def test_foreign_output_folder_stops_the_fit_before_training(tmp_path):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "results.csv").write_text("precious")
    trainer = make_trainer(tmp_path, [DeployCallback(dirpath=str(out))])
    with pytest.raises(OutputDirectoryError, match="results.csv"):
        trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 0
    assert (out / "final" / "results.csv").read_text() == "precious"
    assert sorted(p.name for p in (out / "final").iterdir()) == ["results.csv"]


def test_invalid_new_arguments_are_rejected():
    with pytest.raises(ValueError, match="metric_prefix"):
        DeployCallback(metric_prefix="/")
    with pytest.raises(ValueError, match="export_timeout"):
        DeployCallback(export_timeout=0)
    with pytest.raises(ValueError, match="validation_samples"):
        DeployCallback(validation_samples=-1)
