"""The layer emitter: MsnhNet's implicit "previous layer" wiring made explicit.

MsnhNet has no tensor names. A layer reads the previous layer's output unless a ``route``
jumps elsewhere, and ``varop`` addresses other layers by index. The emitter keeps, for every
graph value, the index of the layer holding it, and offers the few wiring moves a lowering
needs (make a value current, copy it, combine two values) so each op's lowering reads like
its maths. It also upholds the invariant the rest of the writer relies on: the layer that
holds a value stores exactly the torch tensor's row-major data, with MsnhNet shape
``canonical(torch shape)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployplug.exporters.msnhnet.text import MLayer
from deployplug.profiles.msnhnet_checks import canonical

Shape = tuple[int, int, int]
__all__ = ["INPUT", "Emitter", "NeedInputLayer", "Shape", "canonical", "dilate_kernel", "gcd",
           "square_kernel"]
INPUT = -1  # the "layer index" of the network input before any layer exists

_INVERSE = {"add": "add", "mul": "mul", "sub": "subInv", "div": "divInv"}


class NeedInputLayer(Exception):
    """Raised when a lowering must address the network input by index; the writer restarts
    with a no-op first layer that holds the input."""


@dataclass
class Emitter:
    """Layer list under construction plus the value -> layer index map."""

    in_shape: Shape
    layers: list[MLayer] = field(default_factory=list)
    where: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)
    node: str | None = None
    _tmp: int = 0

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def last(self) -> int:
        return len(self.layers) - 1

    def emit(self, kind: str, fields: list[tuple[str, Any]] | None = None,
             weights: list[np.ndarray] | None = None) -> int:
        if kind == "route" and not self.layers:
            raise NeedInputLayer
        layer = MLayer(kind, list(fields or []),
                       [np.asarray(w, dtype=np.float32) for w in (weights or [])], self.node)
        self.layers.append(layer)
        return self.last

    def bind(self, value: str, shape: Shape, index: int | None = None) -> None:
        """``value`` now lives in layer ``index`` (default: the last one)."""
        self.where[value] = self.last if index is None else index
        self.shapes[value] = shape

    def temp(self, shape: Shape) -> str:
        """Bind the last layer's output to a fresh internal value name and return it."""
        self._tmp += 1
        name = f"{self.node}#t{self._tmp}"
        self.bind(name, shape)
        return name

    def index(self, value: str) -> int:
        """Layer index holding ``value``, for a route or varop reference."""
        idx = self.where[value]
        if idx == INPUT:
            raise NeedInputLayer
        return idx

    # -- wiring --------------------------------------------------------------------------
    def use(self, value: str) -> None:
        """Make ``value`` the previous-layer output of the next layer (a route if needed)."""
        idx = self.where[value]
        if idx == self.last:
            return
        self.emit("route", [("layers", self.index(value))])

    def copy(self, value: str) -> str:
        """A fresh layer holding ``value`` (a varop cannot name the previous layer)."""
        self.use(value)
        self.emit("act", [("activation", "none")])
        return self.temp(self.shapes[value])

    def binary(self, op: str, a: str, b: str) -> None:
        """Emit ``a op b`` (op in add/sub/mul/div) for two same-shape values."""
        if a == b:
            self.use(a)
            self.emit("act", [("activation", "none")])
            self.emit("varop", [("layers", self.index(a)), ("type", op)])
            return
        ia, ib = self.where[a], self.where[b]
        if ia == self.last:
            self.emit("varop", [("layers", self.index(b)), ("type", op)])
        elif ib == self.last:
            self.emit("varop", [("layers", self.index(a)), ("type", _INVERSE[op])])
        else:
            self.emit("varop", [("layers", f"{self.index(a)},{self.index(b)}"), ("type", op)])

    def unary(self, value: str, kind: str, const: float | None = None) -> None:
        self.use(value)
        fields: list[tuple[str, Any]] = [("type", kind)]
        if const is not None:
            fields.append(("constVal", float(const)))
        self.emit("varop", fields)

    def act(self, value: str, activation: str, slopes: np.ndarray | None = None) -> None:
        self.use(value)
        self.emit("act", [("activation", activation)], [slopes] if slopes is not None else [])

    def view(self, value: str, shape: Shape) -> None:
        """Reinterpret ``value`` as ``shape`` (C, H, W); MsnhNet's slots are (W, H, C)."""
        self.use(value)
        self.emit("view", [("dim0", shape[2]), ("dim1", shape[1]), ("dim2", shape[0])])

    def permute(self, value: str, dims: tuple[int, int, int]) -> None:
        self.use(value)
        self.emit("permute", [("dim0", dims[0]), ("dim1", dims[1]), ("dim2", dims[2])])

    def select_channels(self, value: str, channels: list[int]) -> None:
        """out[i] = in[channels[i]] by a one-hot 1x1 conv (exact: the other terms are 0*x)."""
        c = self.shapes[value][0]
        weight = np.zeros((len(channels), c, 1, 1), np.float32)
        weight[np.arange(len(channels)), channels] = 1.0
        self.use(value)
        self.emit("conv", [("filters", len(channels)), ("kSize", 1), ("stride", 1),
                           ("padding", 0), ("useBias", 0)], [weight])

    def slice_axis(self, value: str, axis: int, start: int, stop: int, step: int) -> Shape:
        """``value[axis][start:stop:step]`` on a canonical axis; returns the new shape."""
        shape = list(self.shapes[value])
        size = shape[axis]
        keep = list(range(start, stop, step))
        shape[axis] = len(keep)
        out = (shape[0], shape[1], shape[2])
        if len(range(start, size, step)) == len(keep):  # no tail to drop: a plain slice
            self.use(value)
            fields = []
            if start:
                fields.append((f"start{axis}", start))
            if step != 1:
                fields.append((f"step{axis}", step))
            self.emit("slice", fields or [("start0", 0)])
            return out
        if axis == 0:
            self.select_channels(value, keep)
            return out
        swap = (1, 0, 2) if axis == 1 else (2, 1, 0)
        now = self.shapes[value]
        swapped = (now[swap[0]], now[swap[1]], now[swap[2]])
        self.permute(value, swap)
        tmp = self.temp(swapped)
        self.select_channels(tmp, keep)
        sel = self.temp((len(keep), swapped[1], swapped[2]))
        self.permute(sel, swap)
        return out


def dilate_kernel(weight: np.ndarray, dh: int, dw: int) -> np.ndarray:
    """Insert zeros so a dilated kernel becomes an undilated one of the same extent."""
    o, i, kh, kw = weight.shape
    out = np.zeros((o, i, dh * (kh - 1) + 1, dw * (kw - 1) + 1), weight.dtype)
    out[:, :, ::dh, ::dw] = weight
    return out


def square_kernel(weight: np.ndarray, k: int) -> np.ndarray:
    """Zero-fill a kernel to k x k, the real kernel in the top-left corner."""
    o, i, kh, kw = weight.shape
    out = np.zeros((o, i, k, k), weight.dtype)
    out[:, :, :kh, :kw] = weight
    return out


def gcd(a: int, b: int) -> int:
    return math.gcd(a, b)
