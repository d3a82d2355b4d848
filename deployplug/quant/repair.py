"""The repairs an int8 export can apply, and the order ``int8_repair="auto"`` tries them in.

* ``none``: plain post-training quantization at the requested weight granularity.
* ``equalize``: cross-layer equalization first (:mod:`.equalization`); free at run time.
* ``keep_float``: the k riskiest layers of the report keep float weights (mixed precision);
  each costs a float convolution at run time.
* ``equalize+keep_float``: both.

Per-channel weights are not a repair here but the ``int8_weights`` setting: they are used
whenever the target allows them. ``auto`` tries the candidates from cheapest to dearest
(fewest float layers first; at equal count, without equalization first) and keeps the first
that meets the drop limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deployplug.errors import ConfigError

REPAIRS = ("none", "equalize", "keep_float", "equalize+keep_float", "auto")
#: float-layer counts ``auto`` tries, cheapest first
AUTO_FLOAT_COUNTS = (1, 2, 3, 5, 8, 13)
DEFAULT_MAX_FLOAT = 8
DEFAULT_KEEP_FLOAT = 5


@dataclass(frozen=True)
class Plan:
    """One candidate: equalize or not, and which layers keep float weights."""

    equalize: bool = False
    float_count: int = 0
    float_paths: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        parts = ["equalize"] if self.equalize else []
        if self.float_paths:
            parts.append("keep_float:" + ",".join(self.float_paths))
        elif self.float_count:
            parts.append(f"keep_float:{self.float_count}")
        return "+".join(parts) or "none"


def plans(repair: str, float_layers: int | Sequence[str] | None = None,
          max_float: int = DEFAULT_MAX_FLOAT, layer_count: int | None = None) -> list[Plan]:
    """The candidates ``repair`` stands for, in the order they are tried.

    ``float_layers`` is the count (riskiest first) or the module paths kept in float by
    ``keep_float``; ``max_float`` bounds what ``auto`` may keep in float; ``layer_count``
    (the quantized layers of the model) caps both, since keeping every layer in float is not
    an int8 model.
    """
    if repair not in REPAIRS:
        raise ConfigError(f"int8_repair={repair!r}: use one of {', '.join(REPAIRS)}")
    if max_float < 0:
        raise ConfigError(f"int8_max_float must be >= 0, got {max_float}")
    limit = max(0, layer_count - 1) if layer_count is not None else None
    if repair == "none":
        return [Plan()]
    if repair == "equalize":
        return [Plan(equalize=True)]
    if repair == "auto":
        counts = [k for k in AUTO_FLOAT_COUNTS if k <= max_float and (limit is None or k <= limit)]
        found = [Plan(), Plan(equalize=True)]
        for k in counts:
            found += [Plan(float_count=k), Plan(equalize=True, float_count=k)]
        return found
    equalize = repair.startswith("equalize")
    if float_layers is None:
        float_layers = DEFAULT_KEEP_FLOAT
    if isinstance(float_layers, int):
        if float_layers < 1:
            raise ConfigError(f"int8_float_layers={float_layers}: keep at least one layer in "
                              "float, or use int8_repair='none'")
        count = float_layers if limit is None else min(float_layers, limit)
        return [Plan(equalize=equalize, float_count=count)]
    paths = tuple(str(p) for p in float_layers)
    if not paths:
        raise ConfigError("int8_float_layers is empty: name the layers to keep in float")
    return [Plan(equalize=equalize, float_paths=paths)]
