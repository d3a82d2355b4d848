"""The int8 arithmetic onnxruntime's static QDQ quantizer applies, as pure tensor functions.

The readiness report predicts what quantization will do to a layer before any file is
written, so it must round the way the runtime will: weights symmetric int8 in [-127, 127]
with scale ``absmax / 127`` (per tensor, or per output channel), activations asymmetric int8
in [-128, 127] over a calibration range widened to include 0 (``MinMax`` calibration). All of
it is simulated in float ("fake quantization"): the value a dequantized int8 tensor holds.
"""

from __future__ import annotations

import math

import torch

#: symmetric int8 weights use [-127, 127] so that zero maps to zero and the range is centred
WEIGHT_QMAX = 127
ACT_QMIN, ACT_QMAX = -128, 127
FLOAT32_TINY = 1.1754943508222875e-38


def weight_scale(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Scale of symmetric int8 weights: one per tensor, or one per output channel (dim 0).

    An all-zero tensor (or channel) gets scale 1, as the runtime does: zero stays zero.
    """
    w = weight.detach()
    absmax = w.abs().flatten(1).amax(1) if per_channel and w.dim() > 1 else w.abs().amax()
    scale = absmax / WEIGHT_QMAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fake_quant_weight(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``weight`` after a round trip through symmetric int8 (same shape and dtype)."""
    scale = weight_scale(weight, per_channel)
    if scale.dim() == 1:
        scale = scale.reshape(-1, *([1] * (weight.dim() - 1)))
    q = torch.clamp(torch.round(weight.detach() / scale), -WEIGHT_QMAX, WEIGHT_QMAX)
    return (q * scale).to(weight.dtype)


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of asymmetric int8 for a calibrated range ``[low, high]``.

    The range always contains 0, so a ReLU output or zero padding is represented exactly.
    """
    lo, hi = min(float(low), 0.0), max(float(high), 0.0)
    scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    if scale < FLOAT32_TINY:  # an (almost) empty range: the runtime falls back to scale 1
        return 1.0, 0
    zero_point = int(round(ACT_QMIN - lo / scale))
    return scale, max(ACT_QMIN, min(ACT_QMAX, zero_point))


def fake_quant_activation(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x`` after a round trip through asymmetric int8 calibrated on ``[low, high]``."""
    scale, zero_point = activation_qparams(low, high)
    q = torch.clamp(torch.round(x / scale) + zero_point, ACT_QMIN, ACT_QMAX)
    return ((q - zero_point) * scale).to(x.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (``inf`` when ``approx`` is exact).

    Computed in float64: the noise of a well-quantized tensor is ~1e-5 of its energy, where
    float32 sums of millions of squares would already be rounding.
    """
    ref = reference.detach().double()
    noise = float(((approx.detach().double() - ref) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def noise_to_db(noise: float, signal: float) -> float:
    """Accumulated (signal, noise) energies as an SQNR in dB."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
