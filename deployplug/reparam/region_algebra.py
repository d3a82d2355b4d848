"""A region's ops composed into one :class:`~deployplug.reparam.affine_form.AffineForm`.

Walks the region's nodes in graph order and applies each op to the form of its input, starting
from the identity on the region's source. The spatial rank and the source's channel count
come from the ops themselves (convs, 2-D/3-D BatchNorms and pools, per-channel constants);
values are float64 copies of the parameters, made once (:class:`Float64`) so the numerical
re-check reads the same tensors.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from deployplug.reparam.affine_form import AffineForm, Refused
from deployplug.reparam.fusion import average_kernel, bn_scale_shift
from deployplug.reparam.linear_ops import Classified, LinearOp, channel_dim_hint
from deployplug.reparam.linear_regions import Region
from deployplug.reparam.parametrized import bake


class Float64:
    """float64 copies of parameters, made once per owner: the algebra and the re-check read
    the same tensors, and converting a large model twice would double the pass's cost."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dtype == torch.float64:
            return value.detach() if isinstance(value, torch.Tensor) else value
        if not value.is_floating_point():
            return value
        hit = self._copies.get(id(value))
        if hit is None or hit[0] is not value:
            hit = (value, value.detach().to(torch.float64))
            self._copies[id(value)] = hit
        return hit[1]


def compose(region: Region, classified: Classified, f64: Float64,
             rtol: float) -> tuple[AffineForm, tuple[int, ...]]:
    """The region's sink as one :class:`AffineForm` of its source, built op by op."""
    ops = [classified.ops[n] for n in region.nodes]
    dims = _spatial_rank(ops)
    channels = _source_channels(region, ops)
    device = _region_device(ops)
    forms = {region.source: AffineForm.identity(channels, dims, device)}
    dilations: set[int] = set()
    for op in ops:
        x = forms[op.inputs[0]]
        try:
            forms[op.node] = _apply(op, x, forms, dims, f64, dilations, rtol)
        except Refused as why:
            raise Refused(f"at '{_where(op)}': {why}") from None
    return forms[region.sink], tuple(sorted(dilations))


def _region_device(ops: list[LinearOp]) -> torch.device | None:
    """Where the region's tensors live: the algebra runs there (in float64)."""
    for op in ops:
        for value in (op.attrs.get("module"), *op.attrs.values()):
            if isinstance(value, nn.Module):
                value = next(iter(value.parameters()), None)
            if isinstance(value, torch.Tensor):
                return value.device
    return None


def _where(op: LinearOp) -> str:
    return op.module or op.node.name


def _spatial_rank(ops: list[LinearOp]) -> int:
    ranks = {op.dims for op in ops if op.dims is not None}
    if len(ranks) > 1:
        raise Refused(f"its ops disagree on the number of spatial dims ({sorted(ranks)}); a "
                      "constant probably broadcasts over a spatial dim")
    if not ranks:
        raise Refused("no op in it fixes the number of spatial dims (no convolution, "
                      "pooling or 2-D/3-D BatchNorm)")
    return ranks.pop()


def _source_channels(region: Region, ops: list[LinearOp]) -> int:
    """Channel count of the source, from the counts the ops fix: union-find over 'same
    channels' edges (every op but a conv keeps the count of its input)."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(a: fx.Node) -> fx.Node:
        parent.setdefault(a, a)
        while parent[a] is not a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    known: list[tuple[fx.Node, int]] = []
    for op in ops:
        if op.kind == "conv":
            known += [(op.inputs[0], op.channels["in"]), (op.node, op.channels["out"])]
            continue
        for i in op.inputs:
            parent[find(i)] = find(op.node)
        if "in" in op.channels:
            known.append((op.node, op.channels["in"]))
    merged: dict[fx.Node, int] = {}
    for key, value in known:
        if merged.setdefault(find(key), value) != value:
            raise Refused(f"channel counts disagree ({merged[find(key)]} vs {value})")
    channels = merged.get(find(region.source))
    if channels is None:
        raise Refused("the number of input channels cannot be told from its ops")
    return channels


def _apply(op: LinearOp, x: AffineForm, forms: dict[fx.Node, AffineForm], dims: int,
           f64: Float64, dilations: set[int], rtol: float) -> AffineForm:
    a = op.attrs
    if op.kind == "identity":
        return replace(x, owned=False)
    if op.kind == "add":
        alpha, beta = a["coefficients"]
        first, second = op.inputs
        reuse = first is not second and len(first.users) == 1 and len(second.users) == 1
        return x.combined(forms[second], alpha, beta, reuse)
    if op.kind == "batch_norm":
        scale, shift = bn_scale_shift(f64(a["mean"]), f64(a["var"]), a["eps"],
                                      f64(a["weight"]), f64(a["bias"]))
        return x.affine(scale, shift)
    if op.kind == "affine":
        for value in (a["scale"], a["shift"]):
            _per_channel(value, dims)
        return x.affine(f64(a["scale"]), f64(a["shift"]))
    if op.kind == "pad":
        n = a["padded_dims"]
        if n > dims:
            raise Refused("it pads the channel or batch dim")
        lead = (0,) * (dims - n)
        if a["mode"] == "zeros":
            return x.padded(lead + a["before"], lead + a["after"], a["value"], rtol=rtol)
        return x.padded(lead + a["before"], lead + a["after"], mode=a["mode"])
    if op.kind == "avg_pool":
        p = a["padding"]
        x = x.padded(p, p, rtol=rtol)
        kernel = average_kernel(x.out_channels, a["kernel"], a["divisor"],
                                device=x.kernel.device)
        return x.conv(kernel, None, a["stride"], (1,) * dims, x.out_channels)
    if op.kind == "conv":
        module = a.get("module")
        if module is not None:
            bake(module)
            weight, bias = f64(module.weight), f64(module.bias)
        else:
            weight, bias = f64(a["weight"]), f64(a["bias"])
        dilations.update(a["dilation"])
        if a["padding_mode"] == "zeros":
            x = x.padded(a["before"], a["after"], rtol=rtol)
        else:
            x = x.padded(a["before"], a["after"], mode=a["padding_mode"])
        return x.conv(weight, bias, a["stride"], a["dilation"], a["groups"])
    raise Refused(f"unknown op kind {op.kind}")


def _per_channel(value: Any, dims: int) -> None:
    if value is None or not isinstance(value, torch.Tensor):
        return
    if value.dim() > dims + 2:
        raise Refused(f"a constant of shape {tuple(value.shape)} would raise the tensor rank")
    hint = channel_dim_hint(value)
    if hint is None or (hint[0] is not None and hint[0] != dims):
        raise Refused(f"a constant of shape {tuple(value.shape)} is not per channel")
