"""How an ``onnx_int8`` export is calibrated, repaired and judged: one checked settings object.

:func:`deployplug.export` takes it as ``int8=`` (an :class:`Int8Options` or a plain mapping of
the same names, the form configs and the callback use), so the exact formats' arguments stay
free of int8 knobs and every int8 knob is validated before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from deployplug.errors import ConfigError
from deployplug.quant.calibration import DEFAULT_CALIBRATION_SAMPLES
from deployplug.quant.repair import REPAIRS
from deployplug.quant.report import check_granularity
from deployplug.quant.verdict import DEFAULT_MAX_DROP

#: evaluation samples kept in ``int8_eval.npz`` so a later ``verify`` can judge the file again
DEFAULT_STORED_SAMPLES = 256


@dataclass
class Int8Options:
    """Settings of the ``onnx_int8`` format.

    ``weights``: the weight granularity the target takes (``"per_channel"`` or
    ``"per_tensor"``, what many NPUs and DSPs accept). ``repair``: none, equalize, keep_float,
    equalize+keep_float or auto (the cheapest repair that meets ``max_drop``);
    ``float_layers`` names the layers keep_float leaves in float (a count of the riskiest, or
    module paths), ``max_float`` bounds what auto may keep in float. ``max_drop``: the largest
    accepted accuracy drop (with labels) or share of changed decisions, as a fraction.
    ``eval_inputs`` / ``eval_labels``: the batches the verdict is judged on (default: the
    calibration batches, which the record then says). ``stored_samples``: how many evaluation
    samples ``int8_eval.npz`` keeps for re-verification.
    """

    weights: str = "per_channel"
    repair: str = "none"
    float_layers: int | Sequence[str] | None = None
    max_float: int = 8
    max_drop: float = DEFAULT_MAX_DROP
    calibration_samples: int | None = DEFAULT_CALIBRATION_SAMPLES
    eval_inputs: Any = None
    eval_labels: Any = None
    eval_samples: int | None = 1024
    stored_samples: int = DEFAULT_STORED_SAMPLES
    report_top_k: int = 5
    sensitivity_samples: int | None = 128

    def __post_init__(self) -> None:
        self.weights = check_granularity(self.weights, "int8 weights")
        if self.repair not in REPAIRS:
            raise ConfigError(f"int8 repair {self.repair!r} is not one of {', '.join(REPAIRS)}")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) \
                or not math.isfinite(self.max_drop) or not 0.0 <= self.max_drop < 1.0:
            raise ConfigError(f"int8 max_drop={self.max_drop!r}: give the largest acceptable "
                              "drop as a fraction in [0, 1), e.g. 0.01 for one point")
        for name in ("max_float", "stored_samples", "report_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"int8 {name} must be a whole number >= 0, got {value!r}")
        for name in ("calibration_samples", "eval_samples", "sensitivity_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"int8 {name} must be None (all) or >= 1, got {value!r}")

    @classmethod
    def coerce(cls, value: Int8Options | Mapping[str, Any] | None) -> Int8Options:
        """``value`` as options: ``None`` gives the defaults, a mapping its named fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"int8 must be Int8Options or a mapping of its fields, got "
                              f"{type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown int8 option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(value))

    def settings(self) -> dict[str, Any]:
        """The options as recorded in the manifest (batches are data, not settings)."""
        skip = {"eval_inputs", "eval_labels"}
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in skip:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, Iterable) and not isinstance(
                value, str) else value
        return out


__all__ = ["DEFAULT_STORED_SAMPLES", "Int8Options"]
