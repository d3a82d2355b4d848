"""InstanceNorm from global average pooling, broadcast arithmetic and per-channel scale.

Why this form: Caffe-family toolchains have no reduction over H, W, but every one has
global average pooling. ``mean = gap(x)``, ``var = gap((x - mean)^2)`` and the statistics are
*broadcast* (``N x C x 1 x 1`` against the map) instead of upsampled back to H x W: measured
~2x native in onnxruntime against ~5x for the pool-and-upsample construction
(docs/benchmarks-decompose.md). ``(var + eps) ** -0.5`` is a single power op (Caffe
``Power``). Targets without broadcasting get it through the broadcast rule, and targets that
cap pooling windows (``limits.max_pool_window``, om: 32) get the global pooling split into
stages by the adaptive-pool rule; the decomposition pass applies both on its next round.

Accuracy: exact maths, fp32 error ~1e-7 of the output on ordinary inputs. For inputs whose
mean dwarfs their spread (|mean|/std ~ 1e3) the error grows like eps * |mean| / std, about
3x PyTorch's own kernel, which accumulates its statistics more carefully.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions.examples import A, aten_node, examples
from deployplug.decompositions.registry import needs, register_rule
from deployplug.decompositions.rules.conv3d import BatchNormAs2d
from deployplug.ops.attrs import in_shape
from deployplug.profiles import TargetProfile

_ATEN = torch.ops.aten
_MAP = torch.linspace(-2.0, 2.0, 2 * 2 * 3 * 4).reshape(2, 2, 3, 4)


def _channel_view(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().reshape(1, -1, 1, 1).clone()


class InstanceNormBroadcast(nn.Module):
    """Exact instance normalisation (input statistics) without any mean/var reduction."""

    #: registered buffers, declared for the type checker
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.register_buffer("weight", _channel_view(weight))
        self.register_buffer("bias", _channel_view(bias))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 3
        if flat:
            x = x.unsqueeze(3)
        mean = F.adaptive_avg_pool2d(x, 1)
        centred = x - mean
        var = F.adaptive_avg_pool2d(centred * centred, 1)
        scale = torch.pow(var + self.eps, -0.5)
        if self.weight is not None:
            scale = scale * self.weight
        y = centred * scale
        if self.bias is not None:
            y = y + self.bias
        return y.squeeze(3) if flat else y


def _input_stats(node: Node, graph: Graph, target: TargetProfile) -> bool:
    return bool(node.args.get("use_input_stats", True)) and len(in_shape(node, graph)) in (3, 4)


def _running_stats(node: Node, graph: Graph, target: TargetProfile) -> bool:
    a = node.args
    return (not a.get("use_input_stats", True)
            and isinstance(a.get("running_mean"), torch.Tensor)
            and isinstance(a.get("running_var"), torch.Tensor))


def _instance_norm(use_input_stats: bool):
    stats = (torch.zeros(2), torch.ones(2)) if not use_input_stats else (None, None)
    return lambda: aten_node(_ATEN.instance_norm.default, [_MAP], A(0), torch.ones(2),
                             torch.zeros(2), *stats, use_input_stats, 0.1, 1e-5, False)


@register_rule(name="instance_norm_broadcast", op="instance_norm",
               check=needs(_input_stats, "input statistics (use_input_stats) on a 3-D or 4-D "
                           "input"),
               priority=10,
               description="global average pooling + broadcast statistics + per-channel scale",
               examples=examples(_instance_norm(True)))
def build_instance_norm(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    a = node.args
    return InstanceNormBroadcast(a.get("weight"), a.get("bias"), a["eps"])


@register_rule(name="instance_norm_running_stats", op="instance_norm",
               check=needs(_running_stats, "use_input_stats=False with running statistics"),
               priority=10, description="running-statistics InstanceNorm as a BatchNorm",
               examples=examples(_instance_norm(False)))
def build_instance_norm_running(node: Node, graph: Graph, target: TargetProfile) -> nn.Module:
    a = node.args
    return BatchNormAs2d(a["running_mean"], a["running_var"], a.get("weight"), a.get("bias"),
                         a["eps"])
