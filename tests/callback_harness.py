"""Tiny LightningModules, data and trainers shared by the DeployCallback test files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from deployplug.data import SyntheticDataModule
from deployplug.lit import ClassifierModule

SIZE = 16
CLASSES = 4


def tiny_module(**kwargs: Any) -> ClassifierModule:
    return ClassifierModule(model="repvgg_tiny", num_classes=CLASSES, in_channels=1,
                            input_size=SIZE, lr=0.05, model_kwargs={"width": 4}, **kwargs)


def tiny_data(**kwargs: Any) -> SyntheticDataModule:
    args: dict[str, Any] = dict(num_samples=16, val_samples=8, num_classes=CLASSES,
                                in_channels=1, image_size=SIZE, batch_size=8)
    args.update(kwargs)
    return SyntheticDataModule(**args)


class NormHeadModule(pl.LightningModule):
    """forward = normalise -> backbone ``net`` -> ``head``: ``net`` alone is not the model.

    ``val/acc`` is logged from ``validation_step`` the usual way (a torchmetrics object), so
    tests can compare the exported model's accuracy with what Lightning reported.
    """

    def __init__(self, features: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, features, 3, padding=1, bias=False), nn.BatchNorm2d(features),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(features, CLASSES)
        self.register_buffer("mean", torch.tensor(0.25))
        self.register_buffer("std", torch.tensor(2.0))
        self.example_input_array = torch.zeros(1, 1, SIZE, SIZE)
        self.val_acc = MulticlassAccuracy(num_classes=CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net((x - self.mean) / self.std))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self(batch[0])
        self.log("val/loss", F.cross_entropy(logits, batch[1]))
        self.val_acc(logits, batch[1])
        self.log("val/acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(root: Path, callbacks: list, max_epochs: int = 1,
                 checkpoint: ModelCheckpoint | None = None, **kwargs: Any) -> pl.Trainer:
    checkpoint = checkpoint or ModelCheckpoint(monitor="val/loss", save_last=True)
    args: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=max_epochs, default_root_dir=root,
        logger=CSVLogger(root, name="logs"), enable_progress_bar=False,
        enable_model_summary=False, limit_train_batches=2, limit_val_batches=1,
        num_sanity_val_steps=0)
    args.update(kwargs)
    return pl.Trainer(callbacks=[*callbacks, checkpoint], **args)


def run_dir(root: Path) -> Path:
    return root / "logs" / "version_0"


def logged_metrics(root: Path) -> dict[str, float]:
    """Last non-empty value of every column of the CSV logger's metrics file."""
    out: dict[str, float] = {}
    with open(run_dir(root) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def forward_copy(module: nn.Module) -> nn.Module:
    """A detached CPU eval copy: fresh PyTorch outputs of the module as it is now."""
    import copy

    return copy.deepcopy(module).cpu().float().eval()  # Lightning drops the trainer reference
