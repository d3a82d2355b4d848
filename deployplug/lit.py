"""A LightningModule that trains any model of the zoo as an image classifier.

The network lives in the ``net`` attribute and the LightningModule adds nothing to its
forward pass. :class:`deployplug.callback.DeployCallback` checks that ``net`` reproduces the
forward exactly and then exports ``net`` alone (the same function, with module paths that
carry no ``net.`` prefix); a subclass whose forward does more is exported whole.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from deployplug import models


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification with a zoo model, SGD or AdamW and a cosine schedule.

    Args:
        model: name of a model in ``deployplug.models`` (e.g. ``repvgg_tiny``, ``repvgg_a0``).
        num_classes: number of output classes.
        in_channels: image channels.
        input_size: side of the square input; sets ``example_input_array``.
        optimizer: ``sgd`` (Nesterov momentum) or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay of every parameter.
        warmup_epochs: epochs of linear warm-up before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        model_kwargs: extra keyword arguments of the model builder.
    """

    def __init__(self, model: str = "repvgg_tiny", num_classes: int = 10, in_channels: int = 1,
                 input_size: int = 32, optimizer: Literal["sgd", "adamw"] = "sgd",
                 lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 1e-4,
                 warmup_epochs: float = 0.0, label_smoothing: float = 0.0,
                 model_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module = models.build(model, num_classes=num_classes,
                                           in_channels=in_channels, **(model_kwargs or {}))
        self.example_input_array = torch.zeros(1, in_channels, input_size, input_size)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams["label_smoothing"])
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
                 batch_size=len(y), sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams  # an AttributeDict of the constructor's arguments
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0,
                weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            return opt  # open-ended training: no horizon to decay towards
        total = int(total)
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = min(int(total * hp.warmup_epochs / epochs), total - 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
