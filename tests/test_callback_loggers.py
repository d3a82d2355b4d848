"""Export folders uploaded to experiment trackers the way their loggers upload checkpoints."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest
from callback_harness import make_trainer, tiny_data, tiny_module
from pytorch_lightning.callbacks import ModelCheckpoint

from deployplug.callback import DeployCallback
from deployplug.logger_artifacts import to_tensorboard, to_wandb
from deployplug.manifest import load_manifest


@pytest.fixture
def mlflow_logger(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import MLFlowLogger

    # MLflow 3 keeps the local file store behind an explicit opt-in; nothing leaves the machine.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return MLFlowLogger(experiment_name="deploy", tracking_uri=f"file:{tmp_path / 'mlruns'}")


def uploaded(logger, path: str = "") -> dict[str, str]:
    """Every artifact file of the run under ``path``, as name -> sha256 of its content."""
    from mlflow.artifacts import download_artifacts

    client = logger.experiment
    found: dict[str, str] = {}
    pending = [path]
    while pending:
        for item in client.list_artifacts(logger.run_id, pending.pop() or None):
            if item.is_dir:
                pending.append(item.path)
            else:
                local = download_artifacts(run_id=logger.run_id, artifact_path=item.path,
                                           tracking_uri=logger._tracking_uri)
                found[item.path] = hashlib.sha256(Path(local).read_bytes()).hexdigest()
    return found


def local_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def fit(tmp_path, logger, log_artifacts, epochs: int = 2) -> DeployCallback:
    callback = DeployCallback(export_on=["fit_end", "best_checkpoint"], preflight="off",
                              log_artifacts=log_artifacts)
    latest_only = ModelCheckpoint(save_top_k=1, filename="{epoch}")  # deletes the older one
    make_trainer(tmp_path, [callback], max_epochs=epochs, checkpoint=latest_only,
                 logger=logger).fit(tiny_module(), tiny_data())
    return callback


def test_default_uploads_nothing(tmp_path, mlflow_logger):
    callback = fit(tmp_path, mlflow_logger, log_artifacts=False, epochs=1)
    assert callback.exports["final"]["passed"] is True
    assert uploaded(mlflow_logger) == {}


def test_true_uploads_the_exports_standing_at_the_end(tmp_path, mlflow_logger):
    callback = fit(tmp_path, mlflow_logger, log_artifacts=True)
    final = Path(callback.exports["final"]["dir"])
    files = uploaded(mlflow_logger)
    assert {p.split("/")[1] for p in files} == {"final", "epoch=1"}  # epoch=0 was deleted
    assert {p[len("deploy/final/"):]: h for p, h in files.items()
            if p.startswith("deploy/final/")} == local_files(final)
    assert {"model.onnx", "manifest.json", "reference.npz"} <= set(local_files(final))


def test_all_uploads_every_export_as_it_lands(tmp_path, mlflow_logger):
    callback = fit(tmp_path, mlflow_logger, log_artifacts="all")
    files = uploaded(mlflow_logger)
    # The epoch-0 export went with its checkpoint on disk, but it was uploaded when it landed.
    assert {p.split("/")[1] for p in files} == {"final", "epoch=0", "epoch=1"}
    assert not (Path(callback.exports["final"]["dir"]).parent / "epoch=0").exists()


def test_a_failing_upload_warns_and_training_finishes(tmp_path, mlflow_logger, monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(type(mlflow_logger.experiment), "log_artifacts", refuse)
    with pytest.warns(UserWarning, match="uploading .* failed .*unreachable"):
        callback = fit(tmp_path, mlflow_logger, log_artifacts=True, epochs=1)
    assert callback.exports["final"]["passed"] is True
    assert (Path(callback.exports["final"]["dir"]) / "manifest.json").is_file()


# --------------------------------------------------------------------------- without trackers

@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    import torch
    from torch import nn

    import deployplug as dp

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export") / "final"
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    dp.export(net, torch.randn(1, 1, 6, 6), folder, formats=["onnx", "caffe"],
              metadata={"tag": "final", "epoch": 3})
    return load_manifest(folder)


def test_tensorboard_gets_the_summary_table_and_the_path(manifest):
    class Writer:
        def __init__(self):
            self.texts = []

        def add_text(self, tag, text, global_step=None):
            self.texts.append((tag, text, global_step))

    writer = Writer()
    to_tensorboard(writer, "deploy", "final", manifest, step=7)
    ((tag, text, step),) = writer.texts
    assert (tag, step) == ("deploy/final", 7)
    assert str(manifest.dir) in text
    assert "| onnx | onnx | yes |" in text and "| caffe | caffe | yes |" in text


def test_wandb_gets_a_model_artifact_of_the_folder(manifest, monkeypatch):
    made = []

    class Artifact:
        def __init__(self, name, type, metadata):
            self.name, self.type, self.metadata, self.dirs = name, type, metadata, []
            made.append(self)

        def add_dir(self, path):
            self.dirs.append(path)

    class Run:
        id = "run42"
        logged = []

        def log_artifact(self, artifact, aliases):
            self.logged.append((artifact, aliases))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Artifact=Artifact))
    run = Run()
    to_wandb(run, "deploy", "epoch=3-val_acc=0.9", manifest, best=True)
    ((artifact, aliases),) = run.logged
    assert (artifact.name, artifact.type, artifact.dirs) == ("deploy-run42", "model",
                                                             [str(manifest.dir)])
    assert aliases == ["latest", "epoch_3-val_acc_0.9", "best"]
    assert artifact.metadata["passed"] is True and artifact.metadata["epoch"] == 3
    assert set(artifact.metadata["formats"]) == {"onnx", "caffe"}
