"""Checkpoints: read without running code, and checkpoint-time exports that track their content."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
from callback_harness import forward_copy, make_trainer, run_dir, tiny_data, tiny_module
from pytorch_lightning.callbacks import ModelCheckpoint

from deployplug.callback import DeployCallback
from deployplug.checkpoint_io import load_checkpoint_into, load_weights, read_checkpoint
from deployplug.errors import CheckpointLoadError
from deployplug.verification import verify


class WritesMarker:
    """Unpickling this object creates a file: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class CustomConfig:
    """A harmless custom object, as some users put in their hyperparameters."""

    def __init__(self, width: int):
        self.width = width


def good_checkpoint(path, module=None) -> dict:
    module = module or tiny_module()
    ckpt = {"state_dict": module.state_dict(), "epoch": 3, "global_step": 12,
            "hyper_parameters": dict(module.hparams)}
    torch.save(ckpt, path)
    return ckpt


# --------------------------------------------------------------------------- safe loading

def test_malicious_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_module().state_dict(), "payload": WritesMarker(str(marker))},
               evil)
    with pytest.raises(CheckpointLoadError) as info:
        load_checkpoint_into(tiny_module(), evil)
    assert not marker.exists()
    text = str(info.value)
    assert str(evil) in text and "trust_checkpoint=True" in text and "--trust-checkpoint" in text

    plain_pickle = tmp_path / "evil.pkl"  # not even a torch zip file
    plain_pickle.write_bytes(pickle.dumps({"state_dict": WritesMarker(str(marker))}))
    with pytest.raises(CheckpointLoadError, match="trust_checkpoint"):
        read_checkpoint(plain_pickle)
    assert not marker.exists()


def test_trusted_checkpoint_with_custom_objects_loads_and_warns(tmp_path):
    path = tmp_path / "custom.ckpt"
    module = tiny_module()
    torch.save({"state_dict": module.state_dict(), "config": CustomConfig(4)}, path)
    with pytest.raises(CheckpointLoadError, match="trust_checkpoint"):
        read_checkpoint(path)
    target = tiny_module()
    with pytest.warns(UserWarning, match="full unpickling"):
        load_checkpoint_into(target, path, trust_checkpoint=True)
    for key, value in module.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_lightning_checkpoint_loads_weights_only_with_provenance(tmp_path):
    make_trainer(tmp_path, [], checkpoint=ModelCheckpoint(filename="only")).fit(
        tiny_module(), tiny_data())
    path = run_dir(tmp_path) / "checkpoints" / "only.ckpt"
    net = tiny_module().net
    info = load_weights(net, path, "net")  # weights-only unpickling of a real checkpoint
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info.epoch, info.global_step) == (0, 2)
    lit = tiny_module()
    load_weights(lit, path)
    for key, value in net.state_dict().items():
        assert torch.equal(lit.net.state_dict()[key], value)


@pytest.mark.parametrize("case", ["truncated", "not_a_dict", "no_state_dict", "wrong_keys",
                                  "wrong_shape", "not_tensors", "directory", "missing"])
def test_malformed_checkpoints_are_typed_errors(tmp_path, case):
    path = tmp_path / "bad.ckpt"
    if case == "truncated":
        good_checkpoint(path)
        path.write_bytes(path.read_bytes()[:1000])
    elif case == "not_a_dict":
        torch.save([torch.ones(2)], path)
    elif case == "no_state_dict":
        torch.save({"weights": {}}, path)
    elif case == "wrong_keys":
        torch.save({"state_dict": {"net.other.weight": torch.ones(2)}}, path)
    elif case == "wrong_shape":
        state = tiny_module().state_dict()
        key = next(iter(state))
        state[key] = torch.ones(1)
        torch.save({"state_dict": state}, path)
    elif case == "not_tensors":
        torch.save({"state_dict": {"net.x": 3}}, path)
    elif case == "directory":
        path.mkdir()
    with pytest.raises(CheckpointLoadError, match="bad.ckpt"):
        load_checkpoint_into(tiny_module(), path)


# --------------------------------------------------------------------------- exports that track

def checkpoint_net(path):
    lit = tiny_module()
    load_weights(lit, path)
    return forward_copy(lit)


def test_reused_checkpoint_name_is_exported_again_at_every_save(tmp_path):
    callback = DeployCallback(export_on=["best_checkpoint"], fail_on_error=True)
    reused = ModelCheckpoint(filename="best", save_top_k=1)  # same file every epoch
    make_trainer(tmp_path, [callback], max_epochs=3, checkpoint=reused).fit(
        tiny_module(), tiny_data())

    best = run_dir(tmp_path) / "checkpoints" / "best.ckpt"
    folder = run_dir(tmp_path) / "deploy" / "best"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2
    # The export is of the checkpoint as it is now, not as it was when first written.
    assert verify(folder, model=checkpoint_net(best)).passed
    extra = json.loads((folder / "manifest.json").read_text())["extra"]
    assert extra["source_checkpoint"] == str(best)
    assert extra["checkpoint_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert (extra["epoch"], extra["global_step"]) == (ckpt["epoch"], ckpt["global_step"])
    record = callback.exports["best"]
    assert record["global_step"] == ckpt["global_step"] and record["passed"] is True


def test_exports_of_deleted_checkpoints_go_with_them_and_only_ours(tmp_path):
    callback = DeployCallback(export_on=["best_checkpoint"], preflight="off")
    latest_only = ModelCheckpoint(save_top_k=1, filename="{epoch}")  # deletes the previous one
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, checkpoint=latest_only)
    trainer.fit(tiny_module(), tiny_data())
    deploy = run_dir(tmp_path) / "deploy"
    assert sorted(p.name for p in deploy.iterdir()) == ["epoch=1"]

    # A folder that looks like an old export but holds a file deployplug did not write stays.
    keep = deploy / "epoch=1"
    (keep / "notes.txt").write_text("mine")
    source = callback.exports["epoch=1"]["source"]
    os.remove(source)
    callback._prune_deleted()
    assert (keep / "notes.txt").read_text() == "mine" and (keep / "manifest.json").exists()
    assert "epoch=1" not in callback.exports


def test_resuming_does_not_export_an_unchanged_best_checkpoint_again(tmp_path):
    ckpt_dir, deploy_dir = tmp_path / "ckpts", tmp_path / "deploy"

    def run(root, **fit_kwargs):
        callback = DeployCallback(export_on=["best_checkpoint"], dirpath=str(deploy_dir),
                                  fail_on_error=True)
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", save_last=True)
        make_trainer(root, [callback], checkpoint=checkpoint).fit(
            tiny_module(), tiny_data(), **fit_kwargs)
        return callback

    run(tmp_path / "first")
    manifest = deploy_dir / "best" / "manifest.json"
    written = manifest.read_text()
    resumed = run(tmp_path / "second", ckpt_path=ckpt_dir / "last.ckpt")
    assert manifest.read_text() == written  # same content, not re-exported
    assert resumed.exports["best"]["checkpoint_sha256"] == json.loads(written)["extra"][
        "checkpoint_sha256"]


def test_exports_survive_testing_the_best_checkpoint(tmp_path):
    callback = DeployCallback(fail_on_error=True)
    trainer = make_trainer(tmp_path, [callback])
    module = tiny_module()
    data = tiny_data()
    trainer.fit(module, data)
    before = json.loads(json.dumps(callback.exports))
    assert before["final"]["passed"] is True
    trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)
    assert callback.exports == before
