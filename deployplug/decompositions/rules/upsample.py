"""Resize given by an output size (or a fractional scale) as integer-factor resizes.

* An output size that is an exact multiple of the input is the same resize as the integer
  scale factor, for nearest and bilinear (both align_corners settings): PyTorch derives the
  sampling positions from in/out, which equals 1/k.
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
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.registry import register_rule
from deployplug.decompositions.rules._common import in_shape

# Largest intermediate map (per channel) the nearest construction may create.
MAX_INTERMEDIATE = 1 << 22


def _sizes(node: Node, graph: Graph) -> tuple[tuple[int, int], tuple[int, int]]:
    shape = in_shape(node, graph)
    return (shape[2], shape[3]), (node.shape[2], node.shape[3])


def _integer_scales(node: Node) -> bool:
    scales = node.args.get("scale_factors")
    return scales is not None and all(float(s).is_integer() for s in scales)


def _multiple(node: Node, graph: Graph) -> bool:
    # A fractional scale whose output happens to be a multiple still samples at 1/scale,
    # not at in/out, so only an explicit output size qualifies.
    if len(in_shape(node, graph)) != 4 or node.args.get("output_size") is None:
        return False
    (ih, iw), (oh, ow) = _sizes(node, graph)
    return oh % ih == 0 and ow % iw == 0


class ResizeByFactor(nn.Module):
    """``interpolate(scale_factor=k)`` with the node's mode and align_corners."""

    def __init__(self, factors: tuple[int, int], mode: str, align_corners: bool | None):
        super().__init__()
        self.factors = tuple(float(f) for f in factors)
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factors, mode=self.mode,
                             align_corners=self.align_corners)


def _build_factor(node: Node, graph: Graph) -> nn.Module:
    (ih, iw), (oh, ow) = _sizes(node, graph)
    if node.op == "upsample_nearest2d":
        return ResizeByFactor((oh // ih, ow // iw), "nearest", None)
    return ResizeByFactor((oh // ih, ow // iw), "bilinear", bool(node.args["align_corners"]))


for _op in ("upsample_nearest2d", "upsample_bilinear2d"):
    register_rule(name=f"{_op}_size_to_factor", op=_op, predicate=_multiple, priority=10,
                  description="output size that is a multiple of the input -> integer factor",
                  requires="an output size that is an integer multiple of the input size")(
        _build_factor)


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

    def __init__(self, channels: int, repeat: tuple[int, int], step: tuple[int, int],
                 out_hw: tuple[int, int]):
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
               predicate=lambda node, graph: _plan(node, graph) is not None, priority=20,
               description="nearest to any size = integer upsample + strided identity conv",
               requires=(f"rows floor(i*in/out) reproducible with an intermediate map of at "
                         f"most {MAX_INTERMEDIATE} elements"))
def build_nearest(node: Node, graph: Graph) -> nn.Module:
    plan = _plan(node, graph)
    assert plan is not None
    return NearestResample(in_shape(node, graph)[1], *plan, node.shape[2:])
