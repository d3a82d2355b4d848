"""End to end, as a user: their own LightningModule and DataModule, the deploy overlays, the CLI.

``tests/user_project`` stands for the user's checkout (``digitlab.lit.BarNet``,
``digitlab.data.BarsDataModule``); it is put on ``PYTHONPATH``, not installed. Every command
runs as a subprocess of the console script, the way a user types it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deployplug as dp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
USER_PROJECT = HERE / "user_project"
OVERLAYS = [REPO / "configs" / name
            for name in ("deploy.yaml", "deploy_caffe.yaml", "deploy_msnhnet.yaml")]
FORMATS = ("onnx", "caffe", "msnhnet")


def deployplug(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("deployplug")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "deployplug.cli"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(USER_PROJECT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


def write_fit_config(root: Path) -> Path:
    config = root / "my_fit.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
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
model:
  class_path: digitlab.lit.BarNet
  init_args:
    channels: [8, 8, 8]
    num_classes: 4
    image_size: 12
    lr: 0.1
data:
  class_path: digitlab.data.BarsDataModule
  init_args: {{num_classes: 4, image_size: 12, val_samples: 40, batch_size: 16}}
""")
    return config


@pytest.fixture(scope="module")
def user_run(tmp_path_factory) -> dict[str, Path]:
    """One `deployplug fit` of the user's project with all three deploy overlays."""
    root = tmp_path_factory.mktemp("user")
    config = write_fit_config(root)
    args = ["fit", "--config", str(config)]
    for overlay in OVERLAYS:
        args += ["--config", str(overlay)]
    done = deployplug(*args, "--model.init_args.lr", "0.05", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "logs" / "version_0"
    return {"root": root, "config": config, "run": run,
            "best": run / "checkpoints" / "best.ckpt"}


def user_module(ckpt: Path, monkeypatch) -> torch.nn.Module:
    """The user's module with the checkpoint's weights, loaded the Lightning way."""
    monkeypatch.syspath_prepend(str(USER_PROJECT))
    from digitlab.lit import BarNet

    return BarNet.load_from_checkpoint(ckpt, map_location="cpu").eval()


def test_fit_with_the_overlays_exports_every_format_of_the_user_module(user_run, monkeypatch):
    run = user_run["run"]
    model = user_module(user_run["best"], monkeypatch)
    assert model.hparams.lr == 0.05  # the command-line override of model.init_args.lr
    expected = {"deploy": {"onnx"}, "deploy_caffe": {"onnx", "caffe"},
                "deploy_msnhnet": {"onnx", "msnhnet"}}
    for folder, formats in expected.items():
        manifest = json.loads((run / folder / "final" / "manifest.json").read_text())
        assert manifest["passed"] is True, folder
        assert set(manifest["formats"]) == formats
        assert manifest["extra"]["exported_module"] == "BarNet.forward"  # normalisation kept


def test_export_the_best_checkpoint_then_verify_all_three_formats(user_run, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "exported"
    done = deployplug("export", "--checkpoint", str(user_run["best"]), "--config",
                      str(user_run["config"]), *sum((["--config", str(o)] for o in OVERLAYS),
                                                    []),
                      "--formats", *FORMATS, "--out", str(out), "--parity", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "result: PASSED" in done.stdout
    for fmt in FORMATS:  # the parity table has a row per format
        assert any(line.split()[:1] == [fmt] and "agreement" in line
                   for line in done.stdout.splitlines()), done.stdout

    checked = deployplug("verify", str(out), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.rstrip().endswith("result: PASSED")
    report = dp.verify(out, model=user_module(user_run["best"], monkeypatch))
    assert report.passed and set(report.formats()) == set(FORMATS)
    assert all(report.format_passed(fmt) for fmt in FORMATS)
    extra = json.loads((out / "manifest.json").read_text())["extra"]
    assert extra["exported_module"] == "BarNet.forward"
    assert extra["source_checkpoint"] == str(user_run["best"])


def test_export_without_a_config_rebuilds_the_user_module_from_the_checkpoint(
        user_run, tmp_path, monkeypatch):
    out = tmp_path / "from_hparams"
    done = deployplug("export", "--checkpoint", str(user_run["best"]), "--formats", *FORMATS,
                      "--out", str(out), "--parity", "--parity-batches", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation parity over 16 samples" in done.stdout  # one batch, from its DataModule
    assert dp.verify(out, model=user_module(user_run["best"], monkeypatch)).passed
    # Exported with the weights of the checkpoint, not those of a fresh module.
    monkeypatch.syspath_prepend(str(USER_PROJECT))
    from digitlab.lit import BarNet

    torch.manual_seed(1)
    assert not dp.verify(out, model=BarNet(channels=[8, 8, 8]).eval()).passed


def test_check_rebuilds_the_user_module_from_the_config(user_run, tmp_path):
    done = deployplug("check", "--config", str(user_run["config"]), "--formats", *FORMATS,
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported module: BarNet.forward" in done.stdout
    for fmt in FORMATS:
        assert f"[{fmt} -> {fmt}]" in done.stdout


def one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:"), lines
    return lines[0]


def test_every_command_line_mistake_is_one_line_naming_the_flag(user_run, tmp_path):
    config, best = str(user_run["config"]), str(user_run["best"])
    missing = str(tmp_path / "missing.yaml")
    cases = {
        # what is run: (arguments, text the one line must contain)
        "fit_missing_config": (["fit", "--config", missing], "--config"),
        "export_missing_config": (["export", "--checkpoint", best, "--config", missing],
                                  "--config"),
        "check_missing_config": (["check", "--config", missing], "--config"),
        "unknown_command": (["bogus"], "export"),
        "unknown_model_option": (["fit", "--config", config, "--model.init_args.depth", "3"],
                                 "--model"),
        "wrong_input_shape": (["check", "--config", config, "--input-shape", "1", "3", "12",
                               "12"], "--input-shape"),
        "unknown_format": (["export", "--checkpoint", best, "--formats", "tflite"],
                           "--formats"),
        "missing_checkpoint": (["export", "--checkpoint", str(tmp_path / "no.ckpt")],
                               "--checkpoint"),
        "bad_parity_batches": (["export", "--checkpoint", best, "--parity-batches", "0"],
                               "--parity-batches"),
        "bad_init_value": (["fit", "--config", config, "--model.init_args.num_classes",
                            "many"], "--model"),
    }
    for name, (args, flag) in cases.items():
        line = one_line_error(deployplug(*args, cwd=tmp_path))
        assert flag in line, (name, line)
        assert "input_shape=" not in line, (name, line)  # the Python spelling of the flag
    assert not list(tmp_path.rglob("manifest.json"))
