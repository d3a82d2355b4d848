"""Cross-layer weight equalization for conv -> ReLU -> conv chains, exact in fp32.

ReLU is positively homogeneous: ``relu(x / s) = relu(x) / s`` for ``s > 0``. So output channel
``c`` of the first layer (its weights and bias) can be divided by ``s_c`` and input channel
``c`` of the second multiplied by it without changing what the pair computes. Choosing
``s_c = sqrt(r1_c / r2_c)``, where ``r1_c`` is the range of the first layer's channel and
``r2_c`` the range of the second layer's input column, gives both the same range
``sqrt(r1_c * r2_c)``: a channel that a BatchNorm blew up in one layer (an identity branch
scaled by 10) is shared with the next, and per-tensor int8 no longer has to span it alone.
Chains are visited repeatedly, since a middle layer is the second of one pair and the first
of the next, until the scales settle.

Only pairs that are provably safe are touched: found by ``torch.fx`` in the forward, each
layer called once, the first layer's output read only by the activation and the activation's
output only by the second layer. The equalized copy is checked against the original on real
inputs and refused above the tolerance.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deployplug.errors import ExportFailedError
from deployplug.numerics import normalized_error

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Layer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear
#: positively homogeneous activations: f(x / s) = f(x) / s for every s > 0
HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU)
HOMOGENEOUS_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu)
#: scales are kept within [1 / MAX_SCALE, MAX_SCALE] so no weight under- or overflows
MAX_SCALE = 2.0 ** 16


def output_ranges(weight: torch.Tensor) -> torch.Tensor:
    """Range of each output channel (dim 0) of a conv or linear weight."""
    return weight.detach().abs().flatten(1).amax(1)


def input_ranges(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Range of each *input* channel of a (possibly grouped) conv or linear weight.

    Weight ``(out, in / groups, *k)``: input channel ``c`` is column ``c % (in / groups)`` of
    the rows of group ``c // (in / groups)``.
    """
    out, per_group = weight.shape[:2]
    w = weight.detach().abs().reshape(groups, out // groups, per_group, -1)
    return w.amax(dim=(1, 3)).reshape(-1)


def equalization_scales(first: torch.Tensor, second: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-channel ``s`` making both ranges ``sqrt(r1 * r2)``; 1 where a range is zero."""
    r1 = output_ranges(first).double()
    r2 = input_ranges(second, groups).double()
    if r1.shape != r2.shape:
        raise ValueError(f"channel counts differ: {r1.numel()} outputs vs {r2.numel()} inputs")
    live = (r1 > 0) & (r2 > 0)
    scale = torch.where(live, torch.sqrt(r1 / torch.where(live, r2, torch.ones_like(r2))),
                        torch.ones_like(r1))
    return scale.clamp(1.0 / MAX_SCALE, MAX_SCALE)


def apply_scales(first: Layer, second: Layer, scale: torch.Tensor, groups: int) -> None:
    """Divide ``first``'s output channels by ``scale`` and scale ``second``'s inputs by it."""
    with torch.no_grad():
        w1 = first.weight
        s1 = scale.to(w1.dtype).reshape(-1, *([1] * (w1.dim() - 1)))
        w1.div_(s1)
        if first.bias is not None:
            first.bias.div_(scale.to(first.bias.dtype))
        w2 = second.weight
        out, per_group = w2.shape[:2]
        view = w2.view(groups, out // groups, per_group, -1)
        view.mul_(scale.to(w2.dtype).reshape(groups, 1, per_group, 1))


@dataclass
class EqualizationRecord:
    """What equalization did: the pairs it scaled, the ones it left, and how it checked."""

    pairs: list[list[str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    sweeps: int = 0
    largest_scale: float = 1.0
    smallest_scale: float = 1.0
    check_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def _layer(module: nn.Module) -> Layer:
    if not isinstance(module, LAYERS):
        raise TypeError(f"{type(module).__name__} is not a conv or linear layer")
    return module


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in HOMOGENEOUS_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def find_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """``(first, second)`` module paths of every safe layer -> activation -> layer pair."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        return [], [{"pair": "", "reason": f"torch.fx cannot trace the model "
                                           f"({type(exc).__name__}: {exc}); nothing equalized"}]
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), LAYERS):
            continue
        users = list(node.users)
        if len(users) != 1 or not _is_activation(users[0], modules):
            continue
        act = users[0]
        if act.args[0] is not node:
            continue
        following = list(act.users)
        if len(following) != 1 or following[0].op != "call_module":
            continue
        second = following[0]
        first_path, second_path = str(node.target), str(second.target)
        if not isinstance(modules.get(second_path), LAYERS) or second.args[0] is not act:
            continue
        reason = _refusal(_layer(modules[first_path]), _layer(modules[second_path]), calls,
                          first_path, second_path)
        if reason:
            skipped.append({"pair": f"{first_path} -> {second_path}", "reason": reason})
        else:
            pairs.append((first_path, second_path))
    return pairs, skipped


def _refusal(first: Layer, second: Layer, calls: Counter, first_path: str,
             second_path: str) -> str:
    if calls[first_path] != 1 or calls[second_path] != 1:
        return "a layer is called more than once"
    if first is second:
        return "the same layer on both sides"
    if isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
        return "a conv and a linear layer (a reshape between them)"
    out_channels = first.weight.shape[0]
    in_channels = second.weight.shape[1] * _groups(second)
    if out_channels != in_channels:
        return f"{out_channels} outputs feed {in_channels} inputs"
    return ""


def equalize(model: nn.Module, check_inputs: Sequence[Sequence[torch.Tensor]], *,
             max_sweeps: int = 50, settle: float = 1e-3, tolerance: float = 1e-5
             ) -> tuple[nn.Module, EqualizationRecord]:
    """An equalized copy of ``model`` (eval mode) and the record of what changed.

    ``check_inputs`` (batches of model inputs) are run through both models; a normalized
    output error above ``tolerance`` raises :class:`~deployplug.errors.ExportFailedError`.
    The given model is not modified.
    """
    result = copy.deepcopy(model).eval()
    record = EqualizationRecord()
    pairs, record.skipped = find_pairs(result)
    record.pairs = [list(p) for p in pairs]
    modules = {path: _layer(m) for path, m in result.named_modules()
               if isinstance(m, LAYERS)}
    if pairs:
        lo, hi = math.inf, -math.inf
        for sweep in range(1, max_sweeps + 1):
            moved = 0.0
            for first, second in pairs:
                scale = equalization_scales(modules[first].weight, modules[second].weight,
                                            _groups(modules[second]))
                apply_scales(modules[first], modules[second], scale, _groups(modules[second]))
                moved = max(moved, float(scale.log().abs().max()))
                lo, hi = min(lo, float(scale.min())), max(hi, float(scale.max()))
            record.sweeps = sweep
            if moved < settle:
                break
        record.smallest_scale, record.largest_scale = lo, hi
    record.check_error = _check(model, result, check_inputs, tolerance)
    return result, record


@torch.no_grad()
def _check(original: nn.Module, equalized: nn.Module,
           check_inputs: Sequence[Sequence[torch.Tensor]], tolerance: float) -> float:
    from deployplug.io_spec import flatten_outputs

    worst = 0.0
    for batch in check_inputs:
        refs = flatten_outputs(original(*batch))
        outs = flatten_outputs(equalized(*batch))
        for out, ref in zip(outs, refs, strict=True):
            worst = max(worst, normalized_error(out, ref))
    if worst > tolerance:
        raise ExportFailedError("onnx_int8", f"cross-layer equalization changed the outputs "
                                f"(normalized error {worst:.3e} > {tolerance:g}); export "
                                "without the 'equalize' repair")
    return worst
