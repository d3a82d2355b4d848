"""The belt and braces: a composed conv is run against the region's own modules in float64.

The region's modules run their own ``forward`` on float64 copies of their tensors (a shallow
copy of each module holding float64 tensors, so the model's modules are never touched), the
functional ops on float64 values, all on one small random input whose size gives windows at
both borders and every tap on real input. Two things are compared with that result:

* the composed conv in float64 (the algebra): above the tolerance, the region is refused;
* the conv module actually built, its weights in the model's dtype read back as float64 (the
  writing of the sum and the module's settings): it must agree with the float64 values to
  within the rounding of that dtype, element by element, or the region is refused.

**Once per structure.** The algebra is a fixed sequence of arithmetic for a given
:func:`structure_key`: every branch it takes depends on the ops, their settings, the
parameters' dtypes, which sizes are 1 and which sizes are equal, and the resulting conv's
settings, never on parameter values (see :mod:`deployplug.reparam.affine_form`). A structure
whose check passed once is therefore not re-run for every further region of that structure
(the identical blocks of a RepVGG stage are checked once, whatever their width); a structure
whose check failed is checked again region by region, and nothing is kept from one pass to
the next. Running each region's full-width convolutions in float64 costs more than composing
them, on big models many times over.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from deployplug.reparam.affine_form import ConvSpec, Refused
from deployplug.reparam.linear_ops import Classified, fetch_attr
from deployplug.reparam.linear_regions import Region
from deployplug.reparam.region_algebra import Float64

CHECK_TOLERANCE = 1e-10
# Op settings that enter the algebra only as values (multiplied, never branched on).
_VALUE_ONLY = frozenset({"eps"})
# Op settings that are sizes: only which of them are 1 or equal to another size matters.
_SIZES = frozenset({"groups"})


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _check_size(spec: ConvSpec) -> list[int]:
    """Smallest input size per dim with two output positions: one window starts at the left
    border and one ends at the right, and between them every tap reads real input at least
    once, so a wrong border (bias under padding) or a misaligned branch cannot hide. Small,
    because the region's own convolutions run on it in float64."""
    sizes = []
    for k, s, p, d in zip(spec.weight.shape[2:], spec.stride, spec.padding, spec.dilation):
        span = d * (k - 1) + 1
        size = max(1, span - 2 * p) + s
        if spec.padding_mode != "zeros":  # reflection needs more input than it pads
            size = max(size, 2 * p + 1)
        sizes.append(size)
    return sizes


# ----------------------------------------------------------------------------- structure

class _Sizes:
    """Sizes as a key sees them: 0 and 1 as themselves (the algebra branches on them), any
    other size as the order in which it first appeared, so equal sizes stay equal."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def __call__(self, n: int) -> Hashable:
        return n if n <= 1 else -1 - self.seen.setdefault(n, len(self.seen))


def _tensor_key(t: torch.Tensor) -> Hashable:
    # Leading (channel) dims only as "1 or not": a tensor's channel count is the op's, which
    # the key holds as a pattern (or it is refused); kernel taps (dims 2+) exactly.
    shape = t.shape
    return (t.dtype, t.device, len(shape), shape[0] == 1 if shape else None,
            shape[1] == 1 if len(shape) > 1 else None, tuple(shape[2:]))


def _value_key(value: Any) -> Hashable:
    kind = type(value)
    if kind in _EXACT:
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if kind is tuple or kind is list:
        return tuple(_value_key(v) for v in value)
    if isinstance(value, nn.Module):
        return (kind, *((name, None if t is None else _tensor_key(t))
                        for name, t in (*value._parameters.items(), *value._buffers.items())))
    return ("object", id(value))  # unknown: never shared with another region


_EXACT = frozenset({bool, int, float, str, type(None)})


def structure_key(region: Region, classified: Classified, root: nn.Module, spec: ConvSpec,
                  dtype: torch.dtype) -> Hashable:
    """What the algebra's arithmetic depends on for this region (see the module doc): per
    node, the op, which region values it reads and its settings; then the conv it became,
    written in ``dtype``."""
    sizes = _Sizes()
    index = {region.source: 0}
    parts: list[Hashable] = [dtype]
    for i, node in enumerate(region.nodes, 1):
        index[node] = i
        op = classified.ops[node]
        target: Any
        if node.op == "call_module":
            target = type(fetch_attr(root, str(node.target)))
        elif node.op == "call_function":
            target = node.target if isinstance(node.target, Hashable) else id(node.target)
        else:
            target = str(node.target)
        # classify fills attrs and channels in a fixed order per kind of op
        attrs = tuple((k, sizes(v) if k in _SIZES else _value_key(v))
                      for k, v in op.attrs.items() if k not in _VALUE_ONLY)
        channels = tuple((k, sizes(v)) for k, v in op.channels.items())
        parts.append((op.kind, node.op, target, tuple(index[n] for n in op.inputs), op.dims,
                      channels, attrs))
    w = spec.weight
    parts.append(("conv", sizes(w.shape[0]), sizes(w.shape[1]), w.shape[2:],
                  sizes(spec.groups), spec.stride, spec.padding, spec.dilation,
                  spec.padding_mode, tuple((sizes(t.groups), t.start, t.row is None)
                                           for t in w.terms)))
    return tuple(parts)


# ----------------------------------------------------------------------------- the check

def exact_check(region: Region, classified: Classified, root: nn.Module, spec: ConvSpec,
                conv: nn.Module, f64: Float64, tolerance: float) -> float:
    """Normalized float64 error of the built ``conv`` against the region's own ops on a
    random input; :class:`Refused` when the composed conv is off by more than ``tolerance``
    (:data:`CHECK_TOLERANCE`, or the model dtype's rounding when constants were computed in
    it) or the built conv's weights are not the composed values rounded to their dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, spec.in_channels, *_check_size(spec), generator=gen,
                    dtype=torch.float64).to(spec.bias.device)
    with torch.no_grad():
        values: dict[fx.Node, Any] = {region.source: x}
        try:
            for node in region.nodes:
                values[node] = _run_node(node, values, classified, root, f64)
            expected = values[region.sink]
            kernel = spec.weight.dense()
            composed = _conv_forward(spec, kernel, spec.bias, x)
            built = _as_float64(conv, f64)(x)
            magnitude = _conv_forward(spec, kernel.abs(), spec.bias.abs(), x.abs())
        except Exception as exc:  # noqa: BLE001 - the region does not run as analysed
            raise Refused(f"the float64 re-check could not run it ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None
    if not isinstance(expected, torch.Tensor) or composed.shape != expected.shape:
        shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else expected
        raise Refused(f"the float64 re-check gives shape {tuple(composed.shape)} instead of "
                      f"{shape}")
    scale = max(float(expected.abs().max()), 1e-300)
    error = float((composed - expected).abs().max()) / scale
    if not error <= tolerance:
        raise Refused(f"the float64 re-check differs by {error:.3g} (normalized), so the "
                      "composition is not trusted")
    # |round(w) - w| <= u |w| per weight, so the written conv may differ from the float64 one
    # by u * (|K| conv |x| + |b|) per output, plus float64 summation error on both sides.
    dtype = conv.weight.dtype if isinstance(conv.weight, torch.Tensor) else torch.float64
    terms = math.prod(spec.weight.shape[1:]) + 1
    unit = torch.finfo(dtype).eps / 2 + 2 * terms * torch.finfo(torch.float64).eps
    if built.shape != composed.shape or not bool(
            ((built - composed).abs() <= unit * magnitude + 1e-300).all()):
        raise Refused(f"the conv written in {dtype} does not hold the composed float64 values "
                      "rounded to its dtype, so the collapse is not trusted")
    return float((built - expected).abs().max()) / scale


def _as_float64(module: nn.Module, f64: Float64) -> nn.Module:
    """A shallow copy of ``module`` whose parameters and buffers are float64 copies: its own
    ``forward`` runs in float64 while the module itself (perhaps the user's) is left alone."""
    clone = copy.copy(module)
    clone.__dict__["_parameters"] = {k: f64(v) for k, v in module._parameters.items()}
    clone.__dict__["_buffers"] = {k: f64(v) for k, v in module._buffers.items()}
    return clone


def _run_node(node: fx.Node, values: dict[fx.Node, Any], classified: Classified,
              root: nn.Module, f64: Float64) -> Any:
    def arg(n: fx.Node) -> Any:
        return values[n] if n in values else classified.constants[n]

    args = fx.node.map_arg(node.args, arg)
    kwargs = fx.node.map_arg(node.kwargs, arg)
    if node.op == "call_module":
        module = _as_float64(fetch_attr(root, str(node.target)), f64)
        return module(*args, **kwargs)
    target = node.target
    if node.op == "call_method":
        assert isinstance(target, str), "fx names a called method by its name"
        return getattr(args[0], target)(*args[1:], **kwargs)
    assert callable(target), "fx holds a called function as the function itself"
    return target(*args, **kwargs)


def _conv_forward(spec: ConvSpec, kernel: torch.Tensor, bias: torch.Tensor,
                  x: torch.Tensor) -> torch.Tensor:
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spec.stride) - 1]
    padding: Any = spec.padding
    if spec.padding_mode != "zeros":
        pads = [p for p in reversed(spec.padding) for _ in range(2)]
        x = F.pad(x, pads, mode=spec.padding_mode)
        padding = 0
    return conv(x, kernel, bias, spec.stride, padding, spec.dilation, spec.groups)
