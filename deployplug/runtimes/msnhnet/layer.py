"""What a parsed MsnhNet layer is, and typed access to the fields it was written with.

Shared by the shape checker (:mod:`.builder`) and the executor (:mod:`.executor`), so both
agree on the layer record, the known activation and ``varop`` names, and on how a field's
text becomes a number. Unknown keys are rejected when a layer's fields are finished, since
a key the interpreter does not model could change what the real runtime computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployplug.errors import ArtifactFormatError
from deployplug.runtimes.msnhnet.parse import RawLayer, as_float, as_int

Shape = tuple[int, int, int]

ACTIVATIONS = frozenset({
    "logistic", "swish", "hardswish", "mish", "relu", "prelu", "relu6", "elu", "selu",
    "leaky", "tanh", "softplus", "none", "loggy", "relie", "plse", "hardtan", "lhtan", "ramp",
    "stair", "normalize_channels", "normalize_channels_softmax",
    "normalize_channels_softmax_maxval",
})
# Accepted by MsnhNet but never measured against a reference: refusing them keeps the
# promise that an accepted file computes what this interpreter computes.
_UNMEASURED_ACTIVATIONS = frozenset({
    "loggy", "relie", "plse", "lhtan", "ramp", "stair", "normalize_channels",
    "normalize_channels_softmax", "normalize_channels_softmax_maxval",
})
VAROP_BINARY = frozenset({"add", "sub", "subInv", "mul", "div", "divInv"})
VAROP_CONST = frozenset({"addConst", "subConst", "subConstInv", "mulConst", "divConst",
                         "divConstInv"})
VAROP_UNARY = frozenset({"abs", "acos", "asin", "atan", "cos", "cosh", "sin", "sinh", "tan",
                         "tanh", "exp", "pow", "log", "log10", "sqrt"})


@dataclass(frozen=True)
class Activation:
    name: str
    params: tuple[float, ...] = ()
    text: str = "none"


@dataclass
class Layer:
    """One parsed, shape-checked layer."""

    index: int
    kind: str
    line: int
    params: dict[str, Any]
    in_shape: Shape
    out_shape: Shape
    num_weights: int = 0
    #: softmax reports a 0x0x0 output; consumers that need a shape cannot follow it
    opaque: bool = False
    blocks: dict[str, np.ndarray] = field(default_factory=dict)
    block_sizes: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        return f"layer {self.index} ({self.kind}, line {self.line})"


class Fields:
    """Typed access to one layer's fields; unknown keys are rejected on ``finish``."""

    def __init__(self, raw: RawLayer, where: str):
        self.raw, self.where, self.data = raw, where, raw.fields
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data

    def int(self, key: str, default: int) -> int:
        self.used.add(key)
        return as_int(self.data[key], key, self.where) if key in self.data else default

    def float(self, key: str, default: float) -> float:
        self.used.add(key)
        return as_float(self.data[key], key, self.where) if key in self.data else default

    def str(self, key: str, default: str) -> str:
        self.used.add(key)
        return self.data.get(key, default)

    def finish(self) -> None:
        unknown = [k for k in self.data if k not in self.used]
        if unknown:
            raise ArtifactFormatError(
                f"{self.where}: {', '.join(map(repr, unknown))} is not supported in "
                f"[{self.raw.kind}]"
            )


def err(layer_where: str, message: str) -> ArtifactFormatError:
    return ArtifactFormatError(f"{layer_where}: {message}")


def parse_activation(text: str, where: str) -> Activation:
    """``name[,p1,...]``. An unknown name silently becomes relu, exactly like MsnhNet."""
    parts = [p.strip() for p in text.split(",")]
    name, raw_params = parts[0], parts[1:]
    try:
        params = tuple(float(p) for p in raw_params)
    except ValueError:
        raise err(where, f"activation parameters must be numbers: {text!r}") from None
    if not all(math.isfinite(v) for v in params):
        raise err(where, f"activation parameters must be finite: {text!r}")
    if name not in ACTIVATIONS:
        return Activation("relu", (), text)  # the real runtime's silent fallback
    if name in _UNMEASURED_ACTIVATIONS:
        raise err(where, f"activation '{name}' is not verified against a reference; "
                   "use a measured one (relu, leaky, logistic, tanh, ...)")
    if name == "elu" and params and params[0] != 1.0:
        raise err(where, f"'elu,{raw_params[0]}': MsnhNet ignores the alpha parameter and "
                   "always computes alpha=1; write 'elu' or compose elu for other alphas")
    if name in ("leaky", "softplus"):
        if len(params) > 1:
            raise err(where, f"'{name}' takes one parameter, got {text!r}")
    elif params and name not in ("relu6", "elu"):
        raise err(where, f"activation '{name}' takes no parameter, got {text!r}")
    return Activation(name, params, text)


def xy(f: Fields, base: str, default: int, fallback_below: int = 0) -> tuple[int, int]:
    """(Y, X) = (H, W) for a field with scalar and X/Y forms.

    ``fallback_below``: X/Y values below it mean "use the scalar" (0 for most layers, 1 for
    ``localavgpool``, whose parser tests ``< 1``).
    """
    scalar = f.int(base, default)
    x = f.int(base + "X", -1)
    y = f.int(base + "Y", -1)
    return (y if y >= fallback_below else scalar), (x if x >= fallback_below else scalar)


def act_field(f: Fields, where: str) -> Activation:
    return parse_activation(f.str("activation", "none"), where)


