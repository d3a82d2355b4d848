"""Statistical verification of an int8 file: does it make the same decisions as fp32?

An int8 model never matches fp32 to 1e-5; what matters is whether it decides the same. So an
int8 artifact is judged on many real inputs: top-1 agreement with the fp32 reference, the
accuracy of both when labels are given, and the worst normalized error (reported, not used to
decide). It passes when the accuracy drop (with labels) or the share of changed decisions
(without; that share bounds any accuracy drop) is at most ``max_drop``. A verdict needs at
least ``1 / max_drop`` samples, so that a single changed decision is not already more than
the limit: fewer samples cannot tell a 1-point drop from none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deployplug.errors import ConfigError
from deployplug.numerics import normalized_error

DEFAULT_MAX_DROP = 0.01


@dataclass
class Int8Judgement:
    """The verdict on one int8 artifact and the numbers behind it."""

    passed: bool
    samples: int
    agreement: float
    max_drop: float
    decided_by: str  # "accuracy" or "agreement"
    drop: float  # the number compared with max_drop
    max_error: float  # worst normalized error over samples and outputs
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None
    reason: str = ""

    @property
    def accuracy_drop(self) -> float | None:
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        return self.fp32_accuracy - self.int8_accuracy

    def metrics(self, prefix: str = "deploy", fmt: str = "onnx_int8") -> dict[str, float]:
        """Flat numbers for loggers, named like validation parity's."""
        out = {f"{prefix}/{fmt}/val_agreement": self.agreement,
               f"{prefix}/{fmt}/val_max_error": self.max_error,
               f"{prefix}/{fmt}/drop": self.drop,
               f"{prefix}/{fmt}/passed": float(self.passed)}
        if self.int8_accuracy is not None:
            out[f"{prefix}/{fmt}/val_acc"] = self.int8_accuracy
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy_drop"] = self.accuracy_drop
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in data.items()}

    def __str__(self) -> str:
        text = (f"int8: top-1 agreement {100 * self.agreement:.2f} % over {self.samples} "
                f"samples")
        if self.fp32_accuracy is not None and self.int8_accuracy is not None:
            text += (f", accuracy fp32 {100 * self.fp32_accuracy:.2f} % -> int8 "
                     f"{100 * self.int8_accuracy:.2f} %")
        text += (f"; {self.decided_by} drop {100 * self.drop:.2f} points (limit "
                 f"{100 * self.max_drop:.2f}); worst normalized error {self.max_error:.3g}; "
                 f"{'PASSED' if self.passed else 'FAILED'}")
        return text + (f" ({self.reason})" if self.reason else "")


def _decisions(output: np.ndarray, where: str) -> np.ndarray:
    if output.ndim < 2 or output.shape[1] < 2:
        raise ConfigError(f"{where}: output of shape {list(output.shape)} has no class axis "
                          "(dim 1 of at least 2 scores), so int8 cannot be judged by its "
                          "decisions")
    return output.argmax(1)


def judge(outputs: Sequence[Sequence[np.ndarray]], references: Sequence[Sequence[np.ndarray]],
          labels: np.ndarray | Sequence[int] | None = None, max_drop: float = DEFAULT_MAX_DROP,
          min_samples: int | None = None) -> Int8Judgement:
    """Judge int8 ``outputs`` against fp32 ``references`` (lists of output lists per batch).

    The first output of each batch holds ``(batch, classes, ...)`` scores; ``labels`` (one
    per decision, in batch order) make the accuracy drop decide, otherwise the share of
    changed decisions does. ``min_samples`` defaults to ``ceil(1 / max_drop)``.
    """
    if not 0.0 <= max_drop < 1.0 or not math.isfinite(max_drop):
        raise ConfigError(f"max_drop={max_drop!r}: give the largest acceptable drop as a "
                          "fraction in [0, 1), e.g. 0.01 for one point")
    if len(outputs) != len(references) or not references:
        raise ConfigError(f"{len(outputs)} output batches for {len(references)} references")
    worst = 0.0
    got, want = [], []
    for k, (outs, refs) in enumerate(zip(outputs, references, strict=True)):
        if len(outs) != len(refs):
            raise ConfigError(f"batch {k}: {len(outs)} outputs, the reference has {len(refs)}")
        for out, ref in zip(outs, refs, strict=True):
            out = np.asarray(out)
            if not np.all(np.isfinite(out)):
                worst = math.inf
            elif out.shape == np.asarray(ref).shape:
                worst = max(worst, normalized_error(out, ref))
            else:
                worst = math.inf
        got.append(_decisions(np.asarray(outs[0]), f"int8 output, batch {k}").reshape(-1))
        want.append(_decisions(np.asarray(refs[0]), f"reference output, batch {k}").reshape(-1))
    int8_top, fp32_top = np.concatenate(got), np.concatenate(want)
    n = int(fp32_top.size)
    agreement = float((int8_top == fp32_top).mean()) if n else 0.0
    needed = min_samples if min_samples is not None else (
        math.ceil(1.0 / max_drop) if max_drop > 0 else 1)
    fp32_acc = int8_acc = None
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if y.size != n:
            raise ConfigError(f"{y.size} labels for {n} decisions: pass one label per sample")
        fp32_acc = float((fp32_top == y).mean())
        int8_acc = float((int8_top == y).mean())
        decided_by, drop = "accuracy", fp32_acc - int8_acc
    else:
        decided_by, drop = "agreement", 1.0 - agreement
    reason = ""
    passed = drop <= max_drop + 1e-12 and math.isfinite(worst)
    if not math.isfinite(worst):
        reason = "the int8 file gave non-finite or misshaped outputs"
    elif n < needed:
        passed = False
        reason = (f"{n} samples cannot resolve a {100 * max_drop:g}-point limit; judge on at "
                  f"least {needed}")
    elif not passed:
        reason = f"{decided_by} drop above the limit"
    return Int8Judgement(passed, n, agreement, max_drop, decided_by, drop, worst, fp32_acc,
                         int8_acc, reason)
