"""Two-process CPU DDP fit with DeployCallback: exactly one artifact set, and no hang.

    python scripts/ddp_smoke.py OUT_DIR [--best]

``--best`` also exports at every new best checkpoint, which exercises the per-epoch
collective (rank zero decides and exports, every rank agrees on the outcome).

The ``ddp`` strategy re-executes this script for rank 1, so everything runs under the
``__main__`` guard and only rank zero prints the summary (one JSON line) at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from deployplug.callback import DeployCallback
from deployplug.data import SyntheticDataModule
from deployplug.lit import ClassifierModule


def main(out_dir: Path, best: bool = False) -> dict:
    torch.set_num_threads(1)  # two processes share the cores
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(model="repvgg_tiny", num_classes=10, in_channels=1, input_size=16,
                              model_kwargs={"width": 4})
    data = SyntheticDataModule(num_samples=32, val_samples=16, num_classes=10, in_channels=1,
                               image_size=16, batch_size=8)
    callback = DeployCallback(formats=["onnx"], validation_parity=True, fail_on_error=True,
                              export_on=["fit_end", "best_checkpoint"] if best else ["fit_end"])
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                         default_root_dir=out_dir, logger=CSVLogger(out_dir, name="logs"),
                         callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, data)
    return {"rank": trainer.global_rank, "world_size": trainer.world_size,
            "global_step": trainer.global_step, "exports": callback.exports}


if __name__ == "__main__":
    summary = main(Path(sys.argv[1]), best="--best" in sys.argv[2:])
    if summary["rank"] == 0:
        print("DDP_SMOKE " + json.dumps(summary, default=str))
