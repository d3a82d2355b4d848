"""The belt and braces: a composed conv is run against the region's own modules in float64.

The region's modules run with float64 copies of their tensors through
``torch.func.functional_call`` (their own ``forward``, not the algebra's reading of it), the
functional ops on float64 values, all on one small random input whose size gives windows at
both borders and every tap on real input. A difference above the tolerance refuses the region.
"""

from __future__ import annotations

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


def numerical_check(region: Region, classified: Classified, root: nn.Module,
                     spec: ConvSpec, f64: Float64, tolerance: float) -> float:
    """Normalized float64 error of the conv against the region's own ops on a random input;
    :class:`Refused` above ``tolerance`` (:data:`CHECK_TOLERANCE`, or the model dtype's
    rounding when constants were computed in it)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, spec.in_channels, *_check_size(spec), generator=gen,
                    dtype=torch.float64).to(spec.weight.device)
    with torch.no_grad():
        values: dict[fx.Node, Any] = {region.source: x}
        try:
            for node in region.nodes:
                values[node] = _run_node(node, values, classified, root, f64)
            expected = values[region.sink]
            got = _conv_forward(spec, x)
        except Exception as exc:  # noqa: BLE001 - the region does not run as analysed
            raise Refused(f"the float64 re-check could not run it ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None
    if got.shape != expected.shape:
        raise Refused(f"the float64 re-check gives shape {tuple(got.shape)} instead of "
                      f"{tuple(expected.shape)}")
    scale = max(float(expected.abs().max()), 1e-300)
    error = float((got - expected).abs().max()) / scale
    if not error <= tolerance:
        raise Refused(f"the float64 re-check differs by {error:.3g} (normalized), so the "
                      "composition is not trusted")
    return error


def _run_node(node: fx.Node, values: dict[fx.Node, Any], classified: Classified,
              root: nn.Module, f64: Float64) -> Any:
    def arg(n: fx.Node) -> Any:
        return values[n] if n in values else classified.constants[n]

    args = fx.node.map_arg(node.args, arg)
    kwargs = fx.node.map_arg(node.kwargs, arg)
    if node.op == "call_module":
        module = fetch_attr(root, str(node.target))
        tensors = {name: f64(t) for name, t in (*module.named_parameters(),
                                                *module.named_buffers())}
        return torch.func.functional_call(module, tensors, tuple(args), kwargs)
    target = node.target
    if node.op == "call_method":
        assert isinstance(target, str), "fx names a called method by its name"
        return getattr(args[0], target)(*args[1:], **kwargs)
    assert callable(target), "fx holds a called function as the function itself"
    return target(*args, **kwargs)


def _conv_forward(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spec.stride) - 1]
    padding: Any = spec.padding
    if spec.padding_mode != "zeros":
        pads = [p for p in reversed(spec.padding) for _ in range(2)]
        x = F.pad(x, pads, mode=spec.padding_mode)
        padding = 0
    return conv(x, spec.weight, spec.bias, spec.stride, padding, spec.dilation, spec.groups)
