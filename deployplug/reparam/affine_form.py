"""A linear region's value as one convolution of its input: the algebra, with its refusals.

Every tensor inside a linear region is an affine, translation-equivariant function of the
region's input ``x``. :class:`AffineForm` holds that function in one canonical shape, per
spatial dim::

    y[o, p] = bias[o] + sum_{i, t} kernel[o, i, t] * x~[i, stride * p + t - pad_left]

where ``x~`` is ``x`` extended beyond its borders (zeros, or reflected/replicated/wrapped for a
non-zero ``padding_mode``), the kernel is undilated, and the output has
``floor((H + pad_left + pad_right - E) / stride) + 1`` positions. Convolutions, BatchNorm,
scales and shifts, padding, average pooling and sums of branches are each one method here,
and each either returns the exact new form or raises :class:`Refused` saying why one conv
cannot do it. Two facts carry every rule:

* A convolution is *padding, then an unpadded convolution*. An unpadded convolution only reads
  positions the form defines, so composing it is always exact
  (:func:`~deployplug.reparam.fusion.compose_kernels`).
* Padding the intermediate ``y`` is exact only where the form, extended past its own output
  range, reads nothing but ``x``'s padding (so its conv part is zero there) *and* the padding
  value equals what is left, the bias. Zero padding of a biased intermediate (the DBB border
  case) fails the second test unless the block pads with the bias value itself.

Output sizes must agree for every input size, not just one: branches are summed only when
``pad_left + pad_right - E`` and the stride agree, which makes the floor formulas equal for
all ``H``, so the result keeps a dynamic spatial size (and batch).

The kernel is a :class:`~deployplug.reparam.kernel_sum.KernelSum`: a convolution read
straight off the region's input keeps the model's own weight as a term, per-channel maps after
it scale that term's factor, and summed branches become more terms, so the common blocks are
composed without a float64 copy of any weight; anything else (a conv after a conv, a
per-channel map before a conv, trimming, dilation) works on the dense float64 kernel. Every
choice between those paths depends on the ops and their settings only, never on parameter
values, so two regions of the same structure go through the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from deployplug.reparam.fusion import (
    compose_bias,
    compose_kernels,
    compress_dilation,
    contract_pointwise,
    dilate_kernel,
    pointwise_after,
    regroup_kernel,
    scale_input_channels,
)
from deployplug.reparam.kernel_sum import KernelSum

# Bounded work: a region whose composed kernel would exceed these is refused, not built.
MAX_EXTENT = 63
MAX_KERNEL_ELEMENTS = 1 << 26
# A pad value and a bias are compared to this relative precision by default. They come from
# the same parameters by different formulas, and torch.fx evaluates arithmetic on buffers at
# trace time in the buffers' own dtype, so callers pass a bound from the model's dtype.
BIAS_RTOL = 1e-10

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class Refused(Exception):
    """One convolution cannot reproduce the region exactly; the message says why."""


@dataclass(frozen=True)
class ConvSpec:
    """The single convolution a region collapses to: its kernel as a float64 sum of terms
    (:meth:`KernelSum.write` rounds it into a weight), its float64 bias and its settings."""

    weight: KernelSum
    bias: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def describe(self) -> dict[str, object]:
        return {"class": f"Conv{len(self.stride)}d", "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "kernel_size": list(self.weight.shape[2:]), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "padding_mode": self.padding_mode, "bias": True}


def _vector(value: torch.Tensor | float, channels: int,
            device: torch.device | None = None) -> torch.Tensor:
    if (isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.dim() == 1
            and value.shape[0] == channels and (device is None or value.device == device)):
        return value  # the common case: a BatchNorm's float64 scale or shift
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(channels)
    if t.numel() != channels:
        raise Refused(f"a per-channel constant has {t.numel()} values for {channels} channels")
    return t


def _same_values(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = 1.0 + max(float(a.abs().max()), float(b.abs().max()))
    return float((a - b).abs().max()) <= rtol * scale


@dataclass(frozen=True)
class AffineForm:
    """``y = conv(x~, kernel, stride) + bias`` with explicit borders; see the module doc."""

    kernel: KernelSum
    bias: torch.Tensor
    groups: int
    stride: tuple[int, ...]
    pad_left: tuple[int, ...]
    pad_right: tuple[int, ...]
    padding_mode: str = "zeros"
    # True for the form :meth:`identity` made, at most padded: the region's input itself (unit
    # kernel, zero bias). A convolution of it is the convolution's own weight and bias.
    unit: bool = field(default=False, compare=False)

    @classmethod
    def identity(cls, channels: int, dims: int,
                 device: torch.device | str | None = None) -> AffineForm:
        ones = torch.ones(channels, 1, *([1] * dims), dtype=torch.float64, device=device)
        zeros = (0,) * dims
        return cls(KernelSum.of(ones, channels), ones.new_zeros(channels), channels,
                   (1,) * dims, zeros, zeros, unit=True)

    # -------------------------------------------------------------------------- properties

    @property
    def dims(self) -> int:
        return self.kernel.dims

    @property
    def out_channels(self) -> int:
        return self.kernel.out_channels

    @property
    def in_channels(self) -> int:
        return self.kernel.in_channels

    @property
    def extent(self) -> tuple[int, ...]:
        return self.kernel.extent

    def _size_offsets(self) -> tuple[int, ...]:
        """``pad_left + pad_right - E`` per dim: with the stride it fixes the output size."""
        return tuple(pl + pr - e for pl, pr, e in zip(self.pad_left, self.pad_right,
                                                        self.extent))

    def _mode(self) -> str:
        """The padding mode, or ``zeros`` when the form reads no padding at all."""
        if not any(self.pad_left) and not any(self.pad_right):
            return "zeros"
        return self.padding_mode

    def _with(self, **changes: Any) -> AffineForm:
        """A copy with ``changes`` (``dataclasses.replace`` without its per-call overhead)."""
        values: dict[str, Any] = {
            "kernel": self.kernel, "bias": self.bias, "groups": self.groups,
            "stride": self.stride, "pad_left": self.pad_left, "pad_right": self.pad_right,
            "padding_mode": self.padding_mode, "unit": self.unit}
        values.update(changes)
        return AffineForm(**values)

    # -------------------------------------------------------------------------- operations

    def affine(self, scale: torch.Tensor | float | None,
               shift: torch.Tensor | float | None) -> AffineForm:
        """``scale * y + shift`` per output channel (BatchNorm, learned scales, constants)."""
        kernel, bias = self.kernel, self.bias
        channels, device = self.out_channels, self.kernel.device
        b = None if shift is None else _vector(shift, channels, device)
        if scale is not None:
            a = _vector(scale, channels, device)
            kernel = kernel.scaled(a)
            bias = bias * a if b is None else torch.addcmul(b, bias, a)
        elif b is not None:
            bias = bias + b
        return self._with(kernel=kernel, bias=bias, unit=False)

    def padded(self, before: tuple[int, ...], after: tuple[int, ...],
               value: torch.Tensor | float = 0.0, mode: str = "zeros",
               rtol: float = BIAS_RTOL) -> AffineForm:
        """The form of ``y`` padded by ``before``/``after`` positions per dim.

        ``mode="zeros"`` pads with ``value`` (per channel or scalar); the others reflect,
        replicate or wrap. ``rtol`` is how close the bias must be to ``value``.
        """
        if any(b < 0 for b in before) or any(a < 0 for a in after):
            raise Refused("negative padding (cropping) is not composed")
        if not any(before) and not any(after):
            return self
        if mode != "zeros":
            pointwise = (all(e == 1 for e in self.extent) and all(s == 1 for s in self.stride)
                         and not any(self.pad_left) and not any(self.pad_right))
            if not pointwise:
                raise Refused(f"'{mode}' padding in the middle of a sequence: it would extend "
                              "an intermediate that already mixes neighbouring positions, "
                              "which no padding of the input reproduces")
            return self._with(pad_left=before, pad_right=after, padding_mode=mode)
        if self._mode() != "zeros":
            raise Refused(f"zero padding after '{self.padding_mode}' padding: the border "
                          "would mix reflected input with zeros")
        for dim, (b, a, e, s, pl, pr) in enumerate(zip(before, after, self.extent, self.stride,
                                                       self.pad_left, self.pad_right)):
            # Outside its range the form's conv part must read only x's zero padding.
            if b and e > pl + s:
                raise Refused(f"padding along spatial dim {dim} is applied to an intermediate "
                              "whose border already reads real input; the padded positions "
                              "would read it too in one conv")
            if a and e > pr + 1:
                raise Refused(f"padding along spatial dim {dim} (right/bottom side) is applied "
                              "to an intermediate whose last position does not end at the "
                              "input border for every input size (stride does not compose)")
        # the input itself (zero bias) padded with zeros: nothing to compare
        zero_on_zero = self.unit and not isinstance(value, torch.Tensor) and value == 0
        pad_value = None if zero_on_zero else _vector(value, self.out_channels,
                                                      self.kernel.device)
        if pad_value is not None and not _same_values(self.bias, pad_value, rtol):
            what = "zero padding" if not bool(pad_value.any()) else "constant padding"
            raise Refused(f"{what} is applied to an intermediate that carries a bias "
                          f"(max |bias - pad value| = "
                          f"{float((self.bias - pad_value).abs().max()):.3g}); one conv would "
                          "put the bias on the border instead. Pad with the bias value (as "
                          "DBB's BN-and-pad does) to make it fusable")
        return self._with(
                       pad_left=tuple(pl + s * b for pl, s, b in zip(self.pad_left,
                                                                     self.stride, before)),
                       pad_right=tuple(pr + s * a for pr, s, a in zip(self.pad_right,
                                                                      self.stride, after)))

    def conv(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...],
             dilation: tuple[int, ...], groups: int) -> AffineForm:
        """An *unpadded* convolution applied to ``y`` (pad first with :meth:`padded`).

        ``weight`` may be a parameter in its own dtype: it is referenced, never written, and
        only ever combined with float64 values. ``bias`` is float64 or ``None``.
        """
        if weight.shape[1] * groups != self.out_channels:
            raise Refused(f"a convolution expects {weight.shape[1] * groups} input channels "
                          f"but receives {self.out_channels}")
        outer = dilate_kernel(weight, dilation)
        new_stride = tuple(a * b for a, b in zip(self.stride, stride))
        if self.unit:
            # The region's input itself: the kernel is the weight, the bias the conv's own.
            b = bias if bias is not None else self.bias.new_zeros(weight.shape[0])
            return self._with(kernel=KernelSum.of(outer, groups), bias=b, groups=groups,
                           stride=new_stride, unit=False)
        outer = outer.to(torch.float64)
        pointwise = all(e == 1 for e in self.extent) and all(s == 1 for s in self.stride)
        if pointwise and self.kernel.shape[1] == 1 and self.groups == self.out_channels:
            # A per-channel map (BatchNorm, scale) under the conv: scale the conv's input
            # channels; the conv keeps its own groups.
            scale = self.kernel.dense().reshape(-1)
            kernel = scale_input_channels(outer, scale, groups)
            return self._with(kernel=KernelSum.of(kernel, groups), groups=groups,
                           stride=new_stride, bias=compose_bias(outer, bias, self.bias, groups))
        g = math.gcd(self.groups, groups)
        inner = regroup_kernel(self.kernel.dense(), self.groups, g)
        outer = regroup_kernel(outer, groups, g)
        extent = tuple(s * (e2 - 1) + e1 for s, e2, e1 in zip(self.stride, outer.shape[2:],
                                                               self.extent))
        _bounded(extent, outer.shape[0], inner.shape[1])
        if pointwise:
            kernel = contract_pointwise(outer, inner, g)
        elif all(e == 1 for e in outer.shape[2:]):
            kernel = pointwise_after(outer, inner, g)
        else:
            kernel = compose_kernels(outer, inner, self.stride, g)
        return self._with(kernel=KernelSum.of(kernel, g),
                       bias=compose_bias(outer, bias, self.bias, g), groups=g,
                       stride=new_stride)

    def combined(self, other: AffineForm, alpha: float, beta: float) -> AffineForm:
        """``alpha * self + beta * other``: two branches of the same input, summed."""
        if self.out_channels != other.out_channels:
            raise Refused(f"branches with {self.out_channels} and {other.out_channels} "
                          "channels are added (broadcasting over channels)")
        offsets = self._size_offsets()
        if self.stride != other.stride or offsets != other._size_offsets():
            raise Refused("branches have strides or border offsets that give different output "
                          "sizes for some input sizes")
        mine, theirs = self._mode(), other._mode()
        modes = {mine, theirs} - {"zeros"}
        padded_zero = any(mode == "zeros" and (any(f.pad_left) or any(f.pad_right))
                          for f, mode in ((self, mine), (other, theirs)))
        if len(modes) > 1 or (modes and padded_zero):
            raise Refused("branches pad their input differently (zero padding and a "
                          "non-zero padding_mode, or two different modes)")
        mode = modes.pop() if modes else "zeros"
        left = tuple(max(a, b) for a, b in zip(self.pad_left, other.pad_left))
        mine_extent, their_extent = self.extent, other.extent
        extent = tuple(max(pl - a + e, pl - b + f) for pl, a, e, b, f in zip(
            left, self.pad_left, mine_extent, other.pad_left, their_extent))
        right = tuple(o + e - pl for o, e, pl in zip(offsets, extent, left))
        g = math.gcd(self.groups, other.groups)
        _bounded(extent, self.out_channels, self.in_channels // g)
        # The branch that already spans the full extent comes first (usually the k x k one):
        # its term is the one written in place, the other's are added onto the taps they cover.
        parts = [(self, alpha), (other, beta)]
        if their_extent == extent and mine_extent != extent:
            parts.reverse()
        first, second = (f.kernel.placed(tuple(pl - fpl for pl, fpl in zip(left, f.pad_left)),
                                         extent, g).times(c) for f, c in parts)
        bias = (self.bias if alpha == 1 else alpha * self.bias) + (
            other.bias if beta == 1 else beta * other.bias)
        return AffineForm(first.plus(second), bias, g, self.stride, left, right, mode)

    # -------------------------------------------------------------------------- result

    def conv_spec(self, dilation_candidates: tuple[int, ...] = ()) -> ConvSpec:
        """The ``nn.ConvNd`` settings and values that compute this form, or :class:`Refused`.

        Zero taps at a border are trimmed while that makes the padding symmetric (the
        window start moves with the padding, so positions are unchanged); torch convs only
        pad symmetrically, so a form that still needs asymmetric padding is refused.
        """
        kernel = self.kernel
        left, right = list(self.pad_left), list(self.pad_right)
        if left != right:
            kernel = KernelSum.of(_trimmed(kernel.dense(), left, right), self.groups)
        for axis in range(self.dims):
            if left[axis] != right[axis]:
                raise Refused(f"the composed convolution needs asymmetric padding "
                              f"({left[axis]} before, {right[axis]} after) along spatial dim "
                              f"{axis}, which one ConvNd cannot express")
        dilation = (1,) * self.dims
        if any(d > 1 for d in dilation_candidates):
            dense, dilation = compress_dilation(kernel.dense(), dilation_candidates)
            kernel = KernelSum.of(dense, self.groups)
        mode = "zeros" if not any(left) else self.padding_mode
        return ConvSpec(kernel, self.bias, self.stride, tuple(left), dilation, self.groups,
                        mode)


def _trimmed(kernel: torch.Tensor, left: list[int], right: list[int]) -> torch.Tensor:
    """Zero border taps removed from the side with more padding, while the padding is
    asymmetric (``left`` and ``right`` are updated in place)."""
    for axis in range(kernel.dim() - 2):
        dim = axis + 2
        while left[axis] > right[axis] and kernel.shape[dim] > 1 and not bool(
                kernel.narrow(dim, 0, 1).any()):
            kernel = kernel.narrow(dim, 1, kernel.shape[dim] - 1)
            left[axis] -= 1
        while right[axis] > left[axis] and kernel.shape[dim] > 1 and not bool(
                kernel.narrow(dim, kernel.shape[dim] - 1, 1).any()):
            kernel = kernel.narrow(dim, 0, kernel.shape[dim] - 1)
            right[axis] -= 1
    return kernel.contiguous()


def _bounded(extent: tuple[int, ...], out_channels: int, in_per_group: int) -> None:
    if any(e > MAX_EXTENT for e in extent):
        raise Refused(f"the composed kernel would span {extent} taps (limit {MAX_EXTENT})")
    if out_channels * in_per_group * math.prod(extent) > MAX_KERNEL_ELEMENTS:
        raise Refused("the composed kernel would exceed "
                      f"{MAX_KERNEL_ELEMENTS} elements")
