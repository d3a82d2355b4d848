"""DeployCallback's validation parity for every format, inside a real (tiny) fit."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from callback_harness import (
    NormHeadModule,
    forward_copy,
    logged_metrics,
    make_trainer,
    tiny_data,
)

from deployplug.callback import DeployCallback

FORMATS = ("onnx", "caffe", "msnhnet")


def test_every_format_runs_over_the_validation_set_and_matches_lightning(tmp_path):
    module = NormHeadModule()
    callback = DeployCallback(formats=list(FORMATS), validation_parity=True, fail_on_error=True)
    trainer = make_trainer(tmp_path, [callback], limit_val_batches=1.0)
    trainer.fit(module, tiny_data(val_samples=20, batch_size=8))  # batches 8, 8, 4

    metrics = logged_metrics(tmp_path)
    for fmt in FORMATS:
        assert metrics[f"deploy/{fmt}/val_agreement"] == 1.0, fmt
        # The accuracy Lightning logged from validation_step, reproduced by each runtime.
        assert metrics[f"deploy/{fmt}/val_acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
        assert 0.0 <= metrics[f"deploy/{fmt}/val_max_error"] <= 1e-5
        assert callback.exports["final"]["metrics"][f"deploy/{fmt}/val_agreement"] == 1.0
    assert metrics["deploy/torch/val_acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    # The numbers stay with the artifacts: manifest, report.md, and integrity still holds.
    from deployplug import verify
    from deployplug.manifest import load_manifest

    manifest = load_manifest(callback.exports["final"]["dir"])
    parity = manifest.extra["parity"]
    assert set(parity) == {*FORMATS, "pytorch"}
    assert parity["caffe"]["agreement"] == 1.0 and parity["caffe"]["samples"] == 20
    report = (manifest.dir / "report.md").read_text()
    assert "## Validation parity" in report and "| caffe |" in report
    assert verify(manifest.dir).passed
    assert sorted(p.name for p in manifest.dir.iterdir()) == sorted(
        [f["name"] for f in manifest.files] + ["manifest.json"])


def test_parity_batches_limits_the_run_to_the_first_batches(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = NormHeadModule()
    data = tiny_data(val_samples=24, batch_size=8)
    callback = DeployCallback(formats=["caffe"], validation_parity=True, parity_batches=1,
                              fail_on_error=True)
    make_trainer(tmp_path, [callback], limit_val_batches=1.0).fit(module, data)

    x, y = data.val_set.tensors
    with torch.no_grad():
        first = forward_copy(module)(x[:8]).argmax(1)
        everything = forward_copy(module)(x).argmax(1)
    first_acc = float((first == y[:8]).double().mean())
    all_acc = float((everything == y).double().mean())
    metrics = logged_metrics(tmp_path)
    assert metrics["deploy/caffe/val_acc"] == pytest.approx(first_acc, abs=1e-6)
    assert metrics["deploy/torch/val_acc"] == pytest.approx(first_acc, abs=1e-6)
    assert first_acc != pytest.approx(all_acc, abs=1e-6)  # so the limit is what was measured
