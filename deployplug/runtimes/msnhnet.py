"""Reference runtime for MsnhNet ``.msnhnet`` + ``.msnhbin`` files, in numpy.

Why carry our own interpreter: the real C++ runtime needs an AVX2 build tied to the build
host. This interpreter follows the semantics *measured* on that runtime (X/Y conventions,
pooling size formulas, upsample key order, the ``view`` (W, H, C) slots...) and **rejects**
every construct the real runtime miscomputes or crashes on (asymmetric conv parameters,
``pixshf``, grouped ``deconv``, padded ``maxpool``, ``varop tanh``, routes at layer 0...).
So a file this module accepts computes the same thing in MsnhNet, and a file it rejects
fails with an :class:`~deployplug.errors.ArtifactFormatError` that says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deployplug.errors import ArtifactFormatError
from deployplug.runtimes import msnhnet_ops as ops
from deployplug.runtimes.msnhnet_parse import (
    RawLayer,
    as_float,
    as_int,
    as_int_list,
    parse_text,
)

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
_UNMODELLED = frozenset({"yolo", "yoloout", "resblock", "res2block", "addblock", "concatblock",
                         "empty"})


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


class _Fields:
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


def _err(layer_where: str, message: str) -> ArtifactFormatError:
    return ArtifactFormatError(f"{layer_where}: {message}")


def parse_activation(text: str, where: str) -> Activation:
    """``name[,p1,...]``. An unknown name silently becomes relu, exactly like MsnhNet."""
    parts = [p.strip() for p in text.split(",")]
    name, raw_params = parts[0], parts[1:]
    try:
        params = tuple(float(p) for p in raw_params)
    except ValueError:
        raise _err(where, f"activation parameters must be numbers: {text!r}") from None
    if name not in ACTIVATIONS:
        return Activation("relu", (), text)  # the real runtime's silent fallback
    if name in _UNMEASURED_ACTIVATIONS:
        raise _err(where, f"activation '{name}' is not verified against a reference; "
                   "use a measured one (relu, leaky, logistic, tanh, ...)")
    if name == "elu" and params and params[0] != 1.0:
        raise _err(where, f"'elu,{raw_params[0]}': MsnhNet ignores the alpha parameter and "
                   "always computes alpha=1; write 'elu' or compose elu for other alphas")
    if name in ("leaky", "softplus"):
        if len(params) > 1:
            raise _err(where, f"'{name}' takes one parameter, got {text!r}")
    elif params and name not in ("relu6", "elu"):
        raise _err(where, f"activation '{name}' takes no parameter, got {text!r}")
    return Activation(name, params, text)


def _xy(f: _Fields, base: str, default: int, fallback_below: int = 0) -> tuple[int, int]:
    """(Y, X) = (H, W) for a field with scalar and X/Y forms.

    ``fallback_below``: X/Y values below it mean "use the scalar" (0 for most layers, 1 for
    ``localavgpool``, whose parser tests ``< 1``).
    """
    scalar = f.int(base, default)
    x = f.int(base + "X", -1)
    y = f.int(base + "Y", -1)
    return (y if y >= fallback_below else scalar), (x if x >= fallback_below else scalar)


def _act_field(f: _Fields, where: str) -> Activation:
    return parse_activation(f.str("activation", "none"), where)


class _Builder:
    """Turns raw entries into shape-checked layers, one keyword at a time."""

    def __init__(self, in_shape: Shape):
        self.in_shape = in_shape
        self.layers: list[Layer] = []

    # -- lookups ---------------------------------------------------------------------------
    def prev(self) -> tuple[Shape, bool]:
        if not self.layers:
            return self.in_shape, False
        last = self.layers[-1]
        return last.out_shape, last.opaque

    def resolve(self, index: int, current: int, where: str) -> int:
        target = current + index if index < 0 else index
        if not 0 <= target < current:
            raise _err(where, f"layer index {index} resolves to {target}, which is not an "
                       f"earlier layer (this is layer {current}); MsnhNet crashes on it")
        if self.layers[target].opaque:
            raise _err(where, f"layer {target} is a softmax, whose output shape MsnhNet "
                       "reports as 0x0x0; it cannot be referenced")
        return target

    def build(self, raw: RawLayer) -> Layer:
        index = len(self.layers)
        where = f"layer {index} ({raw.kind}, line {raw.line})"
        if raw.kind == "pixshf":
            raise _err(where, "MsnhNet's pixshf does not compute pixel shuffle (measured "
                       "3.1 off F.pixel_shuffle); use a one-hot deconv instead")
        if raw.kind in _UNMODELLED:
            raise _err(where, f"'{raw.kind}' is not modelled by the reference runtime")
        builder = getattr(self, f"_{raw.kind}", None)
        if builder is None or raw.kind == "config":
            raise _err(where, f"unknown layer keyword '{raw.kind}'")
        if raw.is_null and raw.kind != "globalavgpool":
            raise _err(where, f"[{raw.kind}] must be a map of fields (content error)")
        in_shape, opaque = self.prev()
        if opaque and raw.kind not in ("act", "connect"):
            raise _err(where, "follows a softmax, whose output MsnhNet reports as 0x0x0; "
                       "only act or connect may follow it")
        f = _Fields(raw, where)
        layer = Layer(index, raw.kind, raw.line, {}, in_shape, in_shape, opaque=False)
        builder(f, layer, where)
        if raw.kind != "globalavgpool":
            f.finish()
        if raw.kind == "act":
            layer.opaque = opaque
        layer.num_weights = sum(n for _, n in layer.block_sizes)
        self.layers.append(layer)
        return layer

    def _activation_blocks(self, layer: Layer, act: Activation, channels: int) -> None:
        layer.params["act"] = act
        if act.name == "prelu":
            layer.block_sizes.append(("slopes", channels))

    # -- layers --------------------------------------------------------------------------
    def _conv(self, f: _Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        filters = f.int("filters", 1)
        kh, kw = _xy(f, "kSize", 1)
        sh, sw = _xy(f, "stride", 1)
        ph, pw = _xy(f, "padding", 0)
        dh, dw = _xy(f, "dilation", 1)
        groups, use_bias = f.int("groups", 1), f.int("useBias", 1)
        bn, eps = f.int("batchNorm", 0), f.float("eps", 1e-5)
        act = _act_field(f, where)
        if f.int("antialiasing", 0) != 0:
            raise _err(where, "antialiasing is not modelled by the reference runtime")
        for name, (a, b) in (("kSize", (kh, kw)), ("stride", (sh, sw)), ("padding", (ph, pw)),
                             ("dilation", (dh, dw))):
            if a != b:
                raise _err(where, f"asymmetric {name} ({name}X={b}, {name}Y={a}): MsnhNet "
                           "sizes the output with X=width but computes X along height; only "
                           "square conv parameters are safe (pad explicitly + zero-filled "
                           "square kernel + slice)")
        k, s, p, d = kh, sh, ph, (1 if kh == 1 else dh)
        if min(k, s, d, filters, groups) < 1 or p < 0:
            raise _err(where, "kSize, stride, dilation, filters, groups must be >= 1, padding "
                       ">= 0")
        if c % groups or filters % groups:
            raise _err(where, f"groups={groups} must divide input channels {c} and filters "
                       f"{filters}")
        if bn and not use_bias:
            raise _err(where, "batchNorm: 1 with useBias: 0 reads a zero-sized bias buffer "
                       "in MsnhNet (undefined output); use useBias: 1")
        oh, ow = ops.conv_out(h, k, s, p, d), ops.conv_out(w, k, s, p, d)
        if oh < 1 or ow < 1:
            raise _err(where, f"kernel larger than the padded input {h}x{w}")
        layer.params.update(k=k, s=s, p=p, d=d, groups=groups, filters=filters, bn=bn,
                            use_bias=use_bias, eps=eps)
        layer.out_shape = (filters, oh, ow)
        layer.block_sizes.append(("weight", filters * (c // groups) * k * k))
        if bn:
            layer.block_sizes += [(n, filters) for n in ("scale", "bias", "mean", "var")]
        elif use_bias:
            layer.block_sizes.append(("bias", filters))
        self._activation_blocks(layer, act, filters)

    def _deconv(self, f: _Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        filters = f.int("filters", 1)
        kh, kw = _xy(f, "kSize", 1)
        sh, sw = _xy(f, "stride", 1)
        ph, pw = _xy(f, "padding", 0)
        groups, use_bias = f.int("groups", 1), f.int("useBias", 1)
        act = _act_field(f, where)
        if groups != 1:
            raise _err(where, f"deconv groups={groups}: MsnhNet reads the first group's "
                       "input channels for every group; use a block-diagonal groups=1 weight")
        if act.name == "prelu":
            raise _err(where, "prelu fused into deconv is not verified; use a separate act")
        if layer.index == 0 and h != w:
            raise _err(where, f"deconv as layer 0 checks the input as W*W*C in MsnhNet, so a "
                       f"{h}x{w} input is rejected; put a no-op 'act none' first")
        if min(kh, kw, sh, sw, filters) < 1 or min(ph, pw) < 0:
            raise _err(where, "kSize, stride, filters must be >= 1, padding >= 0")
        oh, ow = (h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw
        if oh < 1 or ow < 1:
            raise _err(where, "padding leaves an empty output")
        layer.params.update(k=(kh, kw), s=(sh, sw), p=(ph, pw), filters=filters,
                            use_bias=use_bias)
        layer.out_shape = (filters, oh, ow)
        layer.block_sizes.append(("weight", c * filters * kh * kw))
        if use_bias:
            layer.block_sizes.append(("bias", filters))
        layer.params["act"] = act

    def _connect(self, f: _Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        out = f.int("output", 0)
        use_bias, bn = f.int("useBias", 1), f.int("batchNorm", 0)
        eps = f.float("bnEps", 1e-5)
        act = _act_field(f, where)
        if out < 1:
            raise _err(where, "output must be >= 1")
        if bn and not use_bias:
            raise _err(where, "batchNorm: 1 with useBias: 0 gives undefined output in MsnhNet")
        if act.name == "prelu":
            raise _err(where, "prelu fused into connect is not verified; use a separate act")
        layer.params.update(out=out, bn=bn, use_bias=use_bias, eps=eps, act=act)
        layer.out_shape = (out, 1, 1)
        layer.block_sizes.append(("weight", out * c * h * w))
        if bn:
            layer.block_sizes += [(n, out) for n in ("scale", "mean", "var", "bias")]
        elif use_bias:
            layer.block_sizes.append(("bias", out))

    def _batchnorm(self, f: _Fields, layer: Layer, where: str) -> None:
        c = layer.in_shape[0]
        layer.params["eps"] = f.float("eps", 1e-5)
        act = _act_field(f, where)
        layer.block_sizes += [(n, c) for n in ("scale", "bias", "mean", "var")]
        self._activation_blocks(layer, act, c)

    def _act(self, f: _Fields, layer: Layer, where: str) -> None:
        if not f.has("activation"):
            raise _err(where, "act needs an 'activation' field")
        act = _act_field(f, where)
        if act.name == "prelu" and self.prev()[1]:
            raise _err(where, "prelu after a softmax has no channel count")
        self._activation_blocks(layer, act, layer.in_shape[0])

    def _pool_common(self, f: _Fields, where: str, fallback_below: int):
        kh, kw = _xy(f, "kSize", 1, fallback_below)
        sh, sw = _xy(f, "stride", 1, fallback_below)
        ph, pw = _xy(f, "padding", 0, fallback_below)
        ceil_mode = f.int("ceilMode", 0)
        if ceil_mode not in (0, 1, 2):
            raise _err(where, f"ceilMode must be 0, 1 or 2, got {ceil_mode}")
        if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
            raise _err(where, "kSize and stride must be >= 1, padding >= 0")
        return (kh, kw), (sh, sw), (ph, pw), ceil_mode

    def _maxpool(self, f: _Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        k, s, p, ceil_mode = self._pool_common(f, where, 0)
        if f.int("maxPoolDepth", 0) != 0:
            raise _err(where, "maxPoolDepth is not modelled by the reference runtime")
        f.int("outChannels", 1)
        if p != (0, 0):
            raise _err(where, f"maxpool padding {p[1]}x{p[0]}: MsnhNet's AVX maxpool drops or "
                       "corrupts padded taps (stride 1, and k2 s2); write a 'padding' layer "
                       "with paddingVal -3.4e38 and an unpadded maxpool")
        if s[0] == s[1] and k[0] != k[1]:
            raise _err(where, "non-square maxpool kernel with equal strides takes MsnhNet's "
                       "unverified AVX path")
        oh = ops.pool_out(h, k[0], s[0], 0, ceil_mode)
        ow = ops.pool_out(w, k[1], s[1], 0, ceil_mode)
        if oh < 1 or ow < 1:
            raise _err(where, f"kernel larger than the input {h}x{w}")
        if (oh - 1) * s[0] >= h or (ow - 1) * s[1] >= w:
            raise _err(where, "ceilMode leaves a window entirely outside the input")
        layer.params.update(k=k, s=s)
        layer.out_shape = (c, oh, ow)

    def _localavgpool(self, f: _Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        k, s, p, ceil_mode = self._pool_common(f, where, 1)
        oh = ops.pool_out(h, k[0], s[0], p[0], ceil_mode)
        ow = ops.pool_out(w, k[1], s[1], p[1], ceil_mode)
        if oh < 1 or ow < 1:
            raise _err(where, f"kernel larger than the padded input {h}x{w}")
        _, count = ops.avgpool_exclude_pad(np.zeros((1, h, w), np.float32), k, s, p, oh, ow)
        if (count == 0).any():
            raise _err(where, "a pooling window lies entirely in the padding")
        layer.params.update(k=k, s=s, p=p)
        layer.out_shape = (c, oh, ow)

    def _globalavgpool(self, f: _Fields, layer: Layer, where: str) -> None:
        layer.out_shape = (layer.in_shape[0], 1, 1)  # MsnhNet ignores any fields here

    def _padding(self, f: _Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        t, d, left, r = (f.int(k, 0) for k in ("top", "down", "left", "right"))
        if min(t, d, left, r) < 0:
            raise _err(where, "padding amounts must be >= 0")
        layer.params.update(pads=(t, d, left, r), value=f.float("paddingVal", 0.0))
        layer.out_shape = (c, h + t + d, w + left + r)

    def _route(self, f: _Fields, layer: Layer, where: str) -> None:
        if layer.index == 0:
            raise _err(where, "a route cannot be layer 0 (MsnhNet crashes)")
        if not f.has("layers"):
            raise _err(where, "route needs 'layers'")
        idx = [self.resolve(i, layer.index, where)
               for i in as_int_list(f.str("layers", ""), "layers", where)]
        add = f.int("addModel", 0)
        if f.int("groups", 1) != 1 or f.int("groupsId", 0) != 0:
            raise _err(where, "route groups/groupsId: MsnhNet reports the un-sliced channel "
                       "count, so the next layer misreads its input; slice another way")
        act = _act_field(f, where)
        if act.name == "prelu":
            raise _err(where, "prelu fused into route is not verified")
        shapes = [self.layers[i].out_shape for i in idx]
        if add:
            if len(idx) < 2:
                raise _err(where, "addModel: 1 needs at least 2 layers")
            if len(set(shapes)) != 1:
                raise _err(where, f"addModel: 1 needs equal shapes, got {shapes}")
            out = shapes[0]
        elif len(idx) == 1:
            out = shapes[0]
        else:
            if len({s[1:] for s in shapes}) != 1:
                raise _err(where, f"concatenation needs equal H and W, got {shapes}")
            out = (sum(s[0] for s in shapes), shapes[0][1], shapes[0][2])
        layer.params.update(layers=idx, add=add, act=act)
        layer.out_shape = out

    def _varop(self, f: _Fields, layer: Layer, where: str) -> None:
        kind = f.str("type", "")
        const = f.float("constVal", 0.0)
        idx_text = f.str("layers", "")
        raw_idx = as_int_list(idx_text, "layers", where) if idx_text else []
        if kind == "tanh":
            raise _err(where, "varop tanh computes tan in MsnhNet; use 'act activation: tanh'")
        if kind not in VAROP_BINARY | VAROP_CONST | VAROP_UNARY:
            raise _err(where, f"unknown varop type {kind!r}")
        idx = [self.resolve(i, layer.index, where) for i in raw_idx]
        if kind in VAROP_BINARY:
            if len(idx) not in (1, 2):
                raise _err(where, f"binary varop '{kind}' needs 1 or 2 layer indices")
            if layer.index - 1 in idx:
                raise _err(where, f"varop layers {raw_idx} name the previous layer; with one "
                           "index the previous layer is already operand A, with two neither "
                           "may be the previous layer")
            shapes = [self.layers[i].out_shape for i in idx]
            if len(idx) == 1:
                if self.prev()[1]:
                    raise _err(where, "varop cannot follow a softmax (0x0x0 output)")
                shapes.insert(0, layer.in_shape)
            if len(set(shapes)) != 1:
                raise _err(where, f"varop needs equal shapes (no broadcasting), got {shapes}")
            layer.out_shape = shapes[0]
        elif idx:
            raise _err(where, f"varop '{kind}' operates on the previous layer and takes no "
                       "layer indices")
        layer.params.update(type=kind, layers=idx, const=const)

    def _softmax(self, f: _Fields, layer: Layer, where: str) -> None:
        groups, temp = f.int("groups", 1), f.float("temperature", 1.0)
        total = int(np.prod(layer.in_shape))
        if groups < 1 or total % groups:
            raise _err(where, f"groups={groups} must divide C*H*W={total}")
        if temp == 0:
            raise _err(where, "temperature must be non-zero")
        layer.params.update(groups=groups, temperature=temp)
        layer.opaque = True

    def _upsample(self, f: _Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        st = {"type": "nearest", "stride": 1, "strideX": -1, "strideY": -1, "scale": 1.0,
              "scaleX": -1.0, "scaleY": -1.0, "alignCorners": 0}
        for key, value in f.raw.items:  # the parser's fallback runs after every key
            if key not in st:
                raise _err(where, f"'{key}' is not supported in [upsample]")
            st[key] = value if key == "type" else (
                as_float(value, key, where) if key.startswith("scale")
                else as_int(value, key, where))
            if st["strideX"] < 0 or st["strideY"] < 0:
                st["strideX"] = st["strideY"] = st["stride"]
            if st["scaleX"] < 0 or st["scaleY"] < 0:
                st["scaleX"] = st["scaleY"] = st["scale"]
        f.used.update(f.data)
        if st["type"] == "nearest":
            if st["scaleX"] != 1.0:
                raise _err(where, f"nearest upsample multiplies every value by scaleX "
                           f"({st['scaleX']}) in MsnhNet; write scaleX 1.0")
            if st["strideX"] < 1 or st["strideY"] < 1:
                raise _err(where, "nearest upsample strides must be >= 1")
            out = (c, h * st["strideY"], w * st["strideX"])
        elif st["type"] == "bilinear":
            oh = int(np.float32(h) * np.float32(st["scaleY"]))
            ow = int(np.float32(w) * np.float32(st["scaleX"]))
            if oh < 1 or ow < 1:
                raise _err(where, "bilinear scale gives an empty output")
            out = (c, oh, ow)
        else:
            raise _err(where, f"upsample type must be nearest or bilinear, got {st['type']!r}")
        layer.params.update(type=st["type"], align=bool(st["alignCorners"]))
        layer.out_shape = out

    def _dims(self, f: _Fields, default: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(f.int(f"dim{i}", default[i]) for i in range(3))  # type: ignore[return-value]

    def _view(self, f: _Fields, layer: Layer, where: str) -> None:
        d0, d1, d2 = self._dims(f, (-1, -1, -1))
        if min(d0, d1, d2) < 1:
            raise _err(where, "view needs all of dim0, dim1, dim2 >= 1")
        if d0 * d1 * d2 != int(np.prod(layer.in_shape)):
            raise _err(where, f"view {d0},{d1},{d2} does not hold {layer.in_shape}")
        layer.out_shape = (d2, d1, d0)  # MsnhNet fills (W, H, C) from (dim0, dim1, dim2)

    def _permute(self, f: _Fields, layer: Layer, where: str) -> None:
        dims = self._dims(f, (0, 1, 2))
        if sorted(dims) != [0, 1, 2]:
            raise _err(where, f"permute dims {dims} are not a permutation of 0,1,2")
        layer.params["dims"] = dims
        layer.out_shape = tuple(layer.in_shape[d] for d in dims)  # type: ignore[assignment]

    def _reduction(self, f: _Fields, layer: Layer, where: str) -> None:
        kind, axis = f.str("type", "sum"), f.int("axis", -1)
        if kind not in ("sum", "mean"):
            raise _err(where, f"reduction type must be sum or mean, got {kind!r}")
        if axis not in (0, 1, 2):
            raise _err(where, f"reduction axis must be 0, 1 or 2 (C/H/W), got {axis}")
        layer.params.update(type=kind, axis=axis)
        out = list(layer.in_shape)
        out[axis] = 1
        layer.out_shape = tuple(out)  # type: ignore[assignment]

    def _slice(self, f: _Fields, layer: Layer, where: str) -> None:
        starts = [f.int(f"start{i}", 0) for i in range(3)]
        steps = [f.int(f"step{i}", 1) for i in range(3)]
        if min(steps) < 1 or min(starts) < 0:
            raise _err(where, "slice starts must be >= 0 and steps >= 1")
        out = tuple(len(range(s, n, t)) for s, n, t in zip(starts, layer.in_shape, steps))
        if min(out) < 1:
            raise _err(where, f"slice leaves an empty output from {layer.in_shape}")
        layer.params.update(starts=starts, steps=steps)
        layer.out_shape = out  # type: ignore[assignment]

    def _clip(self, f: _Fields, layer: Layer, where: str) -> None:
        lo, hi = f.float("min", -ops.FLT_MAX), f.float("max", ops.FLT_MAX)
        if lo > hi:
            raise _err(where, f"clip min {lo} > max {hi}")
        layer.params.update(min=lo, max=hi)


def _apply_act(y: np.ndarray, layer: Layer) -> np.ndarray:
    act: Activation = layer.params.get("act", Activation("none"))
    return ops.activation(y, act.name, list(act.params), layer.blocks.get("slopes"))


def _run_conv(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    y = ops.conv2d(x, layer.blocks["weight"].reshape(p["filters"], -1, p["k"], p["k"]),
                   (p["k"],) * 2, (p["s"],) * 2, (p["p"],) * 2, (p["d"],) * 2, p["groups"])
    if p["bn"]:
        b = layer.blocks
        scale = b["scale"] / np.sqrt(b["var"] + np.float32(p["eps"]))
        y = (y - b["mean"][:, None, None]) * scale[:, None, None] + b["bias"][:, None, None]
    elif p["use_bias"]:
        y = y + layer.blocks["bias"][:, None, None]
    return _apply_act(y.astype(np.float32), layer)


def _run_deconv(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    w = layer.blocks["weight"].reshape(x.shape[0], p["filters"], *p["k"])
    y = ops.deconv2d(x, w, p["k"], p["s"], p["p"])
    if p["use_bias"]:
        y = y + layer.blocks["bias"][:, None, None]
    return _apply_act(y, layer)


def _run_connect(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    p, b = layer.params, layer.blocks
    w = b["weight"].reshape(p["out"], -1).astype(np.float64)
    y = (w @ x.reshape(-1).astype(np.float64)).astype(np.float32)
    if p["bn"]:
        y = (y - b["mean"]) * (b["scale"] / np.sqrt(b["var"] + np.float32(p["eps"]))) + b["bias"]
    elif p["use_bias"]:
        y = y + b["bias"]
    return _apply_act(y.reshape(p["out"], 1, 1).astype(np.float32), layer)


def _run_batchnorm(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    b = layer.blocks
    scale = b["scale"] / np.sqrt(b["var"] + np.float32(layer.params["eps"]))
    y = (x - b["mean"][:, None, None]) * scale[:, None, None] + b["bias"][:, None, None]
    return _apply_act(y.astype(np.float32), layer)


def _run_route(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    parts = [outs[i] for i in layer.params["layers"]]
    y = np.sum(parts, axis=0) if layer.params["add"] else np.concatenate(parts, axis=0)
    return _apply_act(y.astype(np.float32), layer)


def _run_varop(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    kind = p["type"]
    if kind in VAROP_BINARY:
        ops_in = [x] + [outs[i] for i in p["layers"]] if len(p["layers"]) == 1 else [
            outs[i] for i in p["layers"]]
        return ops.varop_binary(kind, ops_in[0], ops_in[1])
    if kind in VAROP_CONST:
        return ops.varop_const(kind, x, p["const"])
    return ops.varop_unary(kind, x, p["const"])


def _run_softmax(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    flat = x.reshape(p["groups"], -1).astype(np.float64) / p["temperature"]
    e = np.exp(flat - flat.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).reshape(x.shape).astype(np.float32)


def _run_upsample(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    _, oh, ow = layer.out_shape
    if layer.params["type"] == "nearest":
        return x.repeat(oh // x.shape[1], axis=1).repeat(ow // x.shape[2], axis=2)
    return ops.bilinear(x, oh, ow, layer.params["align"])


def _run_reduction(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    fn = np.sum if layer.params["type"] == "sum" else np.mean
    return fn(x.astype(np.float64), axis=layer.params["axis"], keepdims=True).astype(np.float32)


def _run_slice(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    (a, b, c), (s, t, u) = layer.params["starts"], layer.params["steps"]
    return x[a::s, b::t, c::u]


def _run_padding(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    t, d, left, r = layer.params["pads"]
    return np.pad(x, ((0, 0), (t, d), (left, r)),
                  constant_values=np.float32(layer.params["value"]))


def _run_localavgpool(layer: Layer, x: np.ndarray, outs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    return ops.avgpool_exclude_pad(x, p["k"], p["s"], p["p"], *layer.out_shape[1:])[0]


_RUNNERS: dict[str, Callable[[Layer, np.ndarray, list[np.ndarray]], np.ndarray]] = {
    "conv": _run_conv,
    "deconv": _run_deconv,
    "connect": _run_connect,
    "batchnorm": _run_batchnorm,
    "act": lambda layer, x, outs: _apply_act(x, layer),
    "maxpool": lambda layer, x, outs: ops.maxpool(x, layer.params["k"], layer.params["s"],
                                                  *layer.out_shape[1:]),
    "localavgpool": _run_localavgpool,
    "globalavgpool": lambda layer, x, outs: x.astype(np.float64).mean(
        axis=(1, 2), keepdims=True).astype(np.float32),
    "padding": _run_padding,
    "route": _run_route,
    "varop": _run_varop,
    "softmax": _run_softmax,
    "upsample": _run_upsample,
    "view": lambda layer, x, outs: x.reshape(layer.out_shape),
    "permute": lambda layer, x, outs: x.transpose(layer.params["dims"]),
    "reduction": _run_reduction,
    "slice": _run_slice,
    "clip": lambda layer, x, outs: np.clip(x, np.float32(layer.params["min"]),
                                           np.float32(layer.params["max"])),
}


@dataclass
class MsnhNetModel:
    """A loaded network: ``run`` executes it sample by sample, like ``runClassify``."""

    batch: int
    in_shape: Shape
    layers: list[Layer]

    @property
    def out_shape(self) -> Shape:
        return self.layers[-1].out_shape

    def run(self, x: np.ndarray, keep_all: bool = False) -> np.ndarray | list[np.ndarray]:
        """Run (N, C, H, W) float32 input; N must equal the ``config`` batch.

        With ``keep_all`` every layer's output is returned, as (N, C, H, W) arrays in layer
        order (index i = layer i), which is what per-layer debugging needs.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.in_shape or x.shape[0] != self.batch:
            raise ArtifactFormatError(
                f"input shape {x.shape} does not match config batch {self.batch} and "
                f"C,H,W {self.in_shape}"
            )
        per_layer: list[list[np.ndarray]] = [[] for _ in self.layers]
        for sample in x:
            outs: list[np.ndarray] = []
            cur = sample
            for layer in self.layers:
                cur = _RUNNERS[layer.kind](layer, cur, outs).astype(np.float32, copy=False)
                outs.append(cur)
            for i, out in enumerate(outs):
                per_layer[i].append(out)
        stacked = [np.stack(p) for p in per_layer]
        return stacked if keep_all else stacked[-1]


def build(text: str, source: str = "<msnhnet>") -> MsnhNetModel:
    """Parse and shape-check a ``.msnhnet`` text (weights not loaded)."""
    entries = parse_text(text, source)
    config, raw_layers = entries[0], entries[1:]
    f = _Fields(config, f"{source}: [config]")
    batch = f.int("batch", 1)
    shape = (f.int("channels", 0), f.int("height", 0), f.int("width", 0))
    f.finish()
    if batch < 1 or min(shape) < 1:
        raise ArtifactFormatError(f"{source}: config needs batch, channels, height, width >= 1, "
                                  f"got batch {batch} and C,H,W {shape}")
    if not raw_layers:
        raise ArtifactFormatError(f"{source}: the network has no layers")
    builder = _Builder(shape)  # type: ignore[arg-type]
    for raw in raw_layers:
        builder.build(raw)
    return MsnhNetModel(batch, shape, builder.layers)  # type: ignore[arg-type]


def read_weights(path: Path) -> np.ndarray:
    data = Path(path).read_bytes()
    if not data:
        raise ArtifactFormatError(f"{path}: the weight file is empty (MsnhNet rejects a 0-byte "
                                  ".msnhbin even for a weight-free graph)")
    if len(data) % 4:
        raise ArtifactFormatError(f"{path}: size {len(data)} bytes is not a multiple of 4")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def attach_weights(model: MsnhNetModel, weights: np.ndarray, source: str = "<msnhbin>") -> None:
    """Hand out the flat float array in layer order; the count must match exactly."""
    need = sum(layer.num_weights for layer in model.layers)
    if need > weights.size:
        raise ArtifactFormatError(f"{source}: the graph needs {need} floats but the weight "
                                  f"file holds {weights.size} (need > given)")
    if need != weights.size:
        raise ArtifactFormatError(f"{source}: the graph needs {need} floats but the weight "
                                  f"file holds {weights.size} (need != given)")
    offset = 0
    for layer in model.layers:
        layer.blocks = {}
        for name, n in layer.block_sizes:
            layer.blocks[name] = weights[offset:offset + n]
            offset += n


def load(msnhnet_path: str | Path, msnhbin_path: str | Path) -> MsnhNetModel:
    """Load a ``.msnhnet`` graph and its ``.msnhbin`` weights."""
    msnhnet_path, msnhbin_path = Path(msnhnet_path), Path(msnhbin_path)
    model = build(msnhnet_path.read_text(), str(msnhnet_path.name))
    attach_weights(model, read_weights(msnhbin_path), str(msnhbin_path.name))
    return model


__all__ = ["ACTIVATIONS", "Layer", "MsnhNetModel", "attach_weights", "build", "load",
           "parse_activation", "read_weights"]
