"""Padding a target cannot express: asymmetric/negative spatial pads, pads along channels.

* Asymmetric (or negative) H/W padding = symmetric padding by the larger amount, then a crop.
  This is exact for every mode, because each pad mode defines a padded position by its
  distance from the edge alone (constant: the value; reflect/replicate/circular: a fixed
  source pixel), so padding more and cutting the surplus leaves the same pixels. Reflect
  needs the larger amount to stay below the axis length.
* Padding channels with a constant: the new channels come from a 1x1 conv with zero weights
  and the pad value as bias (a constant map with no constant tensor input, which Caffe
  cannot hold), concatenated with the input. Caveat: a NaN/inf input pixel would turn
  ``0 * x`` into NaN in those channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.ops.attrs import in_shape, pad_spec
from deployplug.profiles import TargetProfile

_ATEN = torch.ops.aten
_MAP = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(1, 2, 5, 6)


class SymmetricPadCrop(nn.Module):
    """Exact H/W padding from a symmetric pad and a crop."""

    def __init__(self, pads: list[int], mode: str, value: float, out_hw: Sequence[int]):
        super().__init__()
        left, right, top, bottom = (pads + [0, 0, 0, 0])[:4]
        self.sym_w, self.sym_h = max(left, right, 0), max(top, bottom, 0)
        self.start = (self.sym_h - top, self.sym_w - left)
        self.out_hw, self.mode, self.value = tuple(out_hw), mode, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sym_w or self.sym_h:
            pads = (self.sym_w, self.sym_w, self.sym_h, self.sym_h)
            if self.mode == "constant":
                x = F.pad(x, pads, value=self.value)
            else:
                x = F.pad(x, pads, mode=self.mode)
        (sh, sw), (oh, ow) = self.start, self.out_hw
        if (sh, sw) == (0, 0) and tuple(x.shape[2:]) == (oh, ow):
            return x
        return x[:, :, sh:sh + oh, sw:sw + ow]


def _spatial_only(node: Node, graph: Graph, target: TargetProfile) -> bool:
    spec = pad_spec(node, graph)
    if spec.rank != 4 or not spec.only_last(2):
        return False
    left, right, top, bottom = spec.spatial
    asymmetric = left != right or top != bottom or min(spec.spatial) < 0
    if not asymmetric:
        return False
    if spec.mode == "reflect":
        h, w = in_shape(node, graph)[2:]
        return max(left, right) < w and max(top, bottom) < h
    return True


def _build_spatial(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    spec = pad_spec(node, graph)
    return SymmetricPadCrop(list(spec.spatial), spec.mode, spec.value, node.out_shape[2:])


class ChannelPad(nn.Module):
    """Constant channel padding (or cropping) by concatenation, then any H/W padding."""

    #: registered buffers, declared for the type checker
    before_w: torch.Tensor
    before_b: torch.Tensor
    after_w: torch.Tensor
    after_b: torch.Tensor

    def __init__(self, channels: int, before: int, after: int, value: float, spatial: list[int]):
        super().__init__()
        self.before, self.after, self.channels = before, after, channels
        self.spatial, self.value = spatial, value
        for name, count in (("before", before), ("after", after)):
            if count > 0:
                self.register_buffer(f"{name}_w", torch.zeros(count, channels, 1, 1))
                self.register_buffer(f"{name}_b", torch.full((count,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = max(-self.before, 0), self.channels - max(-self.after, 0)
        core = x if (lo, hi) == (0, self.channels) else x[:, lo:hi]
        parts = []
        if self.before > 0:
            parts.append(F.conv2d(x, self.before_w, self.before_b))
        parts.append(core)
        if self.after > 0:
            parts.append(F.conv2d(x, self.after_w, self.after_b))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if any(self.spatial):
            y = F.pad(y, self.spatial, value=self.value)
        return y


def _channel_pad(node: Node, graph: Graph, target: TargetProfile) -> bool:
    spec = pad_spec(node, graph)
    return (spec.rank == 4 and spec.mode == "constant" and any(spec.axis(1))
            and not any(spec.axis(0)))


def _build_channel(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    spec = pad_spec(node, graph)
    before, after = spec.axis(1)
    return ChannelPad(in_shape(node, graph)[1], before, after, spec.value, list(spec.spatial))


def _examples(op: str, pads: list[int]):
    if op == "pad":
        return lambda: aten_node(_ATEN.pad.default, [_MAP], A(0), pads, "constant", 0.5)
    return lambda: aten_node(_ATEN.constant_pad_nd.default, [_MAP], A(0), pads, 0.5)


for _op in ("pad", "constant_pad_nd"):
    register_rule(name=f"{_op}_symmetric_crop", op=_op,
                  check=needs(_spatial_only, "a 4-D input padded on H/W only, asymmetrically "
                              "(reflect: pads smaller than the axis)"),
                  priority=10, description="asymmetric/negative H/W pad as symmetric pad + crop",
                  examples=examples(_examples(_op, [1, 2, 0, 1]),
                                    _examples(_op, [-1, 0, 1, 1])))(_build_spatial)
    register_rule(name=f"{_op}_channels_concat", op=_op,
                  check=needs(_channel_pad, "a 4-D input, constant mode, padding along "
                              "channels only (not batch)"),
                  priority=10, description="constant channel pad as zero-weight 1x1 conv + concat",
                  examples=examples(_examples(_op, [0, 0, 0, 0, 1, 2])))(_build_channel)
