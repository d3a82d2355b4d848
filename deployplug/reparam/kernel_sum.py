"""A composed kernel as a sum of scaled, placed terms, added up in float64 only when written.

The generic pass composes every region in float64. Held as one dense float64 tensor per step,
a RepVGG-style block costs a float64 copy of each branch weight, a scaled copy of that, and
a float64 kernel twice the size of the result, all freshly allocated per region: on a large
model that memory traffic (page faults included) costs more than the arithmetic. Yet most of
a collapsed kernel is a closed form: a parameter times one factor per output channel (a conv
followed by BatchNorm or a learned scale), plus small kernels added onto some of its taps
(1x1 and identity branches). :class:`KernelSum` keeps exactly that:

* each :class:`Term` is a tensor as stored (any float dtype: its values are exact in
  float64), an optional float64 factor per output channel, its own group count and where its
  taps start inside the kernel's extent;
* scaling by a per-channel factor, adding branches and moving a kernel inside a larger extent
  only touch the factors and the offsets (``O(channels)`` work, no copy of a weight);
* the value is computed once: :meth:`KernelSum.write` fills blocks of output channels of a
  float64 scratch buffer, term by term in a fixed order, and rounds each block once into the
  result's dtype. :meth:`KernelSum.dense` runs the same arithmetic over all channels, so the
  float64 value a check sees is, element for element, the value that was rounded.

A term grouped more finely than the kernel is added through the column map of
:func:`~deployplug.reparam.fusion.regroup_kernel` (an identity term lands on the diagonal of
a dense kernel without building the dense identity).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

# Float64 elements per block of output channels written at once (4 MiB): most kernels take
# one block, a big one a few, and the scratch buffer stays small.
BLOCK_ELEMENTS = 1 << 19


_LOCAL = threading.local()


def scratch(numel: int, device: torch.device) -> torch.Tensor:
    """``numel`` float64 values of the calling thread's work buffer for ``device``.

    The buffer is kept between calls (at most :data:`BLOCK_ELEMENTS` values, 4 MiB, per
    thread and device): every kernel of every pass reuses it, so its pages are touched once
    instead of being freshly mapped and faulted in for each region.
    """
    buffers: dict[torch.device, torch.Tensor] = getattr(_LOCAL, "buffers", None) or {}
    _LOCAL.buffers = buffers
    buf = buffers.get(device)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float64, device=device)
        if numel <= BLOCK_ELEMENTS:  # a bigger one (one huge output channel) is not kept
            buffers[device] = buf
    return buf[:numel]


@dataclass(frozen=True)
class Term:
    """``row[o] * base[o, :, taps]``, placed at ``start`` in the kernel's extent.

    ``base`` has shape ``(O, I / groups, *k)``; ``row`` is float64 of length ``O`` (``None``
    means one). The term is never written to: it may be a model's own parameter.
    """

    base: torch.Tensor
    groups: int
    row: torch.Tensor | None
    start: tuple[int, ...]


@dataclass(frozen=True)
class KernelSum:
    """A kernel of shape ``(O, in_channels / groups, *extent)`` held as a sum of terms."""

    terms: tuple[Term, ...]
    groups: int
    in_channels: int
    extent: tuple[int, ...]

    @classmethod
    def of(cls, kernel: torch.Tensor, groups: int) -> KernelSum:
        """The kernel ``kernel`` itself (referenced, not copied)."""
        zeros = (0,) * (kernel.dim() - 2)
        return cls((Term(kernel, groups, None, zeros),), groups, kernel.shape[1] * groups,
                   tuple(kernel.shape[2:]))

    # ------------------------------------------------------------------------- shape

    @property
    def out_channels(self) -> int:
        return self.terms[0].base.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.extent)

    @property
    def dims(self) -> int:
        return len(self.extent)

    @property
    def device(self) -> torch.device:
        return self.terms[0].base.device

    # ------------------------------------------------------------------------- algebra

    def scaled(self, factor: torch.Tensor) -> KernelSum:
        """Every output channel ``o`` multiplied by ``factor[o]`` (float64, length ``O``)."""
        terms = tuple(Term(t.base, t.groups, factor if t.row is None else t.row * factor,
                           t.start) for t in self.terms)
        return KernelSum(terms, self.groups, self.in_channels, self.extent)

    def times(self, alpha: float) -> KernelSum:
        """The kernel multiplied by the constant ``alpha``."""
        if alpha == 1:
            return self
        full = torch.full((self.out_channels,), float(alpha), dtype=torch.float64,
                          device=self.device)
        return self.scaled(full)

    def placed(self, start: tuple[int, ...], extent: tuple[int, ...],
               groups: int) -> KernelSum:
        """The same taps inside a larger ``extent``, starting at ``start``, read as a kernel
        with ``groups`` groups (a divisor of the current count)."""
        if self.groups % groups:
            raise ValueError(f"cannot regroup groups={self.groups} as {groups}")
        for b, k, e in zip(start, self.extent, extent):
            if b < 0 or b + k > e:
                raise ValueError(f"kernel {self.extent} does not fit {extent} at {start}")
        terms = tuple(Term(t.base, t.groups, t.row,
                           tuple(a + b for a, b in zip(t.start, start))) for t in self.terms)
        return KernelSum(terms, groups, self.in_channels, extent)

    def plus(self, other: KernelSum) -> KernelSum:
        """The sum of two kernels of the same shape and grouping."""
        if self.shape != other.shape or self.groups != other.groups:
            raise ValueError(f"kernels {self.shape} (groups {self.groups}) and {other.shape} "
                             f"(groups {other.groups}) cannot be added")
        return KernelSum(self.terms + other.terms, self.groups, self.in_channels, self.extent)

    # ------------------------------------------------------------------------- values

    def dense(self) -> torch.Tensor:
        """The kernel as one float64 tensor (a new one)."""
        out = torch.empty(self.shape, dtype=torch.float64, device=self.device)
        self._fill(out, 0, self.out_channels, self._column_maps())
        return out

    def write(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """The kernel summed in float64 and rounded once to ``dtype``: a new tensor, block of
        output channels by block of output channels. Raises ``ValueError`` when a factor the
        composition computed (a BatchNorm's ``1 / sqrt(var + eps)``, products of scales) is
        not finite; the terms' own values are used as they are, like the region uses them."""
        rows = [t.row for t in self.terms if t.row is not None]
        if rows and not bool(torch.isfinite(torch.cat(rows)).all()):
            raise ValueError("a per-channel factor of the composed kernel is not finite")
        target = self.device if device is None else device
        out = torch.empty(self.shape, dtype=dtype, device=target)
        per_channel = max(1, math.prod(self.shape[1:]))
        block = max(1, min(self.out_channels, BLOCK_ELEMENTS // per_channel))
        flat = scratch(block * per_channel, self.device)
        columns = self._column_maps()
        for o0 in range(0, self.out_channels, block):
            o1 = min(o0 + block, self.out_channels)
            buf = flat[:(o1 - o0) * per_channel].view(o1 - o0, *self.shape[1:])
            self._fill(buf, o0, o1, columns)
            out[o0:o1].copy_(buf)
        return out

    def _fill(self, buf: torch.Tensor, o0: int, o1: int,
              columns: dict[int, torch.Tensor]) -> None:
        """Output channels ``o0:o1`` of the kernel into the float64 ``buf``: the first term
        covering the whole kernel is copied and scaled in place, every other term added onto
        the taps it covers, always in the order of :attr:`terms`."""
        spatial = (1,) * self.dims
        first = self.terms[0]
        start = 0
        if (first.groups == self.groups and not any(first.start)
                and tuple(first.base.shape[2:]) == self.extent):
            buf.copy_(first.base[o0:o1])
            if first.row is not None:
                buf.mul_(first.row[o0:o1].view(-1, 1, *spatial))
            start = 1
        else:
            buf.zero_()
        for i in range(start, len(self.terms)):
            term = self.terms[i]
            base = term.base[o0:o1]
            factor = None if term.row is None else term.row[o0:o1]
            row = None if factor is None else factor.view(-1, 1, *spatial)
            index = (slice(None), slice(None), *(slice(b, b + k) for b, k in zip(
                term.start, term.base.shape[2:])))
            window = buf[index]
            if term.groups == self.groups:
                # in place, the term's values read as float64 element by element: no copy
                if row is None:
                    window.add_(base)
                else:
                    window.addcmul_(base, row)
            elif i not in columns:
                # one input per output channel, onto a dense kernel's diagonal (an identity
                # or per-channel branch summed with a full convolution)
                diagonal = window.diagonal(o0, 0, 1)
                taps = base[:, 0].movedim(0, -1)
                if factor is None:
                    diagonal.add_(taps)
                else:
                    diagonal.addcmul_(taps, factor)
            else:
                part = base.to(torch.float64) if row is None else base * row
                window.scatter_add_(1, columns[i][o0:o1].expand_as(part), part)

    def _column_maps(self) -> dict[int, torch.Tensor]:
        """For each term of a finer grouping (by position in :attr:`terms`): where each of its
        input columns sits in this kernel's coarser grouping, per output channel (the map of
        :func:`~deployplug.reparam.fusion.regroup_kernel`)."""
        maps: dict[int, torch.Tensor] = {}
        out_ch = self.out_channels
        coarse_out_per, coarse_in_per = out_ch // self.groups, self.in_channels // self.groups
        for i, term in enumerate(self.terms):
            if term.groups == self.groups or (
                    self.groups == 1 and term.groups == out_ch == self.in_channels):
                continue  # the same grouping, or a diagonal (see _fill)
            rows = torch.arange(out_ch, device=self.device)
            in_per, out_per = term.base.shape[1], out_ch // term.groups
            first = (rows // out_per) * in_per - (rows // coarse_out_per) * coarse_in_per
            cols = first[:, None] + torch.arange(in_per, device=self.device)[None, :]
            maps[i] = cols.reshape(out_ch, in_per, *([1] * self.dims))
        return maps
