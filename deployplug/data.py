"""Datamodules that work offline: scikit-learn's bundled digits and synthetic tensors.

The digits set ships inside the scikit-learn wheel, so the end-to-end demo (train a RepVGG,
export it, check the export on real validation images) runs on a machine without internet.
Synthetic data exists for tests, where only shapes matter.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def _loader(dataset: TensorDataset, batch_size: int, num_workers: int, shuffle: bool,
            seed: int) -> DataLoader:
    # A seeded generator keeps the shuffling order reproducible across runs.
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, persistent_workers=num_workers > 0)


class DigitsDataModule(pl.LightningDataModule):
    """The 1797 8x8 handwritten digits of ``sklearn.datasets.load_digits``, upsampled.

    Pixels are scaled to [0, 1], normalized with the training split's mean and standard
    deviation (no statistics leak from validation), and resized to ``image_size`` with bilinear
    interpolation so that models built for 32x32 inputs (several stride-2 stages) still have
    spatial extent left. The split is stratified and depends only on ``seed``.

    Args:
        image_size: side of the square images fed to the model.
        batch_size: batch size of every dataloader.
        val_fraction: share of the samples held out for validation (stratified by class).
        seed: seed of the split and of the training shuffle.
        num_workers: dataloader worker processes.
    """

    num_classes: int = 10
    in_channels: int = 1

    def __init__(self, image_size: int = 32, batch_size: int = 64, val_fraction: float = 0.2,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape of one example batch of size 1, as the exporters expect it."""
        return (1, self.in_channels, self.image_size, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0  # 0..16 -> 0..1
        labels = digits.target.astype(np.int64)
        idx_train, idx_val = train_test_split(
            np.arange(len(labels)), test_size=self.val_fraction, stratify=labels,
            random_state=self.seed)
        mean = float(images[idx_train].mean())
        std = float(images[idx_train].std())
        x = torch.from_numpy((images - mean) / std).unsqueeze(1)
        if self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        y = torch.from_numpy(labels)
        train_idx, val_idx = torch.from_numpy(idx_train), torch.from_numpy(idx_val)
        self.train_set = TensorDataset(x[train_idx].contiguous(), y[train_idx])
        self.val_set = TensorDataset(x[val_idx].contiguous(), y[val_idx])

    def train_dataloader(self) -> DataLoader:
        return _loader(self._require(self.train_set), self.batch_size, self.num_workers,
                       shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return _loader(self._require(self.val_set), self.batch_size, self.num_workers,
                       shuffle=False, seed=self.seed)

    def test_dataloader(self) -> DataLoader:
        # The bundled set is small; the held-out split doubles as the test split.
        return self.val_dataloader()

    @staticmethod
    def _require(dataset: TensorDataset | None) -> TensorDataset:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return dataset


class SyntheticDataModule(pl.LightningDataModule):
    """Random images with random labels: shapes without meaning, for fast tests.

    Args:
        num_samples: training samples.
        val_samples: validation samples.
        num_classes: label range.
        in_channels: image channels.
        image_size: square side, or ``[height, width]`` for non-square images.
        batch_size: batch size of every dataloader.
        seed: seed of the tensors and of the shuffle.
    """

    def __init__(self, num_samples: int = 64, val_samples: int = 32, num_classes: int = 10,
                 in_channels: int = 3, image_size: int | tuple[int, int] = 32,
                 batch_size: int = 16, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.val_samples = val_samples
        self.num_classes = num_classes
        self.in_channels = in_channels
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or [height, width], got {image_size}")
        self.image_hw: tuple[int, int] = (int(size[0]), int(size[1]))
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, *self.image_hw)

    def _make(self, count: int, seed: int) -> TensorDataset:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(count, self.in_channels, *self.image_hw, generator=gen)
        y = torch.randint(0, self.num_classes, (count,), generator=gen)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._make(self.num_samples, self.seed)
            self.val_set = self._make(self.val_samples, self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return _loader(DigitsDataModule._require(self.train_set), self.batch_size, 0,
                       shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return _loader(DigitsDataModule._require(self.val_set), self.batch_size, 0,
                       shuffle=False, seed=self.seed)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
