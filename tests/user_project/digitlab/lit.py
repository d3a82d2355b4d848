"""A small multi-branch classifier whose forward does more than its backbone."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import deployplug as dp


class BarNet(pl.LightningModule):
    """Normalise, a conv+BN stem, RepVGG blocks, global pooling and a linear head.

    The forward normalises its input with buffers, so only the whole forward is the model:
    deployplug must export ``BarNet.forward``, not a submodule.

    Args:
        channels: output channels of the stem and of each RepVGG block.
        num_classes: number of classes.
        image_size: side of the square single-channel input.
        lr: SGD learning rate.
    """

    def __init__(self, channels: list[int] | None = None, num_classes: int = 4,
                 image_size: int = 12, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        widths = list(channels or [8, 8])
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.body = nn.Sequential(*[dp.RepVGGBlock(a, b) for a, b in zip(widths, widths[1:])])
        self.head = nn.Linear(widths[-1], num_classes)
        self.register_buffer("mean", torch.tensor(0.2))
        self.register_buffer("std", torch.tensor(0.5))
        self.example_input_array = torch.zeros(1, 1, image_size, image_size)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem((x - self.mean) / self.std))
        return self.head(x.mean(dim=(2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self(batch[0])
        self.log("val/loss", F.cross_entropy(logits, batch[1]))
        self.val_acc(logits, batch[1])
        self.log("val/acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
