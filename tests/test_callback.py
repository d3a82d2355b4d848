"""DeployCallback inside real (tiny) Lightning fits: artifacts, metrics, failure handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_harness import logged_metrics, make_trainer, run_dir
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

import deployplug.pipeline
from deployplug.callback import DeployCallback, load_checkpoint_into, onnx_parity, strip_prefix
from deployplug.data import SyntheticDataModule
from deployplug.errors import (
    BatchNormStatsError,
    ExportFailedError,
    InputShapeError,
    OutputDirectoryError,
    ReparameterizationError,
    UnsupportedOpError,
    VerificationError,
)
from deployplug.lit import ClassifierModule
from deployplug.verification import verify

SIZE = 16


def tiny_module(**kwargs) -> ClassifierModule:
    return ClassifierModule(model="repvgg_tiny", num_classes=10, in_channels=1, input_size=SIZE,
                            lr=0.05, model_kwargs={"width": 4}, **kwargs)


def tiny_data(**kwargs) -> SyntheticDataModule:
    args = dict(num_samples=16, val_samples=8, num_classes=10, in_channels=1, image_size=SIZE,
                batch_size=8)
    args.update(kwargs)
    return SyntheticDataModule(**args)


class NetModule(pl.LightningModule):
    """A LightningModule around an arbitrary network, for networks the zoo does not have."""

    def __init__(self, net: nn.Module, example_shape: tuple[int, ...] | None = (1, 1, SIZE, SIZE)):
        super().__init__()
        self.net = net
        if example_shape is not None:
            self.example_input_array = torch.zeros(example_shape)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SpectralNet(nn.Module):
    """Conv -> |rfft2| -> pool -> linear: the FFT has no Caffe layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.fft.rfft2(self.conv(x)).abs()
        return self.fc(x.mean(dim=(2, 3)))


def no_stats_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False),
                         nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def assert_checkpoint_loads(root: Path, factory=tiny_module) -> list[Path]:
    ckpts = sorted((run_dir(root) / "checkpoints").glob("*.ckpt"))
    assert ckpts, "checkpoints must be written before any export"
    fresh = factory()
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    fresh.load_state_dict(state, strict=True)
    return ckpts


# --------------------------------------------------------------------------- happy path

def test_final_export_writes_verified_fused_artifacts_and_leaves_module_intact(tmp_path):
    module = tiny_module()
    keys_before = list(module.state_dict())
    n_bn_before = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    callback = DeployCallback(formats=["onnx"], validation_parity=True)
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(module, tiny_data(val_samples=12, batch_size=5))  # ragged last batch

    final = run_dir(tmp_path) / "deploy" / "final"
    assert {"manifest.json", "model.onnx", "reference.npz"} <= {p.name for p in final.iterdir()}
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["passed"] is True
    # The artifact is the fused form: no BatchNormalization survives reparameterization.
    ops = {n.op_type for n in onnx.load(final / "model.onnx").graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops

    # The training module keeps its branches, BatchNorms and state_dict layout.
    assert list(module.state_dict()) == keys_before
    assert sum(isinstance(m, nn.BatchNorm2d) for m in module.modules()) == n_bn_before > 0
    ckpts = assert_checkpoint_loads(tmp_path)
    assert ClassifierModule.load_from_checkpoint(ckpts[-1]).net is not None

    # The export is the trained network: fresh PyTorch outputs of the final weights agree.
    assert verify(final, model=module.net).passed

    metrics = logged_metrics(tmp_path)
    assert metrics["deploy/onnx/passed"] == 1.0
    assert 0.0 <= metrics["deploy/onnx/max_error"] <= 1e-5
    assert callback.exports["final"]["passed"] is True
    assert Path(callback.exports["final"]["dir"]) == final

    # Validation parity: the exported model agrees with PyTorch on every validation image.
    assert metrics["deploy/onnx/val_agreement"] == 1.0
    assert metrics["deploy/onnx/val_acc"] == metrics["deploy/torch/val_acc"]
    assert callback.exports["final"]["metrics"]["deploy/onnx/val_agreement"] == 1.0


@pytest.mark.parametrize("target", [None, "om"])
def test_fit_end_export_in_all_three_formats(tmp_path, target):
    module = tiny_module()
    callback = DeployCallback(formats=["onnx", "caffe", "msnhnet"], target=target)
    make_trainer(tmp_path, [callback]).fit(module, tiny_data())

    final = run_dir(tmp_path) / "deploy" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["passed"] is True
    assert manifest["formats"]["caffe"]["target"] == (target or "caffe")
    assert manifest["formats"]["msnhnet"]["target"] == "msnhnet"
    for name in ("model.onnx", "model.prototxt", "model.caffemodel", "model.msnhnet",
                 "model.msnhbin"):
        assert (final / name).stat().st_size > 0
    metrics = logged_metrics(tmp_path)
    for fmt in ("onnx", "caffe", "msnhnet"):
        assert metrics[f"deploy/{fmt}/passed"] == 1.0
        assert metrics[f"deploy/{fmt}/max_error"] <= 1e-5
    assert verify(final, model=module.net).passed
    assert_checkpoint_loads(tmp_path)


def test_best_checkpoint_exports_match_each_checkpoint(tmp_path):
    callback = DeployCallback(export_on=["best_checkpoint"], preflight="off")
    every_epoch = ModelCheckpoint(save_top_k=-1, filename="{epoch}")
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, checkpoint=every_epoch)
    module = tiny_module()
    trainer.fit(module, tiny_data())

    ckpts = sorted((run_dir(tmp_path) / "checkpoints").glob("*.ckpt"))
    deploy = run_dir(tmp_path) / "deploy"
    assert sorted(p.name for p in deploy.iterdir()) == sorted(c.stem for c in ckpts)
    assert not (deploy / "final").exists()  # fit_end was not requested

    references = []
    for ckpt in ckpts:
        net = tiny_module().net
        load_checkpoint_into(net, ckpt, "net")
        assert verify(deploy / ckpt.stem, model=net).passed
        extra = json.loads((deploy / ckpt.stem / "manifest.json").read_text())["extra"]
        assert extra["source_checkpoint"] == str(ckpt)
        references.append(np.load(deploy / ckpt.stem / "reference.npz"))
    # Different checkpoints, different weights: the recorded outputs must differ.
    out_keys = [k for k in references[0].files if "out" in k]
    assert out_keys
    assert any(not np.array_equal(references[0][k], references[1][k]) for k in out_keys)
    assert callback.last_exported_best == str(ckpts[-1])
    assert set(callback.exports) == {c.stem for c in ckpts}
    metrics = logged_metrics(tmp_path)
    assert metrics["deploy/best/onnx/passed"] == 1.0


def test_checkpoint_exports_follow_deleted_checkpoints(tmp_path):
    callback = DeployCallback(export_on=["best_checkpoint"], preflight="off")
    latest_only = ModelCheckpoint(save_top_k=1, filename="{epoch}")  # deletes the previous one
    make_trainer(tmp_path, [callback], max_epochs=2, checkpoint=latest_only).fit(
        tiny_module(), tiny_data())
    ckpts = sorted((run_dir(tmp_path) / "checkpoints").glob("*.ckpt"))
    assert [c.stem for c in ckpts] == ["epoch=1"]
    assert sorted(p.name for p in (run_dir(tmp_path) / "deploy").iterdir()) == ["epoch=1"]
    assert set(callback.exports) == {"epoch=1"}


def test_onnx_parity_feeds_fixed_batch_models_in_chunks(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    manifest = deployplug.pipeline.export(net, torch.randn(1, 1, 6, 6), tmp_path / "fixed",
                                          onnx_options={"dynamic_batch": False})
    x = torch.randn(7, 1, 6, 6)
    y = net(x).argmax(1)
    metrics = onnx_parity(manifest.artifact("onnx"), net, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert metrics.pop("deploy/onnx/val_max_error") <= 1e-5
    assert metrics == {"deploy/onnx/val_agreement": 1.0, "deploy/onnx/val_acc": 1.0,
                       "deploy/torch/val_acc": 1.0}


def test_resume_from_checkpoint_after_export(tmp_path):
    callback = DeployCallback(export_on=["fit_end", "best_checkpoint"], preflight="off")
    make_trainer(tmp_path, [callback]).fit(tiny_module(), tiny_data())
    last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert set(saved["state_dict"]) == set(tiny_module().state_dict())

    resumed = DeployCallback(export_on=["fit_end", "best_checkpoint"], preflight="off")
    trainer = make_trainer(tmp_path / "again", [resumed], max_epochs=2)
    trainer.fit(tiny_module(), tiny_data(), ckpt_path=last)
    assert trainer.current_epoch == 2
    assert (run_dir(tmp_path / "again") / "deploy" / "final" / "manifest.json").is_file()


def test_callback_leaves_training_bit_identical(tmp_path):
    def train(callbacks, root):
        pl.seed_everything(0, verbose=False)
        module = tiny_module()
        make_trainer(root, callbacks, max_epochs=2).fit(module, tiny_data())
        return module.state_dict()

    plain = train([], tmp_path / "plain")
    with_deploy = train([DeployCallback(export_on=["fit_end", "best_checkpoint"])],
                        tmp_path / "deploy")
    assert plain.keys() == with_deploy.keys()
    for key in plain:
        assert torch.equal(plain[key], with_deploy[key]), key


def test_fast_dev_run_writes_nothing(tmp_path):
    callback = DeployCallback(export_on=["fit_end", "best_checkpoint"])
    trainer = make_trainer(tmp_path, [callback], fast_dev_run=True)
    trainer.fit(tiny_module(), tiny_data())
    assert not list(tmp_path.rglob("manifest.json"))
    assert callback.exports == {}


# --------------------------------------------------------------------------- pre-flight

def test_preflight_rejects_unconvertible_model_before_first_step(tmp_path):
    callback = DeployCallback(formats=["caffe"], preflight="error")
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(UnsupportedOpError, match="fft"):
        trainer.fit(NetModule(SpectralNet()), tiny_data())
    assert trainer.global_step == 0
    assert not (run_dir(tmp_path) / "checkpoints").exists()


def test_preflight_warn_lets_training_run(tmp_path):
    callback = DeployCallback(formats=["caffe"], preflight="warn")
    trainer = make_trainer(tmp_path, [callback])
    with pytest.warns(UserWarning, match="pre-flight"):
        trainer.fit(NetModule(SpectralNet()), tiny_data())
    assert trainer.global_step == 2
    assert_checkpoint_loads(tmp_path, lambda: NetModule(SpectralNet()))


def test_preflight_rejects_wrong_input_shape_before_first_step(tmp_path):
    callback = DeployCallback(input_shape=[1, 3, SIZE, SIZE])
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(InputShapeError, match=r"\(1, 3, 16, 16\).*\(1, 1, 16, 16\)"):
        trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 0


def test_missing_example_shape_is_reported_at_fit_start(tmp_path):
    trainer = make_trainer(tmp_path, [DeployCallback()])
    with pytest.raises(InputShapeError, match="input_shape"):
        trainer.fit(NetModule(no_stats_net(), example_shape=None), tiny_data())
    assert trainer.global_step == 0


# --------------------------------------------------------------------------- failures

def _raise_export_failure(*args, **kwargs):
    raise ExportFailedError("onnx", "exporter crashed on purpose")


FAILURES = {
    # name: (module factory, callback kwargs, patch pipeline.export?, error type, message)
    "batchnorm_without_stats": (lambda: NetModule(no_stats_net()), {}, False,
                                BatchNormStatsError, "running statistics"),
    "wrong_input_shape": (tiny_module, {"input_shape": [1, 2, SIZE, SIZE]}, False,
                          InputShapeError, r"\(1, 2, 16, 16\)"),
    "exporter_crash": (tiny_module, {}, True, ExportFailedError, "crashed on purpose"),
    "failed_verification": (tiny_module, {"tolerance": 1e-30, "reparameterize": False}, False,
                            VerificationError, "verification failed"),
    "fusion_self_check": (tiny_module, {"tolerance": 1e-30}, False, ReparameterizationError,
                          "reparameterize=False"),
}


CASES = [(name, False) for name in sorted(FAILURES)] + [
    ("exporter_crash", True), ("failed_verification", True), ("wrong_input_shape", True)]


@pytest.mark.parametrize(("name", "fail_on_error"), CASES)
def test_export_failures_keep_training_results(tmp_path, monkeypatch, name, fail_on_error):
    factory, kwargs, patch, error, message = FAILURES[name]
    if patch:
        monkeypatch.setattr(deployplug.pipeline, "export", _raise_export_failure)
    callback = DeployCallback(preflight="off", fail_on_error=fail_on_error, **kwargs)
    trainer = make_trainer(tmp_path, [callback])
    if fail_on_error:
        with pytest.raises(error, match=message):
            trainer.fit(factory(), tiny_data())
    else:
        with pytest.warns(UserWarning, match=message) as record:
            trainer.fit(factory(), tiny_data())
        if name == "failed_verification":  # the warning says where the failed files are
            assert any("final.failed" in str(w.message) for w in record)
    assert trainer.global_step == 2  # training finished either way
    assert_checkpoint_loads(tmp_path, factory)
    final = run_dir(tmp_path) / "deploy" / "final"
    assert not (final / "manifest.json").exists()  # only verified artifacts land
    failed = final.with_name("final.failed") / "manifest.json"
    if name == "failed_verification":  # the failed files are kept apart, marked failed
        assert json.loads(failed.read_text())["passed"] is False
        assert callback.exports["final"]["failed_dir"] == str(failed.parent)
        assert callback.exports["final"]["passed"] is False
    else:
        assert not failed.exists()


@pytest.mark.parametrize("fail_on_error", [False, True])
def test_unwritable_dirpath_stops_the_fit_before_training(tmp_path, fail_on_error):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the artifact folder's parent should be")
    callback = DeployCallback(dirpath=str(blocker / "deploy"), fail_on_error=fail_on_error,
                              preflight="off")
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(OutputDirectoryError, match="not_a_directory"):
        trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 0  # refused before any training could be lost
    assert blocker.read_text().startswith("a file")


# --------------------------------------------------------------------------- units

def test_two_callbacks_need_separate_folders(tmp_path):
    clash = [DeployCallback(formats=["onnx"]), DeployCallback(formats=["onnx", "msnhnet"])]
    trainer = make_trainer(tmp_path, clash)
    with pytest.raises(ValueError, match="own folder"):
        trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 0


def test_unknown_target_stops_fit_before_training(tmp_path):
    trainer = make_trainer(tmp_path, [DeployCallback(formats=["caffe"], target="no_such")])
    with pytest.raises(ValueError, match="no_such"):
        trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 0


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="export_on"):
        DeployCallback(export_on=["every_step"])
    with pytest.raises(ValueError, match="parity_batches"):
        DeployCallback(parity_batches=0)
    with pytest.raises(ValueError, match="log_artifacts"):
        DeployCallback(log_artifacts="sometimes")
    with pytest.raises(ValueError, match="input_shape"):
        DeployCallback(input_shape=[1, 0, 8, 8])
    with pytest.raises(ValueError, match="format"):
        DeployCallback(formats=[])
    with pytest.raises(ValueError, match="folder"):
        DeployCallback(folder="a/b")


def test_state_dict_roundtrip_and_distinct_state_keys():
    a = DeployCallback(formats=["onnx"])
    a.exports = {"final": {"dir": "x", "passed": True}}
    a.last_exported_best = "best.ckpt"
    b = DeployCallback(formats=["onnx"])
    b.load_state_dict(a.state_dict())
    assert b.exports == a.exports and b.last_exported_best == "best.ckpt"
    assert a.state_key == b.state_key
    assert DeployCallback(formats=["onnx", "caffe"]).state_key != a.state_key


def test_strip_prefix_keeps_only_the_network():
    state = {"net.a.weight": 1, "net.b": 2, "netx.c": 3, "other": 4}
    assert strip_prefix(state, "net") == {"a.weight": 1, "b": 2}
    assert strip_prefix(state, "") == state
