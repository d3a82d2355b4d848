"""The ``deployplug`` command: fit through LightningCLI, export a checkpoint, verify, check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deployplug import models
from deployplug.callback import load_checkpoint_into
from deployplug.cli import main
from deployplug.lit import ClassifierModule
from deployplug.pipeline import export
from deployplug.verification import verify


class SpectralNet(nn.Module):
    """Conv -> |rfft2| -> pool -> linear: the FFT has no Caffe layer."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.fft.rfft2(self.conv(x)).abs().mean(dim=(2, 3)))


@models.register("cli_test_spectral")
def _spectral(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    net = SpectralNet(num_classes, in_channels)
    net.default_input_shape = (1, in_channels, 8, 8)
    return net


def write_config(root: Path, formats: str = "[onnx]", preflight: str = "error") -> Path:
    config = root / "fit.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: logs}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{monitor: val/acc, mode: max, filename: best}}
    - class_path: deployplug.callback.DeployCallback
      init_args: {{formats: {formats}, preflight: {preflight}}}
model:
  model: repvgg_tiny
  num_classes: 10
  in_channels: 1
  input_size: 16
  model_kwargs: {{width: 4}}
data:
  class_path: deployplug.data.SyntheticDataModule
  init_args: {{num_samples: 16, val_samples: 8, in_channels: 1, image_size: 16, batch_size: 8}}
""")
    return config


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """(config, best checkpoint) of one `deployplug fit` run, shared by the export tests."""
    root = tmp_path_factory.mktemp("fit")
    config = write_config(root)
    assert main(["fit", "--config", str(config)]) == 0
    run = root / "logs" / "version_0"
    assert (run / "deploy" / "final" / "manifest.json").is_file()
    assert (run / "config.yaml").is_file()  # LightningCLI's SaveConfigCallback ran
    return config, run / "checkpoints" / "best.ckpt"


def trained_net(ckpt: Path) -> nn.Module:
    net = ClassifierModule(model="repvgg_tiny", in_channels=1, input_size=16,
                           model_kwargs={"width": 4}).net
    return load_checkpoint_into(net, ckpt, "net")


def test_export_checkpoint_with_config(fitted, tmp_path, capsys):
    config, ckpt = fitted
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(config),
                 "--out", str(out)]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert {"model.onnx", "reference.npz", "manifest.json"} <= {p.name for p in out.iterdir()}
    # The files are the checkpoint's network, not a freshly initialised one.
    assert verify(out, model=trained_net(ckpt)).passed
    untrained = ClassifierModule(model="repvgg_tiny", in_channels=1, input_size=16,
                                 model_kwargs={"width": 4}).net
    assert not verify(out, model=untrained).passed


def test_export_checkpoint_from_its_hyperparameters(fitted):
    _, ckpt = fitted
    assert main(["export", "--checkpoint", str(ckpt), "--parity"]) == 0
    default_dir = ckpt.parent.parent / "deploy" / ckpt.stem  # beside the checkpoints folder
    assert verify(default_dir, model=trained_net(ckpt)).passed


def test_export_other_formats_and_target(fitted, tmp_path):
    config, ckpt = fitted
    out = tmp_path / "om"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(config), "--out", str(out),
                 "--formats", "caffe", "msnhnet", "--target", "om"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["formats"]["caffe"]["target"] == "om"
    assert set(manifest["formats"]) == {"caffe", "msnhnet"}
    assert verify(out, model=trained_net(ckpt)).passed


def test_export_errors_exit_nonzero(fitted, tmp_path, capsys):
    config, ckpt = fitted
    assert main(["export", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(config),
                 "--input-shape", "1", "3", "16", "16", "--out", str(tmp_path / "x")]) == 2
    assert "(1, 3, 16, 16)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_verify_exit_codes(tmp_path, capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    good = tmp_path / "good"
    export(net, torch.randn(1, 1, 8, 8), good)
    assert main(["verify", str(good)]) == 0
    assert "onnx" in capsys.readouterr().out

    # Tamper with the recorded PyTorch outputs: the artifact no longer matches them.
    ref = dict(np.load(good / "reference.npz"))
    ref = {k: (v * 1.5 + 0.1 if "_out" in k else v) for k, v in ref.items()}
    np.savez(good / "reference.npz", **ref)
    assert main(["verify", str(good)]) == 1
    assert main(["verify", str(tmp_path / "nowhere")]) == 2


def test_console_script_reports_exit_code(tmp_path):
    torch.manual_seed(0)
    export(nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), torch.randn(1, 1, 6, 6), tmp_path / "a")
    script = Path(sys.executable).with_name("deployplug")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "deployplug.cli"]
    ok = subprocess.run(command + ["verify", str(tmp_path / "a")], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "onnx" in ok.stdout


def test_check_exit_codes(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["check", "--config", str(config)]) == 0
    assert main(["check", "--model", "cli_test_spectral", "--in-channels", "1",
                 "--formats", "caffe"]) == 1
    assert "fft" in capsys.readouterr().out
    assert main(["check", "--config", str(config), "--input-shape", "1", "5", "16", "16"]) == 2
    assert "(1, 5, 16, 16)" in capsys.readouterr().err
    assert main(["check"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--config" in line and "--model" in line


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "export", "verify", "check"):
        assert command in text
    assert main([]) == 2


# --------------------------------------------------------------------------- safety

class WritesMarker:
    """Unpickling this object creates a file: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_export_refuses_a_code_running_checkpoint(fitted, tmp_path, capsys):
    config, ckpt = fitted
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["payload"] = WritesMarker(str(marker))
    torch.save(state, evil)
    capsys.readouterr()
    for extra in ([], ["--config", str(config)]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["export", "--checkpoint", str(evil), "--out", str(out), *extra]) == 2
        line = one_line(capsys.readouterr().err)
        assert "CheckpointLoadError" in line and str(evil) in line
        assert "--trust-checkpoint" in line
        assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("case", ["truncated", "no_state_dict", "wrong_keys"])
def test_export_of_a_malformed_checkpoint_exits_2(fitted, tmp_path, capsys, case):
    config, ckpt = fitted
    bad = tmp_path / "bad.ckpt"
    if case == "truncated":
        bad.write_bytes(ckpt.read_bytes()[:2000])
    elif case == "no_state_dict":
        torch.save({"epoch": 1}, bad)
    else:
        torch.save({"state_dict": {"net.nothing": torch.ones(1)}}, bad)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(bad), "--config", str(config),
                 "--out", str(tmp_path / "x")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "CheckpointLoadError" in line and "bad.ckpt" in line


def test_export_into_a_foreign_directory_is_refused_before_loading(fitted, tmp_path, capsys):
    _, ckpt = fitted
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("not deployplug's")
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": WritesMarker(str(marker))}, evil)
    capsys.readouterr()
    # Even a trusted (code-running) checkpoint is never opened: the destination is refused first.
    assert main(["export", "--checkpoint", str(evil), "--out", str(out),
                 "--trust-checkpoint"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "OutputDirectoryError" in line and "notes.txt" in line
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "not deployplug's"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2


def test_export_options_and_recorded_provenance(fitted, tmp_path):
    import hashlib

    config, ckpt = fitted
    out = tmp_path / "plain"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(config), "--out", str(out),
                 "--no-reparameterize", "--module-attr", ""]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["reparameterize"] is False
    extra = manifest["extra"]
    assert extra["exported_module"] == "ClassifierModule.forward"
    assert extra["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (extra["epoch"], extra["global_step"]) == (saved["epoch"], saved["global_step"])
    assert verify(out, model=trained_net(ckpt)).passed

    trusted = tmp_path / "trusted"
    with pytest.warns(UserWarning, match="full unpickling"):
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(trusted),
                     "--trust-checkpoint"]) == 0
    assert json.loads((trusted / "manifest.json").read_text())["extra"]["exported_module"] == \
        "net"


def test_check_reports_the_exported_module(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["check", "--config", str(config), "--no-reparameterize"]) == 0
    assert "exported module: net" in capsys.readouterr().out
    assert main(["check", "--config", str(config), "--module-attr", "net.stage0"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "ModuleMismatchError" in line and "--accept-submodule-mismatch" in line
    assert main(["check", "--config", str(config), "--module-attr", "net.stage0",
                 "--accept-submodule-mismatch"]) == 0
    assert "exported module: net.stage0" in capsys.readouterr().out


# --------------------------------------------------------------------------- checkpoints alone

def test_export_of_a_plain_trainer_checkpoint_rebuilds_classifier_module(tmp_path, capsys):
    """A checkpoint not written by LightningCLI names no class: it is a ClassifierModule's."""
    import pytorch_lightning as pl

    from deployplug.data import SyntheticDataModule

    module = ClassifierModule(model="repvgg_tiny", in_channels=1, input_size=16,
                              model_kwargs={"width": 4})
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticDataModule(in_channels=1, image_size=16, num_samples=8,
                                            val_samples=4, batch_size=4))
    ckpt = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "_class_path" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert verify(out, model=load_checkpoint_into(ClassifierModule(
        model="repvgg_tiny", in_channels=1, input_size=16, model_kwargs={"width": 4}).net,
        ckpt, "net")).passed


@pytest.mark.parametrize("class_path", ["os.system", "subprocess.Popen", "torch.nn.Linear",
                                        "no_such_package.Model", "not a path"])
def test_a_checkpoint_naming_a_foreign_class_is_refused(fitted, tmp_path, capsys, class_path):
    _, ckpt = fitted
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["_class_path"] = class_path
    forged = tmp_path / "forged.ckpt"
    torch.save(state, forged)
    capsys.readouterr()
    out = tmp_path / "x"
    assert main(["export", "--checkpoint", str(forged), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "CheckpointLoadError" in line and "--config" in line
    assert not out.exists()


def test_a_fit_the_callback_refuses_ends_in_one_error_line(tmp_path, capsys):
    config = write_config(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--trainer.callbacks+=DeployCallback",
                 f"--trainer.callbacks.dirpath={blocker / 'deploy'}",
                 "--trainer.callbacks.folder=other"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: OutputDirectoryError")
    assert "a_file" in errors[0]
    assert not (tmp_path / "logs" / "version_0" / "checkpoints").exists()


def test_export_int8_calibrates_on_the_configs_data_and_judges_with_labels(fitted, tmp_path):
    """``--formats onnx_int8`` takes training batches from the config's datamodule to
    calibrate and its validation batches (with labels) to judge; ``--int8-*`` flags apply."""
    from deployplug.manifest import load_manifest

    config, ckpt = fitted
    out = tmp_path / "int8"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(config), "--out", str(out),
                 "--formats", "onnx", "onnx_int8", "--int8-weights", "per_tensor",
                 "--int8-max-drop", "0.5"]) == 0
    manifest = load_manifest(out)
    info = manifest.formats["onnx_int8"]["info"]
    assert info["weights"] == "per_tensor" and info["judged_on"] == "eval_inputs"
    verdict = manifest.verification.judgements["onnx_int8"]
    assert verdict["max_drop"] == 0.5 and verdict["decided_by"] == "accuracy"
    assert main(["export", "--checkpoint", str(ckpt), "--config", str(config),
                 "--out", str(tmp_path / "x"), "--int8-repair", "auto"]) == 2
