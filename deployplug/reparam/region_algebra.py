"""A region's ops composed into one :class:`~deployplug.reparam.affine_form.AffineForm`.

Walks the region's nodes in graph order and applies each op to the form of its input, starting
from the identity on the region's source. The spatial rank and the source's channel count
come from the ops themselves (convs, 2-D/3-D BatchNorms and pools, per-channel constants).
Convolution weights go into the algebra as they are stored (it only ever combines them with
float64 values and never writes to them); everything else is a float64 copy made once
(:class:`Float64`), which the numerical re-check reads too.
"""

from __future__ import annotations

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
    """float64 copies of parameters, made once per traced graph: the algebra and the re-check
    read the same tensors, and converting a large model twice would double the pass's cost.
    Also the inference-mode affine maps of all the graph's BatchNorms, computed together."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batch_norms: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] | None = None

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

    def batch_norm(self, op: LinearOp,
                   classified: Classified) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` in float64 of the BatchNorm ``op``. The first call computes
        them for every BatchNorm of the graph at once (a few tensor ops instead of a dozen
        per BatchNorm); each value is the same as :func:`bn_scale_shift` gives alone."""
        if self._batch_norms is None:
            self._batch_norms = _all_batch_norms(classified)
        found = self._batch_norms.get(op.node)
        if found is not None:
            return found
        a = op.attrs
        return bn_scale_shift(self(a["mean"]), self(a["var"]), a["eps"], self(a["weight"]),
                              self(a["bias"]))


def _all_batch_norms(classified: Classified
                     ) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]:
    """float64 ``(scale, shift)`` of every BatchNorm op in ``classified``, per device, with
    the arithmetic of :func:`bn_scale_shift` (``rsqrt(var + eps) * weight``, then
    ``-mean * scale + bias``), elementwise over all their channels at once."""
    groups: dict[torch.device, list[LinearOp]] = {}
    for op in classified.ops.values():
        if op.kind == "batch_norm":
            groups.setdefault(op.attrs["mean"].device, []).append(op)
    out: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    for device, ops in groups.items():
        sizes = [op.attrs["mean"].numel() for op in ops]

        def flat(name: str, default: float, ops: list[LinearOp] = ops,
                 device: torch.device = device, sizes: list[int] = sizes) -> torch.Tensor:
            # one concatenation in the stored dtypes, then one conversion to float64
            parts = [op.attrs[name] for op in ops]
            return torch.cat([torch.full((n,), default, dtype=torch.float64, device=device)
                              if p is None else p if p.dim() == 1 else p.reshape(-1)
                              for p, n in zip(parts, sizes)]).to(torch.float64)

        with torch.no_grad():
            eps = torch.tensor([float(op.attrs["eps"]) for op in ops], dtype=torch.float64,
                               device=device).repeat_interleave(
                                   torch.tensor(sizes, device=device))
            scale = torch.rsqrt(flat("var", 0.0) + eps) * flat("weight", 1.0)
            shift = -flat("mean", 0.0) * scale + flat("bias", 0.0)
        for op, s, b in zip(ops, scale.split(sizes), shift.split(sizes)):
            out[op.node] = (s, b)
    return out


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
            forms[op.node] = _apply(op, x, forms, dims, f64, classified, dilations, rtol)
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
           f64: Float64, classified: Classified, dilations: set[int],
           rtol: float) -> AffineForm:
    a = op.attrs
    if op.kind == "identity":
        return x
    if op.kind == "add":
        alpha, beta = a["coefficients"]
        return x.combined(forms[op.inputs[1]], alpha, beta)
    if op.kind == "batch_norm":
        return x.affine(*f64.batch_norm(op, classified))
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
            if module._forward_pre_hooks or "parametrizations" in module._modules:
                bake(module)  # a norm-parametrized weight becomes the plain weight it computes
            weight, bias = module.weight.detach(), f64(module.bias)
        else:
            weight, bias = a["weight"], f64(a["bias"])
        if not weight.is_floating_point():
            raise Refused(f"its weight is {weight.dtype}, not a real floating-point dtype")
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
