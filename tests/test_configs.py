"""Every shipped config parses and instantiates with LightningCLI, alone or as an overlay."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from deployplug.callback import DeployCallback
from deployplug.cli_config import lightning_cli
from deployplug.data import DigitsDataModule
from deployplug.lit import ClassifierModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def is_overlay(path: Path) -> bool:
    return "callbacks+" in (yaml.safe_load(path.read_text()).get("trainer") or {})


BASE = """
trainer:
  accelerator: cpu
  max_epochs: 1
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
model:
  model: repvgg_tiny
data:
  class_path: deployplug.data.DigitsDataModule
"""


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"repvgg_digits.yaml", "deploy.yaml"} <= names
    assert any(not is_overlay(p) for p in CONFIGS) and any(is_overlay(p) for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output folders stay inside the test folder
    args = ["--config", str(config)]
    if is_overlay(config):
        base = tmp_path / "base.yaml"
        base.write_text(BASE)
        args = ["--config", str(base)] + args
    cli = lightning_cli(args, run=False)
    assert isinstance(cli.model, ClassifierModule)
    deploy = [cb for cb in cli.trainer.callbacks if isinstance(cb, DeployCallback)]
    assert len(deploy) == 1
    assert "onnx" in deploy[0].formats
    if is_overlay(config):  # appended, not replacing the base config's callbacks
        assert any(isinstance(cb, ModelCheckpoint) for cb in cli.trainer.callbacks)


def test_demo_config_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "repvgg_digits.yaml"
    cli = lightning_cli(["--config", str(config)], run=False)
    assert isinstance(cli.datamodule, DigitsDataModule)
    assert cli.trainer.max_epochs >= 1
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/acc" and checkpoint.mode == "max"
    (deploy,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DeployCallback)]
    assert deploy.formats == ("onnx", "caffe", "msnhnet") and deploy.target is None
    assert deploy.validation_parity
    assert cli.model.example_input_array.shape == cli.datamodule.input_shape


def test_overlays_compose_with_the_demo_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1] / "configs"
    args = ["--config", str(root / "repvgg_digits.yaml")]
    overlays = [p for p in CONFIGS if is_overlay(p) and p.name != "deploy.yaml"]
    for overlay in overlays:
        args += ["--config", str(overlay)]
    cli = lightning_cli(args, run=False)
    deploy = [cb for cb in cli.trainer.callbacks if isinstance(cb, DeployCallback)]
    assert len(deploy) == 1 + len(overlays)
    assert len({cb.folder for cb in deploy}) == len(deploy)  # no two write the same folder
    assert len({cb.state_key for cb in deploy}) == len(deploy)
