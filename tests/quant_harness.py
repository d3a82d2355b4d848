"""Small trained RepVGG nets on the bundled digits, and outliers planted into them.

INT8 is judged by decisions, so the tests need a net whose decisions mean something: a tiny
RepVGG trained for two epochs on scikit-learn's 8x8 digits (no upsampling) reaches ~90 %
in a few seconds. Outliers are planted the way training produces them, in BatchNorm scales,
either exactly compensated downstream (the function is unchanged, only int8 suffers) or not
(for the report's attribution).

Tiny nets run on one thread: on shared cores a second OpenMP thread only waits for the first
(training the tiny net took 60 s on two busy threads, 2.5 s on one).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.models.repvgg import RepVGG

SEED = 0


@functools.cache
def digits(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, val x, val y) at 8x8, normalized like the datamodule does."""
    from deployplug.data import DigitsDataModule

    dm = DigitsDataModule(image_size=8, batch_size=64, seed=seed)
    dm.setup()
    assert dm.train_set is not None and dm.val_set is not None
    xtr, ytr = dm.train_set.tensors
    xv, yv = dm.val_set.tensors
    return xtr, ytr, xv, yv


def tiny_repvgg(quant_friendly: bool = False) -> RepVGG:
    """8x8 -> 4x4 -> 2x2: a stem, two blocks of 16 channels, two of 32 (one with identity)."""
    torch.manual_seed(SEED)
    return RepVGG(8, [(16, 2, 2), (32, 2, 2)], num_classes=10, in_channels=1, stem_stride=1,
                  quant_friendly=quant_friendly)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 2,
          lr: float = 0.05) -> nn.Module:
    with one_thread():
        return _train(model, x, y, epochs, lr)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
           lr: float) -> nn.Module:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def plant_compensated_outlier(model: RepVGG, channel: int, factor: float) -> RepVGG:
    """A copy where channel ``channel`` of ``stage1.1`` is ``factor`` times larger in every
    branch and ``stage2.0`` divides its input by the same factor: the same function, but a
    fused ``stage1.1`` kernel (and activation) with one huge channel."""
    model = copy.deepcopy(model)
    block = model.stage1[1]
    for bn in (block.conv_kxk.bn, block.conv_1x1.bn, block.identity):
        bn.weight[channel] *= factor
        bn.bias[channel] *= factor
    nxt = model.stage2[0]
    nxt.conv_kxk.conv.weight[:, channel] /= factor
    nxt.conv_1x1.conv.weight[:, channel] /= factor
    return model


@torch.no_grad()
def plant_identity_outlier(model: RepVGG, channel: int, factor: float) -> RepVGG:
    """A copy whose ``stage1.1`` identity BN scales ``channel`` by ``factor`` more."""
    model = copy.deepcopy(model)
    model.stage1[1].identity.weight[channel] *= factor
    return model


@functools.cache
def _trained(quant_friendly: bool) -> RepVGG:
    xtr, ytr, _, _ = digits()
    return train(tiny_repvgg(quant_friendly), xtr, ytr)


def trained_tiny(quant_friendly: bool = False) -> RepVGG:
    """A fresh copy of the (once per process) trained tiny net."""
    return copy.deepcopy(_trained(quant_friendly))


def calibration_batches(count: int = 256, size: int = 64) -> list[torch.Tensor]:
    xtr = digits()[0]
    return [xtr[i:i + size] for i in range(0, count, size)]


@torch.no_grad()
def plant_dead_feature_outlier(model: RepVGG, feature: int, value: float) -> RepVGG:
    """A copy whose last block never activates ``feature`` (a large negative BN shift) and
    whose linear head weighs that dead feature by ``value``: fp32 ignores it, but a
    per-tensor (or per-row) int8 head has to span ``value`` and rounds every real weight to
    zero. No conv -> ReLU -> conv pair reaches the head, so only float weights repair it."""
    model = copy.deepcopy(model)
    block = model.stage2[1]
    block.conv_kxk.bn.bias[feature] = -1e4
    model.linear.weight[:, feature] = value
    return model
