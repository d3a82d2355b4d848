"""The offline datamodules: real digits (split, scaling, resizing) and synthetic tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from deployplug.data import DigitsDataModule, SyntheticDataModule


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=32, batch_size=50, val_fraction=0.2, seed=0)
    dm.setup("fit")
    return dm


def test_digits_split_sizes_shapes_and_attributes(digits):
    assert digits.num_classes == 10 and digits.in_channels == 1
    assert digits.input_shape == (1, 1, 32, 32)
    n_train, n_val = len(digits.train_set), len(digits.val_set)
    assert n_train + n_val == 1797
    assert n_val == pytest.approx(0.2 * 1797, abs=1)
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (50, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9


def test_digits_split_is_stratified_and_disjoint(digits):
    train_counts = torch.bincount(digits.train_set.tensors[1], minlength=10).float()
    val_counts = torch.bincount(digits.val_set.tensors[1], minlength=10).float()
    ratio = val_counts / (train_counts + val_counts)
    assert torch.all((ratio - 0.2).abs() < 0.02)
    # Disjoint: no validation image also appears in the training split.
    train_rows = {tuple(r.tolist()) for r in digits.train_set.tensors[0][:, 0, ::4, ::4].round(
        decimals=4).flatten(1)}
    val_rows = [tuple(r.tolist()) for r in digits.val_set.tensors[0][:, 0, ::4, ::4].round(
        decimals=4).flatten(1)]
    assert sum(r in train_rows for r in val_rows) < 0.05 * len(val_rows)  # true duplicates only


def test_digits_values_are_the_real_images_scaled_and_normalized():
    dm = DigitsDataModule(image_size=8, seed=3)  # no resize: compare with the raw data
    dm.setup()
    x_train = dm.train_set.tensors[0].double()
    assert x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x_train.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # Raw pixels are 0..16 and both extremes occur, so x_min/x_max pin the affine map down.
    lo, hi = x_train.min(), x_train.max()
    recovered = (dm.val_set.tensors[0].double() - lo) / (hi - lo) * 16.0
    assert torch.allclose(recovered, recovered.round(), atol=1e-3)
    raw = load_digits()
    by_pixels = {tuple(img.astype(int).ravel()): label
                 for img, label in zip(raw.images, raw.target)}
    for image, label in zip(recovered.round().int(), dm.val_set.tensors[1]):
        assert by_pixels[tuple(image.ravel().tolist())] == int(label)


def test_digits_upsampling_is_bilinear_of_the_8x8_image():
    small = DigitsDataModule(image_size=8, seed=0)
    big = DigitsDataModule(image_size=24, seed=0)
    small.setup()
    big.setup()
    expected = F.interpolate(small.val_set.tensors[0][:5], size=(24, 24), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(big.val_set.tensors[0][:5], expected, rtol=0, atol=1e-5)
    assert torch.equal(small.val_set.tensors[1], big.val_set.tensors[1])


def test_digits_split_depends_only_on_the_seed():
    a, b, c = (DigitsDataModule(seed=s, image_size=8) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])
    first_a = next(iter(a.train_dataloader()))[1]
    first_b = next(iter(b.train_dataloader()))[1]
    assert torch.equal(first_a, first_b)  # seeded shuffle


def test_digits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataModule(image_size=0)
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


def test_synthetic_shapes_including_non_square():
    dm = SyntheticDataModule(num_samples=10, val_samples=6, num_classes=3, in_channels=2,
                             image_size=(5, 7), batch_size=4, seed=1)
    dm.setup()
    assert dm.input_shape == (1, 2, 5, 7)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 2, 5, 7) and int(y.max()) < 3
    assert sum(len(b[0]) for b in dm.train_dataloader()) == 10
    again = SyntheticDataModule(num_samples=10, val_samples=6, num_classes=3, in_channels=2,
                                image_size=(5, 7), batch_size=4, seed=1)
    again.setup()
    assert torch.equal(again.train_set.tensors[0], dm.train_set.tensors[0])
    with pytest.raises(ValueError, match="image_size"):
        SyntheticDataModule(image_size=(1, 2, 3))
