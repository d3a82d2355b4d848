"""MsnhNet layers as data, and their rendering to ``.msnhnet`` text and ``.msnhbin`` bytes.

The text is written the way the C++ parser wants it: ``config`` first, one top-level keyword
per layer (keys repeat, which is why it is rendered by hand rather than by a YAML library),
a ``#index`` comment before each layer for people reading it, and floats printed with enough
digits to round-trip through float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MLayer:
    """One MsnhNet layer: keyword, fields in the order they must be written, weight blocks."""

    kind: str
    fields: list[tuple[str, Any]] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    #: the graph node this layer was lowered from (for per-layer comparison)
    node: str | None = None

    @property
    def num_weights(self) -> int:
        return int(sum(w.size for w in self.weights))


def format_value(value: Any) -> str:
    """Ints as ints, floats as the shortest text that parses back to the same float32."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        f32 = np.float32(value)
        if not np.isfinite(f32):
            raise ValueError(f"cannot write the non-finite value {value!r}")
        if f32 == 0 or 1e-4 <= abs(f32) < 1e16:
            return np.format_float_positional(f32, unique=True, trim="0")
        return np.format_float_scientific(f32, unique=True, trim="0")
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def render_text(layers: list[MLayer], batch: int, shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    lines = ["config:", f"  batch: {batch}", f"  channels: {c}", f"  height: {h}",
             f"  width: {w}"]
    for i, layer in enumerate(layers):
        note = f"  {layer.node}" if layer.node else ""
        lines.append(f"#{i}{note}")
        lines.append(f"{layer.kind}:")
        lines += [f"  {key}: {format_value(value)}" for key, value in layer.fields]
    return "\n".join(lines) + "\n"


def render_bin(layers: list[MLayer]) -> bytes:
    blocks = [np.asarray(w, dtype="<f4").reshape(-1) for layer in layers for w in layer.weights]
    if not blocks:
        return b""
    return np.concatenate(blocks).astype("<f4").tobytes()
