"""What a verification found, as data: the report object the manifest stores.

It sits below both :mod:`deployplug.verification` (which fills it) and
:mod:`deployplug.manifest` (which stores and reloads it), so neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deployplug.layer_profile import LayerProfile, profiles_from_dict

DEFAULT_TOLERANCE = 1e-5


@dataclass
class Comparison:
    """One artifact output against one PyTorch output, on one input sample."""

    format: str
    source: str  # "recorded" (reference.npz) or "model" (fresh PyTorch outputs)
    sample: int
    output: int
    shape: list[int]
    max_abs: float
    normalized: float
    passed: bool


@dataclass
class VerifyReport:
    """Per-format verdicts; ``passed`` only when every comparison passed and nothing failed."""

    tolerance: float
    comparisons: list[Comparison] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # format -> why it could not run
    #: format -> the culprit: the first layer whose inputs agree and whose output does not
    divergence: dict[str, str] = field(default_factory=dict)
    #: how the directory departs from its manifest; non-empty means no artifact was run
    integrity: list[str] = field(default_factory=list)
    #: the tolerance the manifest recorded at export time (reported, never applied)
    recorded_tolerance: float | None = None
    #: format -> statistical verdict (an int8 file is judged by its decisions on real inputs,
    #: not by a normalized tolerance); keys as in ``Int8Judgement.to_dict``, ``passed`` decides
    judgements: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: format -> per-layer error profile (:mod:`deployplug.layer_profile`): at export on the
    #: example input; with ``dp.verify(dir, model=...)`` recomputed against the model
    layers: dict[str, LayerProfile] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        checked = bool(self.comparisons) or bool(self.judgements)
        return (not self.integrity and not self.failures and checked
                and all(c.passed for c in self.comparisons)
                and all(bool(j.get("passed")) for j in self.judgements.values()))

    def formats(self) -> list[str]:
        seen = [c.format for c in self.comparisons] + list(self.judgements) + list(self.failures)
        return list(dict.fromkeys(seen))

    def format_passed(self, fmt: str) -> bool:
        if fmt in self.failures:
            return False
        rows = [c for c in self.comparisons if c.format == fmt]
        judged = self.judgements.get(fmt)
        if judged is not None:
            return bool(judged.get("passed")) and all(c.passed for c in rows)
        return bool(rows) and all(c.passed for c in rows)

    def max_error(self, fmt: str) -> float:
        """Worst normalized error of one format (``inf`` when it could not run)."""
        rows = [c.normalized for c in self.comparisons if c.format == fmt]
        judged = self.judgements.get(fmt)
        if judged is not None:
            value = judged.get("max_error")
            rows.append(float("inf") if value is None else float(value))
        return max(rows) if rows and fmt not in self.failures else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "formats": {
                f: {"passed": self.format_passed(f), "max_error": _json_float(self.max_error(f))}
                for f in self.formats()
            },
            "comparisons": [asdict(c) for c in self.comparisons],
            "failures": dict(self.failures),
            "divergence": dict(self.divergence),
            "integrity": list(self.integrity),
            **({"judgements": {f: dict(j) for f, j in self.judgements.items()}}
               if self.judgements else {}),
            **({"layers": {f: p.to_dict() for f, p in self.layers.items()}}
               if self.layers else {}),
            **({} if self.recorded_tolerance is None
               else {"recorded_tolerance": self.recorded_tolerance}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerifyReport:
        """Rebuild a stored report; malformed data raises ``TypeError`` / ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"a report must be an object, got {type(data).__name__}")
        comparisons = data.get("comparisons", [])
        if not isinstance(comparisons, list) or not all(isinstance(c, dict)
                                                        for c in comparisons):
            raise TypeError("'comparisons' must be a list of objects")
        recorded = data.get("recorded_tolerance")
        judgements = data.get("judgements", {})
        if not isinstance(judgements, dict) or not all(
                isinstance(j, dict) and isinstance(j.get("passed"), bool)
                for j in judgements.values()):
            raise TypeError("'judgements' must map formats to verdict objects with 'passed'")
        return cls(
            tolerance=float(data["tolerance"]),
            comparisons=[Comparison(**c) for c in comparisons],
            failures={str(k): str(v) for k, v in dict(data.get("failures", {})).items()},
            divergence={str(k): str(v) for k, v in dict(data.get("divergence", {})).items()},
            integrity=[str(x) for x in list(data.get("integrity", []))],
            recorded_tolerance=None if recorded is None else float(recorded),
            judgements={str(f): dict(j) for f, j in judgements.items()},
            layers=profiles_from_dict(data.get("layers", {}), "verification.layers"),
        )

    def __str__(self) -> str:
        header = f"{'format':<10}{'source':<10}{'sample':>7}{'output':>7}  {'shape':<20}"
        header += f"{'max abs':>12}{'normalized':>13}  verdict"
        title = f"verification (normalized tolerance {self.tolerance:g}"
        if self.recorded_tolerance is not None and self.recorded_tolerance != self.tolerance:
            title += f"; the manifest recorded {self.recorded_tolerance:g}, not used"
        lines = [title + ")"]
        if self.integrity:
            lines.append("integrity FAILED, no artifact was run:")
            lines += [f"  {problem}" for problem in self.integrity]
        lines.append(header)
        for c in self.comparisons:
            lines.append(
                f"{c.format:<10}{c.source:<10}{c.sample:>7}{c.output:>7}  {str(c.shape):<20}"
                f"{c.max_abs:>12.3e}{c.normalized:>13.3e}  {'ok' if c.passed else 'MISMATCH'}"
            )
        for fmt, judged in self.judgements.items():
            lines.append(f"{fmt:<10}{describe_judgement(judged)}")
        for fmt, why in self.failures.items():
            lines.append(f"{fmt:<10}FAILED to run: {why}")
        for fmt, where in self.divergence.items():
            lines.append(f"{fmt:<10}culprit: {where}")
        lines.append("result: " + ("PASSED" if self.passed else "FAILED"))
        return "\n".join(lines)

    def format_layers(self, formats: list[str] | None = None) -> str:
        """The per-layer profiles as text tables, one per format (all formats by default)."""
        names = list(self.layers) if formats is None else [f for f in formats
                                                           if f in self.layers]
        if not names:
            return "no per-layer profile (the export did not verify, or it predates profiles)"
        return "\n\n".join(self.layers[f].table() for f in names)


def describe_judgement(judged: dict[str, Any]) -> str:
    """One line for a statistical verdict: agreement, accuracies, drop against its limit."""
    def pct(key: str) -> str:
        value = judged.get(key)
        return "?" if not isinstance(value, (int, float)) else f"{100 * value:.2f} %"

    text = f"top-1 agreement {pct('agreement')} over {judged.get('samples', '?')} samples"
    if judged.get("int8_accuracy") is not None:
        text += f", accuracy {pct('fp32_accuracy')} -> {pct('int8_accuracy')}"
    text += (f"; {judged.get('decided_by', 'decision')} drop {pct('drop')} (limit "
             f"{pct('max_drop')}): {'ok' if judged.get('passed') else 'FAILED'}")
    reason = judged.get("reason")
    return text + (f" ({reason})" if reason else "")


def _json_float(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


__all__ = ["DEFAULT_TOLERANCE", "Comparison", "VerifyReport"]
