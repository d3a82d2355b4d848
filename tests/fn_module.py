"""A one-off module around a function of the input, for tests that probe single ops."""

from __future__ import annotations

from torch import nn


class Fn(nn.Module):
    """``Fn(lambda m, x: ..., conv=nn.Conv2d(...))``: submodules are reachable as ``m.conv``."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, x):
        return self.fn(self, x)
