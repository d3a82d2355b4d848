"""ConvTranspose2d with output_padding as a transposed conv without it, plus a crop.

Why it is exact: ``output_padding`` only lengthens the output at the bottom/right; the extra
rows are ordinary transposed-conv outputs (or bias alone, past the end of the full result).
Lowering the conv padding from ``p`` to ``p - op`` and cropping ``op`` rows off the top/left
yields exactly those rows. When ``op > p`` the missing rows lie past the full result, so they
come from a symmetric zero pad and the bias is added afterwards. Caffe's Deconvolution has
no output_padding; symmetric pads and crops it has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.ops.attrs import in_shape, pair
from deployplug.profiles import TargetProfile

_ATEN = torch.ops.aten


class ConvTransposeCropped(nn.Module):
    """Exact ``conv_transpose2d`` with output_padding, built without it."""

    #: registered buffers, declared for the type checker
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight, bias, stride, padding, output_padding, groups, dilation,
                 out_hw: Sequence[int]):
        super().__init__()
        p = pair(padding, name="padding")
        op = pair(output_padding, name="output_padding")
        self.stride = pair(stride, name="stride")
        self.dilation, self.groups = pair(dilation, name="dilation"), groups
        self.conv_padding = tuple(max(pi - oi, 0) for pi, oi in zip(p, op))
        self.extra = tuple(max(oi - pi, 0) for pi, oi in zip(p, op))
        self.start = tuple(op)
        self.out_hw = tuple(out_hw)
        self.register_buffer("weight", weight.detach().clone())
        bias_t = None if bias is None else bias.detach().clone()
        self.bias_late = any(self.extra) and bias_t is not None
        if self.bias_late and bias_t is not None:
            bias_t = bias_t.reshape(1, -1, 1, 1)
        self.register_buffer("bias", bias_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.weight, None if self.bias_late else self.bias,
                               self.stride, self.conv_padding, 0, self.groups, self.dilation)
        if any(self.extra):
            eh, ew = self.extra
            y = F.pad(y, (ew, ew, eh, eh))
        (sh, sw), (oh, ow) = self.start, self.out_hw
        y = y[:, :, sh:sh + oh, sw:sw + ow]
        if self.bias_late and self.bias is not None:
            y = y + self.bias
        return y


def _has_output_padding(node: Node, graph: Graph, target: TargetProfile) -> bool:
    return (any(pair(node.args.get("output_padding", 0), name="output_padding"))
            and len(in_shape(node, graph)) == 4)


@register_rule(name="conv_transpose2d_crop", op="conv_transpose2d",
               check=needs(_has_output_padding, "a 4-D input and a non-zero output_padding"),
               priority=10,
               description="transposed conv without output_padding + exact crop/pad",
               examples=examples(lambda: aten_node(
                   _ATEN.conv_transpose2d.input, [torch.ones(1, 2, 3, 4)], A(0),
                   torch.ones(2, 3, 3, 3), None, [2, 2], [1, 1], [1, 1])))
def build_conv_transpose(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    a = node.args
    return ConvTransposeCropped(a["weight"], a.get("bias"), a["stride"], a["padding"],
                                a["output_padding"], a["groups"], a["dilation"],
                                node.out_shape[2:])
