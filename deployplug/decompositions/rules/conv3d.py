"""Conv3d as Conv2d over (channel, depth tap) pairs.

Why this form: a 3-D convolution is, for each output depth, a 2-D convolution whose input
channels are the (channel, depth tap) pairs it reads. A contiguous depth slice
``(N, C, kd, H, W)`` reshaped to ``(N, C * kd, H, W)`` orders channels as ``c * kd + t``,
which is exactly the weight reshaped to ``(O, C/g * kd, kh, kw)`` and keeps each group's
channels contiguous, so ``groups`` carries over unchanged. All output depths share that one
weight; only depths whose taps reach into the depth padding get a smaller weight over their
valid taps (so no zeros are ever materialised).

One conv per output depth, not one batched conv: batching the depths onto the batch axis
needs a 6-D permute, which Caffe has no layer for. The per-depth form uses only step-1
slices, reshapes, 2-D convs, unsqueeze and one concat, all of which Caffe, om and MsnhNet
lower; in onnxruntime it measured no slower than the native 3-D Conv
(docs/benchmarks-decompose.md). Building it from one Conv2d per (input, output) channel pair
instead costs ~12x native.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.ops.attrs import in_shape, pair
from deployplug.ops.sizes import conv_out
from deployplug.profiles import TargetProfile

_ATEN = torch.ops.aten
_VOLUME = torch.linspace(-1.0, 1.0, 2 * 3 * 4 * 4).reshape(1, 2, 3, 4, 4)


class Conv3dAsConv2d(nn.Module):
    """Exact ``conv3d`` for a fixed input depth, computed with 2-D convolutions."""

    #: registered buffers, declared for the type checker
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                 dilation, groups: int, depth: int):
        super().__init__()
        out_ch, cin_g, kd, kh, kw = weight.shape
        sd, self.sh, self.sw = pair(stride, 3, name="conv3d stride")
        pd, self.ph, self.pw = pair(padding, 3, name="conv3d padding")
        dd, self.dh, self.dw = pair(dilation, 3, name="conv3d dilation")
        self.groups = groups
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        out_depth = conv_out(depth, kd, sd, pd, d=dd)
        # Per output depth: the input depths it reads and the weight buffer for those taps.
        self.plan: list[tuple[tuple[int, ...], str]] = []
        weights: dict[tuple[int, ...], str] = {}
        for o in range(out_depth):
            taps = tuple(t for t in range(kd) if 0 <= o * sd + t * dd - pd < depth)
            if taps not in weights:
                name = f"weight_{len(weights)}"
                w = (weight.detach()[:, :, list(taps)] if taps
                     else torch.zeros_like(weight[:, :, :1]))  # padding only: bias remains
                self.register_buffer(name, w.reshape(out_ch, -1, kh, kw).clone())
                weights[taps] = name
            depths = tuple(o * sd + t * dd - pd for t in taps) or (0,)
            self.plan.append((depths, weights[taps]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, depth, h, w = x.shape
        outs = []
        for depths, weight in self.plan:
            first, last = depths[0], depths[-1]
            if depths == tuple(range(first, last + 1)):
                taps = x if (first, last + 1) == (0, depth) else x[:, :, first:last + 1]
            else:  # dilated taps: one slice each
                taps = torch.cat([x[:, :, d:d + 1] for d in depths], dim=2)
            y = F.conv2d(taps.reshape(n, c * len(depths), h, w), getattr(self, weight),
                         self.bias, (self.sh, self.sw), (self.ph, self.pw),
                         (self.dh, self.dw), self.groups)
            outs.append(y.unsqueeze(2))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _is_5d(node: Node, graph: Graph, target: TargetProfile) -> bool:
    return len(in_shape(node, graph)) == 5 and not isinstance(node.args.get("padding", 0), str)


@register_rule(name="conv3d_as_conv2d", op="conv3d",
               check=needs(_is_5d, "a batched 5-D input and numeric padding"), priority=10,
               description="Conv2d per output depth over depth taps gathered into channels",
               examples=examples(lambda: aten_node(
                   _ATEN.conv3d.default, [_VOLUME], A(0), torch.ones(3, 2, 2, 3, 3))))
def build_conv3d(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    a = node.args
    return Conv3dAsConv2d(a["weight"], a.get("bias"), a["stride"], a["padding"], a["dilation"],
                          a["groups"], in_shape(node, graph)[2])


class BatchNormAs2d(nn.Module):
    """Eval-mode BatchNorm of any rank, run as a 4-D batch_norm on a reshaped view."""

    #: registered buffers, declared for the type checker
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, mean, var, weight, bias, eps: float):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("var", var.detach().clone())
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(shape[0], shape[1], shape[2] if x.dim() > 2 else 1, -1)
        y = F.batch_norm(flat, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)
        return y.reshape(shape)
