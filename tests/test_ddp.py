"""Two CPU processes under DDP: rank zero exports once, the other rank waits, nobody hangs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deployplug.verification import verify

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_smoke.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_fit_writes_exactly_one_verified_artifact_set(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    manifests = sorted(tmp_path.rglob("manifest.json"))
    assert len(manifests) == 1, manifests
    assert manifests[0].parent.name == "final"
    assert verify(manifests[0].parent).passed

    summaries = [line for line in proc.stdout.splitlines() if line.startswith("DDP_SMOKE ")]
    assert len(summaries) == 1  # only rank zero reports
    summary = json.loads(summaries[0].split(" ", 1)[1])
    assert summary["world_size"] == 2
    assert summary["global_step"] == 4  # 32 samples / batch 8 / 2 ranks, 2 epochs
    metrics = summary["exports"]["final"]["metrics"]
    assert metrics["deploy/onnx/passed"] == 1.0
    assert metrics["deploy/onnx/val_agreement"] == 1.0
    # Both ranks finished (rank 1 waited at the broadcast instead of racing or hanging) and
    # only one process wrote the deploy folder: no second, per-rank directory exists.
    assert sorted(p.name for p in manifests[0].parents[1].iterdir()) == ["final"]


@pytest.mark.slow
def test_ddp_fit_with_best_checkpoint_exports_does_not_hang(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--best"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    deploy = next(tmp_path.rglob("deploy"))
    tags = sorted(p.name for p in deploy.iterdir())
    # the final export, plus one export per surviving checkpoint (stale ones are pruned)
    assert "final" in tags
    assert set(tags) - {"final"} == {c.stem for c in checkpoints}
    for tag in tags:
        assert verify(deploy / tag).passed
    summary = json.loads(next(line for line in proc.stdout.splitlines()
                              if line.startswith("DDP_SMOKE ")).split(" ", 1)[1])
    assert set(summary["exports"]) == set(tags)


SLOW_EXPORT_SCRIPT = '''
import json, sys, time
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

from deployplug.callback import DeployCallback
from deployplug.data import SyntheticDataModule
from deployplug.lit import ClassifierModule


class SlowExport(DeployCallback):
    """An export that outlasts the training process group's timeout."""

    def _export(self, *args, **kwargs):
        time.sleep(float(sys.argv[2]))
        return super()._export(*args, **kwargs)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(model="repvgg_tiny", num_classes=10, in_channels=1,
                              input_size=16, model_kwargs={"width": 4})
    data = SyntheticDataModule(num_samples=32, val_samples=16, num_classes=10, in_channels=1,
                               image_size=16, batch_size=8)
    callback = SlowExport(formats=["onnx"], fail_on_error=True, preflight="off")
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=1, default_root_dir=out,
                         strategy=DDPStrategy(timeout=timedelta(seconds=float(sys.argv[3]))),
                         callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, data)
    # one file per rank: two processes printing at once can interleave their lines
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"rank": trainer.global_rank, "exports": sorted(callback.exports)}))
'''


@pytest.mark.slow
def test_ddp_survives_an_export_longer_than_the_process_group_timeout(tmp_path):
    script = tmp_path / "slow_export.py"
    script.write_text(SLOW_EXPORT_SCRIPT)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # export 40 s, process-group timeout 30 s
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "40", "30"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "run").glob("rank*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]  # both ranks finished the fit
    manifests = sorted((tmp_path / "run").rglob("manifest.json"))
    assert len(manifests) == 1 and manifests[0].parent.name == "final"
    assert verify(manifests[0].parent).passed
