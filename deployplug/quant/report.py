"""The INT8 readiness report: which fused layers int8 will hurt, by how much, and why.

For every Conv / Linear of the deploy form it gives the weight statistics that make int8 hard
(largest weight against the 99.9th percentile, spread of per-output-channel ranges, weight
SQNR per tensor and per channel), the activation ranges seen on the calibration batches, and
the *measured* effect of each layer on the model's outputs (:mod:`.simulate`). Layers are
ranked by what keeping them in float buys, measured greedily (:func:`.simulate.rank_layers`),
not by weight range: in a fused RepVGG the damage is spread over the deep stage, where modest
outliers in many layers add up. For a layer fused from a RepVGG
block the report also names the training-time branch behind its largest weight and its widest
channel (:mod:`.branches`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deployplug.errors import ConfigError
from deployplug.quant.branches import (
    Attribution,
    BranchKernels,
    attribute_entry,
    attribute_largest,
    branch_extremes,
)
from deployplug.quant.calibration import Batches
from deployplug.quant.qmath import fake_quant_weight, sqnr_db
from deployplug.quant.simulate import (
    Effect,
    Layer,
    Ranges,
    Ranked,
    calibrate,
    quantizable_layers,
    rank_layers,
    whole_model,
)

Granularity = Literal["per_tensor", "per_channel"]
GRANULARITIES = ("per_tensor", "per_channel")
#: a weight this many times the 99.9th percentile of its tensor is called an outlier
OUTLIER_RATIO = 4.0
#: per-output-channel ranges differing by more than this are called spread
CHANNEL_SPREAD = 5.0
#: an input whose int8 step exceeds this share of its mean magnitude is flagged
INPUT_STEP = 0.5
#: calibration samples each one-layer measurement runs on (ranges use all of them)
DEFAULT_SENSITIVITY_SAMPLES = 128


def check_granularity(weights: str, option: str = "int8_weights") -> Granularity:
    if weights not in GRANULARITIES:
        raise ConfigError(f"{option}={weights!r}: use 'per_channel' or 'per_tensor' (what the "
                          "target's int8 kernels accept)")
    return weights  # type: ignore[return-value]


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class LayerRisk:
    """One fused layer: weight statistics, ranges, measured effect, and (when known) cause."""

    path: str
    kind: str
    weight_shape: list[int]
    weight_max: float
    weight_p999: float
    channel_spread: float  # largest / smallest non-zero per-output-channel range
    dead_channels: int
    sqnr_per_tensor_db: float
    sqnr_per_channel_db: float
    input_range: list[float] | None
    output_range: list[float] | None
    #: the whole int8 model with only this layer's weights in float: output SQNR gain (dB)
    #: over the all-int8 model, KL divergence of its class scores, top-1 agreement
    float_gain_db: float
    float_kl: float | None
    float_agreement: float | None
    #: the int8 step of the calibrated input range over the mean input magnitude
    input_step: float
    #: with this layer and every layer ranked above it in float (the first ``top_k`` only)
    cumulative_kl: float | None = None
    cumulative_agreement: float | None = None
    rank: int = 0
    risky: bool = False
    reasons: list[str] = field(default_factory=list)
    block: str | None = None
    form: str | None = None
    branch_max: dict[str, float] | None = None
    largest: Attribution | None = None
    widest_channel: Attribution | None = None

    @property
    def outlier_ratio(self) -> float:
        return self.weight_max / self.weight_p999 if self.weight_p999 > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in list(data.items()):
            if isinstance(value, float):
                data[key] = _json_float(value)
        data["outlier_ratio"] = _json_float(self.outlier_ratio)
        return data


@dataclass
class Int8Report:
    """Every fused layer, riskiest first, plus whole-model simulations and explanations."""

    weights: Granularity
    samples: int
    layers: list[LayerRisk]
    simulated: dict[str, dict[str, float | None]]
    notes: list[str]
    unattributed: dict[str, str]
    seconds: float
    top_k: int

    def ranking(self) -> list[str]:
        """Layer paths, riskiest first: the order mixed precision keeps layers in float."""
        return [layer.path for layer in self.layers]

    def risky(self) -> list[LayerRisk]:
        return [layer for layer in self.layers if layer.risky]

    def layer(self, path: str) -> LayerRisk:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(f"no quantized layer '{path}'; layers: {', '.join(self.ranking())}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "samples": self.samples,
            "top_k": self.top_k,
            "seconds": round(self.seconds, 3),
            "simulated": {k: {kk: _json_float(vv) for kk, vv in v.items()}
                          for k, v in self.simulated.items()},
            "notes": list(self.notes),
            "unattributed": dict(self.unattributed),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def headline(self, count: int = 3) -> str:
        """One line for a summary: the simulated agreement and the riskiest layers."""
        sim = self.simulated.get(self.weights, {})
        agree = sim.get("agreement")
        parts = []
        for layer in self.layers[:count]:
            why = layer.largest.message if layer.largest is not None and (
                layer.outlier_ratio > OUTLIER_RATIO) else ""
            parts.append(layer.path + (f" ({why})" if why else ""))
        head = f"int8 readiness, {self.weights.replace('_', '-')} weights"
        if agree is not None:
            head += f": simulated top-1 agreement {100 * agree:.1f} %"
        return head + "; riskiest: " + ", ".join(parts)

    def __str__(self) -> str:
        lines = [f"INT8 readiness ({self.weights.replace('_', '-')} weights, "
                 f"{self.samples} calibration samples, {len(self.layers)} layers)"]
        for mode, sim in self.simulated.items():
            agree = sim.get("agreement")
            lines.append(f"  whole model, {mode.replace('_', '-')} weights: output SQNR "
                         f"{_db(sim.get('sqnr_db'))}"
                         + ("" if agree is None else f", top-1 agreement {100 * agree:.1f} %"))
        lines.append(f"  {'rank':>4}  {'layer':<28}{'w max':>8}{'p99.9':>8}{'ch x':>7}"
                     f"{'SQNR t/c dB':>13}{'float +dB':>11}  reasons")
        for layer in self.layers:
            sq = f"{_db(layer.sqnr_per_tensor_db)}/{_db(layer.sqnr_per_channel_db)}"
            lines.append(f"  {layer.rank:>4}{'*' if layer.risky else ' '} {layer.path:<28}"
                         f"{layer.weight_max:>8.3g}{layer.weight_p999:>8.3g}"
                         f"{layer.channel_spread:>7.1f}{sq:>13}"
                         f"{_db(layer.float_gain_db):>11}  {'; '.join(layer.reasons)}")
        steps = [f"{layer.rank}: {100 * layer.cumulative_agreement:.1f} %" for layer in
                 self.layers if layer.cumulative_agreement is not None]
        if steps:
            lines.append("  top-1 agreement with the top k layers in float (simulated), k = "
                         + ", ".join(steps))
        for layer in self.risky():
            if not layer.outlier_ratio > OUTLIER_RATIO and not layer.channel_spread > \
                    CHANNEL_SPREAD:
                continue  # nothing stands out to explain; the JSON keeps the split anyway
            for attribution in (layer.largest, layer.widest_channel):
                if attribution is not None:
                    lines.append(f"  {layer.path}: {attribution.message}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else f"{value:.1f}"


def weight_statistics(weight: torch.Tensor) -> dict[str, Any]:
    """Range, 99.9th percentile, channel spread and int8 SQNR of one weight tensor."""
    w = weight.detach().float()
    flat = w.abs().flatten()
    k = max(1, min(flat.numel(), math.ceil(0.999 * flat.numel())))
    per_channel = w.abs().flatten(1).amax(1) if w.dim() > 1 else w.abs().reshape(1)
    alive = per_channel[per_channel > 0]
    spread = float(alive.max() / alive.min()) if alive.numel() else 1.0
    return {
        "weight_max": float(flat.max()) if flat.numel() else 0.0,
        "weight_p999": float(flat.kthvalue(k).values) if flat.numel() else 0.0,
        "channel_spread": spread,
        "dead_channels": int((per_channel == 0).sum()),
        "sqnr_per_tensor_db": sqnr_db(w, fake_quant_weight(w, per_channel=False)),
        "sqnr_per_channel_db": sqnr_db(w, fake_quant_weight(w, per_channel=True)),
    }


def _reasons(layer: LayerRisk) -> list[str]:
    reasons = []
    if layer.outlier_ratio > OUTLIER_RATIO:
        reasons.append(f"weight outlier {layer.weight_max:.3g} = {layer.outlier_ratio:.1f}x "
                       "p99.9")
    if layer.channel_spread > CHANNEL_SPREAD:
        reasons.append(f"channel ranges differ {layer.channel_spread:.1f}x")
    gain = layer.sqnr_per_channel_db - layer.sqnr_per_tensor_db
    if gain > 6.0 and math.isfinite(gain):
        reasons.append(f"per-channel weights +{gain:.0f} dB")
    if layer.input_step > INPUT_STEP:
        reasons.append(f"input int8 step {layer.input_step:.2f} of the mean |input| (float "
                       "weights will not fix that; equalization may)")
    return reasons


def _attribute(layer: LayerRisk, kernels: BranchKernels) -> None:
    layer.block, layer.form = kernels.block, kernels.form
    layer.branch_max = branch_extremes(kernels)
    layer.largest = attribute_largest(kernels)
    total = kernels.total()
    ranges = total.abs().flatten(1).amax(1)
    channel = int(ranges.argmax())
    flat = int(total[channel].abs().argmax())
    index = (channel, *(int(i) for i in torch.unravel_index(torch.tensor(flat),
                                                            total.shape[1:])))
    widest = attribute_entry(kernels, index)
    if (widest.out_channel, widest.in_channel, widest.tap) != (
            layer.largest.out_channel, layer.largest.in_channel, layer.largest.tap):
        layer.widest_channel = widest


def _notes(branches: dict[str, BranchKernels]) -> list[str]:
    """Plain-language reading of the branch scales, per block form."""
    notes = []
    plain = [k for k in branches.values() if k.form == "repvgg"]
    friendly = [k for k in branches.values() if k.form == "quant_friendly"]
    if plain:
        notes.append(f"{len(plain)} layer(s) fused from RepVGG blocks with a BatchNorm per "
                     "branch: each branch's BN scale multiplies its own weights, and the "
                     "identity BN's scale lands unchanged on a centre tap")
        with_identity = [k for k in plain if "identity" in k.scales]
        if with_identity:
            top = max(with_identity, key=lambda k: float(k.scales["identity"].abs().max()))
            scale = top.scales["identity"].abs()
            notes.append(f"largest identity-BN scale: {float(scale.max()):.3g} (channel "
                         f"{int(scale.argmax())} of '{top.block}')")
    if friendly:
        top = max(friendly, key=lambda k: float(k.scales["kxk"].abs().max()))
        scale = top.scales["kxk"].abs()
        notes.append(f"{len(friendly)} layer(s) fused from quant-friendly blocks: no BN on the "
                     "1x1 and identity branches and one BN after the sum, so every branch of a "
                     "channel shares one scale and an identity entry equals that scale; the "
                     f"largest is {float(scale.max()):.3g} (channel {int(scale.argmax())} of "
                     f"'{top.block}')")
    return notes


def _effect_dict(e: Effect) -> dict[str, float | None]:
    return {"sqnr_db": e.sqnr_db, "agreement": e.agreement, "kl": e.kl}


def build_report(fused: nn.Module, batches: Batches, weights: Granularity, top_k: int,
                 branches: dict[str, BranchKernels], unattributed: dict[str, str],
                 started: float, sensitivity_samples: int | None = DEFAULT_SENSITIVITY_SAMPLES
                 ) -> Int8Report:
    """The report of an already fused eval-mode copy that may be modified temporarily.

    Ranges and the whole-model simulations use every calibration sample; the one-layer
    measurements (one pass per layer) use the first ``sensitivity_samples``.
    """
    layers = quantizable_layers(fused)
    if not layers:
        raise ConfigError("the model has no Conv or Linear layer: there is nothing int8 "
                          "quantization would change")
    ranges, references = calibrate(fused, batches, layers)
    per_channel = weights == "per_channel"
    probe = batches.head(sensitivity_samples)
    probe_refs = references if probe is batches else calibrate(fused, probe, {})[1]
    ranked = rank_layers(fused, probe, probe_refs, layers, ranges, per_channel, top_k)
    # the gains are against the whole int8 model on the same (probe) samples
    baseline = whole_model(fused, probe, probe_refs, layers, ranges, per_channel).sqnr_db
    simulated = {mode: _effect_dict(whole_model(fused, batches, references, layers, ranges,
                                                mode == "per_channel"))
                 for mode in GRANULARITIES}
    rows = [_row(r.path, layers[r.path], ranges[r.path], r, baseline) for r in ranked]
    for rank, row in enumerate(rows, start=1):
        row.rank, row.risky = rank, rank <= top_k
        row.reasons = _reasons(row)
        if row.path in branches:
            _attribute(row, branches[row.path])
    return Int8Report(weights, batches.samples, rows, simulated, _notes(branches),
                      unattributed, time.perf_counter() - started, top_k)


def _gain(db: float, baseline: float) -> float:
    """SQNR gain in dB; 0 when both are exact, inf when only the first one is."""
    if db == baseline:
        return 0.0
    return db - baseline


def _row(path: str, module: Layer, r: Ranges, s: Ranked, baseline: float) -> LayerRisk:
    stats = weight_statistics(module.weight)
    seen = r.calls > 0
    return LayerRisk(
        path=path, kind="linear" if isinstance(module, nn.Linear) else "conv",
        weight_shape=list(module.weight.shape), **stats,
        input_range=[r.in_low, r.in_high] if seen else None,
        output_range=[r.out_low, r.out_high] if seen else None,
        float_gain_db=_gain(s.alone.sqnr_db, baseline), float_kl=s.alone.kl,
        float_agreement=s.alone.agreement,
        cumulative_kl=None if s.cumulative is None else s.cumulative.kl,
        cumulative_agreement=None if s.cumulative is None else s.cumulative.agreement,
        input_step=r.input_step)


def layers_by_path(report: Int8Report, paths: Sequence[str]) -> list[str]:
    """Check that ``paths`` name quantized layers of the report; keep their order."""
    known = set(report.ranking())
    missing = [p for p in paths if p not in known]
    if missing:
        raise ConfigError(f"int8_float_layers names {missing}, which are not quantized layers; "
                          f"layers: {', '.join(report.ranking())}")
    return list(paths)
