"""Int8 simulated in PyTorch, one layer at a time: what the report measures.

A layer's weight range says little about what its quantization does to the output: a deep
layer with a modest outlier can matter more than an early one with a large one. So the report
measures it on the calibration batches: how much closer to fp32 do the outputs of the whole
int8 model get when that layer keeps float weights (what the ``keep_float`` repair does),
alone and together with the layers ranked above it (:func:`rank_layers`)? Each measurement
is one pass over the batches with weights swapped for their fake-quantized copies (restored
afterwards) and pre-hooks rounding every layer's input.
Everything runs on the report's own fused copy, never on the caller's model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deployplug.io_spec import flatten_outputs
from deployplug.quant.calibration import Batches
from deployplug.quant.qmath import fake_quant_activation, fake_quant_weight, noise_to_db

#: layer types onnxruntime quantizes with weights (Conv, Gemm / MatMul)
QUANTIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Layer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear


def quantizable_layers(model: nn.Module) -> dict[str, Layer]:
    """Conv and Linear layers by module path, in registration order."""
    return {path: m for path, m in model.named_modules()
            if isinstance(m, QUANTIZED_LAYERS) and path}


@dataclass
class Ranges:
    """Calibrated input and output range of one layer (over every call)."""

    in_low: float = float("inf")
    in_high: float = float("-inf")
    out_low: float = float("inf")
    out_high: float = float("-inf")
    in_absmean: float = 0.0  # mean |input|, averaged over calls
    calls: int = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.in_low = min(self.in_low, float(x.min()))
        self.in_high = max(self.in_high, float(x.max()))
        self.out_low = min(self.out_low, float(y.min()))
        self.out_high = max(self.out_high, float(y.max()))
        self.in_absmean += (float(x.abs().mean()) - self.in_absmean) / (self.calls + 1)
        self.calls += 1

    @property
    def input_step(self) -> float:
        """The int8 step of the input range relative to the mean input magnitude.

        Rounding moves a typical input by up to half of this: a range stretched by one
        outlier channel makes it large for every other channel.
        """
        if not self.calls or self.in_absmean <= 0:
            return 0.0
        span = max(self.in_high, 0.0) - min(self.in_low, 0.0)
        return span / 255.0 / self.in_absmean


@dataclass
class Effect:
    """How far the outputs moved with one change, over all calibration batches."""

    sqnr_db: float  # output signal / output change, in dB (higher is better)
    agreement: float | None  # share of top-1 decisions unchanged (None: no class axis)
    #: mean KL divergence of the changed class scores from the fp32 ones (softmax over dim 1)
    kl: float | None = None

    @property
    def loss(self) -> float:
        """What the ranking minimises: the KL divergence when the output has classes (it
        weighs the scores that decide, where a logit's squared error weighs all of them
        alike), else the output's noise-to-signal ratio."""
        if self.kl is not None:
            return self.kl
        return 0.0 if self.sqnr_db == math.inf else 10.0 ** (-self.sqnr_db / 10.0)


def _outputs(model: nn.Module, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach() for t in flatten_outputs(model(*batch))]


def top1(output: torch.Tensor) -> torch.Tensor | None:
    """Decisions along the class axis (dim 1) of a (batch, classes, ...) output."""
    return output.argmax(1) if output.dim() >= 2 and output.shape[1] > 1 else None


@torch.no_grad()
def calibrate(model: nn.Module, batches: Batches, layers: dict[str, Layer]
              ) -> tuple[dict[str, Ranges], list[list[torch.Tensor]]]:
    """Every layer's input/output range and the fp32 outputs of every batch."""
    ranges = {path: Ranges() for path in layers}
    handles = []
    for path, module in layers.items():
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                ranges[path].update(args[0], out)
        handles.append(module.register_forward_hook(hook))
    try:
        references = [_outputs(model, batch) for batch in batches]
    finally:
        for handle in handles:
            handle.remove()
    return ranges, references


@torch.no_grad()
def effect(model: nn.Module, batches: Batches, references: list[list[torch.Tensor]]) -> Effect:
    """Run every batch and compare with the fp32 references."""
    signal = noise = divergence = 0.0
    agree = total = 0
    for batch, refs in zip(batches, references, strict=True):
        outs = _outputs(model, batch)
        for out, ref in zip(outs, refs, strict=True):
            r = ref.double()
            signal += float((r * r).sum())
            noise += float(((out.double() - r) ** 2).sum())
        ref_top, out_top = top1(refs[0]), top1(outs[0])
        if ref_top is not None and out_top is not None:
            agree += int((ref_top == out_top).sum())
            total += ref_top.numel()
            divergence += _kl_sum(outs[0], refs[0])
    if not total:
        return Effect(noise_to_db(noise, signal), None)
    return Effect(noise_to_db(noise, signal), agree / total, divergence / total)


def _kl_sum(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Sum over decisions of KL(softmax(ref) || softmax(out)) along the class axis."""
    log_p = torch.log_softmax(ref.double(), dim=1)
    log_q = torch.log_softmax(out.double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum())


@contextlib.contextmanager
def quantized_weights(layers: dict[str, Layer], per_channel: bool) -> Iterator[None]:
    """Swap each layer's weight for its int8 round trip; always restored on exit."""
    saved = {path: m.weight.detach().clone() for path, m in layers.items()}
    try:
        with torch.no_grad():
            for m in layers.values():
                m.weight.copy_(fake_quant_weight(m.weight, per_channel))
        yield
    finally:
        with torch.no_grad():
            for path, m in layers.items():
                m.weight.copy_(saved[path])


@contextlib.contextmanager
def quantized_inputs(layers: dict[str, Layer], ranges: dict[str, Ranges]) -> Iterator[None]:
    """Round each layer's input through int8 calibrated on its own range."""
    def make_hook(r: Ranges):
        def hook(_m: nn.Module, args: tuple) -> tuple:
            return (fake_quant_activation(args[0], r.in_low, r.in_high), *args[1:])
        return hook

    handles = [m.register_forward_pre_hook(make_hook(ranges[path]))
               for path, m in layers.items() if ranges[path].calls]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Ranked:
    """One layer in the ranking, with what keeping it in float was measured to buy."""

    path: str
    alone: Effect  # the int8 model with only this layer's weights in float
    #: the int8 model with this layer and every layer ranked above it in float (greedy
    #: picks only; None below the greedy depth)
    cumulative: Effect | None = None


def rank_layers(model: nn.Module, batches: Batches, references: list[list[torch.Tensor]],
                layers: dict[str, Layer], ranges: dict[str, Ranges], per_channel: bool,
                depth: int) -> list[Ranked]:
    """Layers ordered by what keeping their weights in float buys, best first.

    The first ``depth`` places are chosen greedily: each is the layer that, kept in float
    together with the ones already chosen, brings the fully quantized model closest to fp32.
    That measures a layer with the noise it meets downstream and with the layers already
    repaired, which matters when the damage is spread over many similar layers (RepVGG-A0's
    deep stage): on two digits-recipe models the five greedy picks recovered 85-91 % of the
    simulated per-tensor drop, against 72-85 % for one-layer-alone measurements and 54-56 %
    for the five largest weights (in onnxruntime, over three models: 46-91 % against 54-73 %
    for the largest weights). The rest follow by their one-layer measurement. Costs about
    ``depth x layers`` passes over ``batches``.
    """
    alone = {path: whole_model(model, batches, references, layers, ranges, per_channel,
                               keep_float=(path,)) for path in layers}
    picked: list[str] = []
    cumulative: dict[str, Effect] = {}
    remaining = set(layers)
    while remaining and len(picked) < depth:
        scores = alone if not picked else {
            path: whole_model(model, batches, references, layers, ranges, per_channel,
                              keep_float=(*picked, path)) for path in sorted(remaining)}
        best = min(sorted(remaining), key=lambda path: scores[path].loss)
        picked.append(best)
        cumulative[best] = scores[best]
        remaining.discard(best)
    rest = sorted(remaining, key=lambda path: (alone[path].loss, path))
    return [Ranked(path, alone[path], cumulative.get(path)) for path in picked + rest]


def whole_model(model: nn.Module, batches: Batches, references: list[list[torch.Tensor]],
                layers: dict[str, Layer], ranges: dict[str, Ranges], per_channel: bool,
                keep_float: Sequence[str] = ()) -> Effect:
    """Every layer's weights and inputs in int8, except the weights of ``keep_float``."""
    weight_layers = {p: m for p, m in layers.items() if p not in set(keep_float)}
    with quantized_weights(weight_layers, per_channel), quantized_inputs(layers, ranges):
        return effect(model, batches, references)
