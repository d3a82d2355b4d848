"""Conv3d as Conv2d over (channel, depth tap) pairs; BatchNorm on non-4-D maps as 2-D BatchNorm.

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
from deployplug.decompositions.registry import register_rule
from deployplug.decompositions.rules._common import in_shape, pair


class Conv3dAsConv2d(nn.Module):
    """Exact ``conv3d`` for a fixed input depth, computed with 2-D convolutions."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                 dilation, groups: int, depth: int):
        super().__init__()
        out_ch, cin_g, kd, kh, kw = weight.shape
        sd, self.sh, self.sw = pair(stride, 3)
        pd, self.ph, self.pw = pair(padding, 3)
        dd, self.dh, self.dw = pair(dilation, 3)
        self.groups = groups
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        out_depth = (depth + 2 * pd - dd * (kd - 1) - 1) // sd + 1
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


def _is_5d(node: Node, graph: Graph) -> bool:
    return len(in_shape(node, graph)) == 5


@register_rule(name="conv3d_as_conv2d", op="conv3d", predicate=_is_5d, priority=10,
               description="Conv2d per output depth over depth taps gathered into channels",
               requires="a batched 5-D input")
def build_conv3d(node: Node, graph: Graph) -> nn.Module:
    a = node.args
    return Conv3dAsConv2d(a["weight"], a.get("bias"), a["stride"], a["padding"], a["dilation"],
                          a["groups"], in_shape(node, graph)[2])


class BatchNormAs2d(nn.Module):
    """Eval-mode BatchNorm of any rank, run as a 4-D batch_norm on a reshaped view."""

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


def _bn_not_4d(node: Node, graph: Graph) -> bool:
    a = node.args
    return (len(in_shape(node, graph)) in (2, 3, 5)
            and isinstance(a.get("running_mean"), torch.Tensor)
            and isinstance(a.get("running_var"), torch.Tensor))


@register_rule(name="batch_norm_as_2d", op="batch_norm", predicate=_bn_not_4d, priority=10,
               description="BatchNorm1d/3d (eval) as a 4-D BatchNorm on a reshaped view",
               requires="eval-mode running statistics and a 2-, 3- or 5-D input")
def build_batch_norm(node: Node, graph: Graph) -> nn.Module:
    a = node.args
    return BatchNormAs2d(a["running_mean"], a["running_var"], a.get("weight"), a.get("bias"),
                         a["eps"])
