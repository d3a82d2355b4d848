"""What the callback exports is what the LightningModule computes, and it is checked against it.

A backbone ``net`` plus a ``head`` and an input normalisation in ``forward``: exporting ``net``
alone ships features instead of logits, and checking that export against ``net`` itself (or
measuring "parity" with ``net`` on both sides) reports a perfect result for the wrong model.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from callback_harness import (
    CLASSES,
    SIZE,
    NormHeadModule,
    forward_copy,
    logged_metrics,
    make_trainer,
    run_dir,
    tiny_data,
    tiny_module,
)
from torch import nn

import deployplug.parity
from deployplug.callback import DeployCallback, validation_samples
from deployplug.errors import ModuleMismatchError, ParityError
from deployplug.export_subject import lightning_copy, resolve_subject
from deployplug.verification import verify


def final_dir(root):
    return run_dir(root) / "deploy" / "final"


def manifest_of(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# --------------------------------------------------------------------------- in a fit

def test_default_export_is_the_whole_forward_and_parity_matches_lightning(tmp_path):
    module = NormHeadModule()
    callback = DeployCallback(validation_parity=True, fail_on_error=True)
    trainer = make_trainer(tmp_path, [callback], limit_val_batches=1.0)
    trainer.fit(module, tiny_data(val_samples=24))

    folder = final_dir(tmp_path)
    manifest = manifest_of(folder)
    assert manifest["passed"] is True
    assert manifest["extra"]["exported_module"] == "NormHeadModule.forward"
    assert manifest["extra"]["reproduces_forward"] is True
    # The artifact computes the logits, normalisation included, not the backbone's features.
    assert [o["shape"] for o in manifest["outputs"]] == [[1, CLASSES]]
    session = ort.InferenceSession(str(folder / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, SIZE, SIZE) * 3 + 1
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    expected = forward_copy(module)(x).detach().numpy()
    assert np.max(np.abs(onnx_out - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert verify(folder, model=forward_copy(module)).passed
    assert not verify(folder, model=nn.Sequential(forward_copy(module).net,
                                                  nn.Linear(8, CLASSES))).passed

    # Parity is measured against the trained forward: the same accuracy Lightning logged.
    metrics = logged_metrics(tmp_path)
    assert metrics["deploy/onnx/val_agreement"] == 1.0
    assert metrics["deploy/torch/val_acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert metrics["deploy/onnx/val_acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert callback.exports["final"]["exported_module"] == "NormHeadModule.forward"


def test_net_is_exported_when_it_is_the_forward(tmp_path):
    callback = DeployCallback(fail_on_error=True)
    make_trainer(tmp_path, [callback]).fit(tiny_module(), tiny_data())
    extra = manifest_of(final_dir(tmp_path))["extra"]
    assert extra["exported_module"] == "net"
    assert extra["reproduces_forward"] is True


def test_empty_module_attr_exports_the_whole_forward(tmp_path):
    module = tiny_module()
    callback = DeployCallback(module_attr="", fail_on_error=True)
    make_trainer(tmp_path, [callback]).fit(module, tiny_data())
    folder = final_dir(tmp_path)
    assert manifest_of(folder)["extra"]["exported_module"] == "ClassifierModule.forward"
    assert verify(folder, model=forward_copy(module)).passed


def test_named_submodule_that_is_not_the_forward_stops_the_fit(tmp_path):
    trainer = make_trainer(tmp_path, [DeployCallback(module_attr="net")])
    with pytest.raises(ModuleMismatchError) as info:
        trainer.fit(NormHeadModule(), tiny_data())
    text = str(info.value)
    assert "(1, 8)" in text and "(1, 4)" in text  # both output shapes
    assert "module_attr=None" in text and "accept_submodule_mismatch=True" in text
    assert trainer.global_step == 0
    assert not list(tmp_path.rglob("manifest.json"))


def test_named_submodule_mismatch_in_warn_mode_trains_then_refuses_to_export(tmp_path):
    callback = DeployCallback(module_attr="net", preflight="warn")
    trainer = make_trainer(tmp_path, [callback])
    with pytest.warns(UserWarning, match="ModuleMismatchError|does not compute"):
        trainer.fit(NormHeadModule(), tiny_data())
    assert trainer.global_step == 2
    assert not list(tmp_path.rglob("manifest.json"))
    assert "final" not in callback.exports or not callback.exports["final"]["passed"]


def test_accepted_submodule_is_exported_and_checked_against_itself(tmp_path):
    module = NormHeadModule()
    callback = DeployCallback(module_attr="net", accept_submodule_mismatch=True,
                              fail_on_error=True)
    make_trainer(tmp_path, [callback]).fit(module, tiny_data())
    folder = final_dir(tmp_path)
    manifest = manifest_of(folder)
    assert manifest["extra"]["exported_module"] == "net"
    assert manifest["extra"]["reproduces_forward"] is False
    assert [o["shape"] for o in manifest["outputs"]] == [[1, 8]]
    assert verify(folder, model=forward_copy(module).net).passed


def test_accepting_a_mismatch_rules_out_parity():
    with pytest.raises(ValueError, match="validation_parity"):
        DeployCallback(module_attr="net", accept_submodule_mismatch=True,
                       validation_parity=True)


def test_parity_failure_is_a_parity_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("session exploded")

    monkeypatch.setattr(deployplug.parity, "validation_parity", broken)
    trainer = make_trainer(tmp_path, [DeployCallback(validation_parity=True,
                                                     fail_on_error=True)])
    with pytest.raises(ParityError, match="session exploded"):
        trainer.fit(NormHeadModule(), tiny_data())
    # The export itself passed and landed before the parity run.
    assert manifest_of(final_dir(tmp_path))["passed"] is True

    warn_root = tmp_path / "warn"
    trainer = make_trainer(warn_root, [DeployCallback(validation_parity=True)])
    with pytest.warns(UserWarning, match="validation parity failed with ParityError") as record:
        trainer.fit(NormHeadModule(), tiny_data())
    assert not any("deployment export failed" in str(w.message) for w in record)


def test_verification_samples_include_distinct_real_validation_inputs(tmp_path):
    data = tiny_data(val_samples=8, batch_size=4)
    make_trainer(tmp_path, [DeployCallback(fail_on_error=True)]).fit(NormHeadModule(), data)
    with np.load(final_dir(tmp_path) / "reference.npz") as ref:
        inputs = [ref[k] for k in sorted(ref.files, key=lambda k: int(k[1:].split("_")[0]))
                  if "_in" in k]
    assert len(inputs) >= 4  # example, random samples, two validation inputs
    for i in range(len(inputs)):
        for j in range(i + 1, len(inputs)):
            assert not np.array_equal(inputs[i], inputs[j]), (i, j)
    val_x = data.val_set.tensors[0]
    for real in (val_x[0:1], val_x[1:2]):
        assert any(np.array_equal(real.numpy(), a) for a in inputs)


# --------------------------------------------------------------------------- units

def test_validation_samples_cut_batches_to_the_example_size():
    x = torch.arange(5 * 2 * 3 * 3, dtype=torch.float32).reshape(5, 2, 3, 3)
    loader = [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(2))]
    got = validation_samples(loader, [(2, 2, 3, 3)], count=3)
    assert [tuple(s.shape) for s in got] == [(2, 2, 3, 3), (2, 2, 3, 3)]
    assert torch.equal(got[0], x[0:2]) and torch.equal(got[1], x[3:5])
    assert validation_samples(loader, [(1, 2, 4, 4)], count=2) == []  # other image size
    assert validation_samples(None, [(1, 2, 3, 3)]) == []


def test_lightning_copy_leaves_the_trainer_and_data_behind(tmp_path):
    module = NormHeadModule()
    trainer = make_trainer(tmp_path, [], max_epochs=1)
    data = tiny_data()
    trainer.fit(module, data)
    module.keep_data = data  # an attribute pointing at the datamodule is not copied either
    clone = lightning_copy(module)
    assert clone._trainer is None and clone.keep_data is None
    assert module.trainer is trainer and module.keep_data is data
    assert not clone.training and next(clone.parameters()).device.type == "cpu"
    x = torch.randn(2, 1, SIZE, SIZE)
    assert torch.equal(clone(x), forward_copy(module)(x))


def test_resolve_subject_rules():
    lit = lightning_copy(NormHeadModule())
    example = torch.randn(1, 1, SIZE, SIZE)
    assert resolve_subject(lit, [example]).name == "NormHeadModule.forward"
    assert resolve_subject(lit, [example], module_attr="").model is lit
    with pytest.raises(ModuleMismatchError, match="shapes"):
        resolve_subject(lit, [example], module_attr="net")
    accepted = resolve_subject(lit, [example], module_attr="net",
                               accept_submodule_mismatch=True)
    assert accepted.model is lit.net and accepted.reference is lit.net
    with pytest.raises(ValueError, match="no submodule 'backbone'"):
        resolve_subject(lit, [example], module_attr="backbone")

    plain = lightning_copy(tiny_module())
    auto = resolve_subject(plain, [example])
    assert auto.name == "net" and auto.model is plain.net and auto.reference is plain
    named = resolve_subject(plain, [example], module_attr="net")
    assert named.reproduces_forward and named.reference is plain
