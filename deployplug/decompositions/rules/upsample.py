"""Nearest resizing to any size (or by a fractional scale) as integer-factor operations.

An output size that is an exact multiple of the input is the integer-factor resize itself,
and every shipped writer reads the factor off the sizes, so no rule rewrites it.

* Nearest to any other size picks source row ``floor(i * in / out)``. With
  ``g = gcd(in, out)`` that is: repeat every row ``out/g`` times (an integer nearest
  upsample, Caffe's ones-kernel Deconvolution) and keep every ``in/g``-th row (a strided 1x1
  depthwise conv with weight 1, exact). The rows PyTorch really picks are computed at build
  time and compared, so float rounding in PyTorch's index maths can never slip through.
* Bilinear to a size that is not a multiple has no exact construction from fixed-factor
  ops; it stays refused and is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.ops.attrs import in_shape
from deployplug.profiles import TargetProfile

_ATEN = torch.ops.aten
_MAP = torch.linspace(-1.0, 1.0, 2 * 3 * 4).reshape(1, 2, 3, 4)

# Largest intermediate map (per channel) the nearest construction may create.
MAX_INTERMEDIATE = 1 << 22


def _sizes(node: Node, graph: Graph) -> tuple[tuple[int, int], tuple[int, int]]:
    shape = in_shape(node, graph)
    return (shape[2], shape[3]), (node.out_shape[2], node.out_shape[3])


def _integer_scales(node: Node) -> bool:
    scales = node.args.get("scale_factors")
    return scales is not None and all(float(s).is_integer() for s in scales)


def _resize(op: str, size: list[int] | None, scales: list[float] | None):
    if op == "upsample_nearest2d":
        return lambda: aten_node(_ATEN.upsample_nearest2d.vec, [_MAP], A(0), size, scales)
    return lambda: aten_node(_ATEN.upsample_bilinear2d.vec, [_MAP], A(0), size, False, scales)


def _torch_rows(node: Node, graph: Graph) -> tuple[list[int], list[int]]:
    """The source row/column indices PyTorch's nearest resize reads for this node."""
    (ih, iw), _ = _sizes(node, graph)
    rows = torch.arange(ih, dtype=torch.float32).view(1, 1, ih, 1).expand(1, 1, ih, iw)
    cols = torch.arange(iw, dtype=torch.float32).view(1, 1, 1, iw).expand(1, 1, ih, iw)
    size, scales = node.args.get("output_size"), node.args.get("scale_factors")
    pick_r = torch.ops.aten.upsample_nearest2d.vec(rows.contiguous(), size, scales)
    pick_c = torch.ops.aten.upsample_nearest2d.vec(cols.contiguous(), size, scales)
    return pick_r[0, 0, :, 0].long().tolist(), pick_c[0, 0, 0, :].long().tolist()


def _plan(node: Node, graph: Graph) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(repeat, step) per axis when they reproduce PyTorch's indices, else ``None``.

    Candidates per axis: in/out reduced by their gcd (sizes given), and the reciprocal of
    the scale factor as a small fraction (scales given: PyTorch then samples at 1/scale).
    """
    if len(in_shape(node, graph)) != 4 or _integer_scales(node):
        return None
    (ih, iw), (oh, ow) = _sizes(node, graph)
    scales = node.args.get("scale_factors") or [None, None]
    rows, cols = _torch_rows(node, graph)
    chosen = []
    for i, o, scale, picked in ((ih, oh, scales[0], rows), (iw, ow, scales[1], cols)):
        g = math.gcd(i, o)
        candidates = [(o // g, i // g)]
        if scale is not None:
            frac = Fraction(float(scale)).limit_denominator(64)
            candidates.append((frac.numerator, frac.denominator))
        for up, step in candidates:
            if picked == [r * step // up for r in range(o)]:
                chosen.append((up, step))
                break
        else:
            return None
    (uh, sh), (uw, sw) = chosen
    if ih * uh * iw * uw > MAX_INTERMEDIATE:
        return None
    return (uh, uw), (sh, sw)


class NearestResample(nn.Module):
    """Nearest resize to any size: integer upsample, then a strided identity 1x1 conv."""

    #: registered buffers, declared for the type checker
    pick: torch.Tensor

    def __init__(self, channels: int, repeat: tuple[int, int], step: tuple[int, int],
                 out_hw: Sequence[int]):
        super().__init__()
        self.repeat, self.step, self.channels = tuple(float(r) for r in repeat), step, channels
        self.out_hw = tuple(out_hw)
        self.register_buffer("pick", torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat != (1.0, 1.0):
            x = F.interpolate(x, scale_factor=self.repeat, mode="nearest")
        if self.step != (1, 1):
            x = F.conv2d(x, self.pick, None, self.step, 0, 1, self.channels)
        if tuple(x.shape[2:]) != self.out_hw:  # a scale's fraction can overshoot the size
            x = x[:, :, : self.out_hw[0], : self.out_hw[1]]
        return x


@register_rule(name="upsample_nearest2d_resample", op="upsample_nearest2d",
               check=needs(lambda node, graph, target: _plan(node, graph) is not None,
                           f"rows floor(i*in/out) reproducible with an intermediate map of at "
                           f"most {MAX_INTERMEDIATE} elements"),
               priority=20,
               description="nearest to any size = integer upsample + strided identity conv",
               examples=examples(_resize("upsample_nearest2d", [5, 6], None),
                                 _resize("upsample_nearest2d", None, [1.5, 1.5])))
def build_nearest(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    plan = _plan(node, graph)
    assert plan is not None
    return NearestResample(in_shape(node, graph)[1], *plan, node.out_shape[2:])
