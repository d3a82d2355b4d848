"""Images of one bright horizontal bar in noise; the class is which band the bar is in."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class BarsDataModule(pl.LightningDataModule):
    """Seeded synthetic data that a small network learns in a couple of epochs.

    Args:
        num_classes: number of bands (classes) the image height is cut into.
        image_size: side of the square single-channel images.
        train_samples: training images.
        val_samples: validation images.
        batch_size: batch size of both loaders.
        seed: seed of the images and of the shuffle.
    """

    def __init__(self, num_classes: int = 4, image_size: int = 12, train_samples: int = 128,
                 val_samples: int = 40, batch_size: int = 16, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _make(self, count: int, seed: int) -> TensorDataset:
        hp = self.hparams
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, hp.num_classes, (count,), generator=gen)
        images = 0.3 * torch.rand(count, 1, hp.image_size, hp.image_size, generator=gen)
        band = hp.image_size // hp.num_classes
        for i, label in enumerate(labels.tolist()):
            row = label * band + int(torch.randint(0, band, (1,), generator=gen))
            images[i, 0, row, :] += 1.0
        return TensorDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._make(self.hparams.train_samples, self.hparams.seed)
            self.val_set = self._make(self.hparams.val_samples, self.hparams.seed + 1)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
