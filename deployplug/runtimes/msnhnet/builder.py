"""Shape checking: raw ``.msnhnet`` entries become layers with known in/out shapes.

This is where the reference runtime earns its keep: every construct the real runtime
miscomputes or crashes on (asymmetric conv parameters, ``pixshf``, grouped ``deconv``, padded
``maxpool``, ``varop tanh``, routes at layer 0...) is refused here with the reason, before
anything runs. One method per layer keyword, so each keyword's rules read in one place.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deployplug.limits import INT32_MAX, Limits, current
from deployplug.runtimes.msnhnet import ops
from deployplug.runtimes.msnhnet.layer import (
    VAROP_BINARY,
    VAROP_CONST,
    VAROP_UNARY,
    Activation,
    Fields,
    Layer,
    Shape,
    act_field,
    err,
    xy,
)
from deployplug.runtimes.msnhnet.parse import RawLayer, as_float, as_int, as_int_list

_UNMODELLED = frozenset({"yolo", "yoloout", "resblock", "res2block", "addblock", "concatblock",
                         "empty"})


_F32, _F64 = 4, 8


def _pool_work(in_shape: Shape, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int],
               oh: int, ow: int) -> int:
    """Bytes the pooling kernels allocate: the padded float64 copy, a mask, two sums."""
    c = in_shape[0]
    need_h = max((oh - 1) * s[0] + k[0], in_shape[1] + 2 * p[0])
    need_w = max((ow - 1) * s[1] + k[1], in_shape[2] + 2 * p[1])
    return (c + 1) * need_h * need_w * _F64 + (c + 1) * oh * ow * _F64 * 2


def _work_bytes(layer: Layer) -> int:
    """Scratch memory the executor needs for one sample of ``layer`` (beyond its output)."""
    c, h, w = layer.in_shape
    out = math.prod(layer.out_shape)
    p = layer.params
    if layer.kind == "conv":
        k, pad = p["k"], p["p"]
        oh, ow = layer.out_shape[1:]
        padded = c * (h + 2 * pad) * (w + 2 * pad) * _F32
        cols = c * k * k * oh * ow * (_F32 + _F64)  # im2col and its float64 copy
        return padded + cols + out * _F64 * 2 + layer.num_weights * _F64
    if layer.kind == "deconv":
        (kh, kw), (sh, sw) = p["k"], p["s"]
        full = layer.out_shape[0] * ((h - 1) * sh + kh) * ((w - 1) * sw + kw) * _F64
        return full + (c * h * w + layer.out_shape[0] * h * w * 2) * _F64
    if layer.kind == "connect":
        return layer.num_weights * _F64 + c * h * w * _F64 + out * _F64
    if layer.kind in ("maxpool", "localavgpool"):
        return _pool_work(layer.in_shape, p["k"], p["s"], p.get("p", (0, 0)),
                          *layer.out_shape[1:])
    return (c * h * w + out) * _F64 * 3  # float64 copies made by the elementwise kernels


class Builder:
    """Turns raw entries into shape-checked layers, one keyword at a time.

    Every layer's declared sizes are charged against the tensor budget
    (:mod:`deployplug.limits`) as it is built: its output for the whole batch (the executor
    keeps every layer's output), its weights, and the scratch memory its kernel needs. A file
    that declares more than the budget is refused here, before anything of that size exists.
    """

    def __init__(self, in_shape: Shape, batch: int = 1, limits: Limits | None = None):
        self.in_shape = in_shape
        self.batch = batch
        self.limits = limits or current()
        self.layers: list[Layer] = []
        self.activation_bytes = self.limits.check_tensor(
            (batch, *in_shape), _F32, "[config] input (batch, channels, height, width)")
        self.weight_bytes = 0

    # -- lookups ---------------------------------------------------------------------------
    def prev(self) -> tuple[Shape, bool]:
        if not self.layers:
            return self.in_shape, False
        last = self.layers[-1]
        return last.out_shape, last.opaque

    def resolve(self, index: int, current: int, where: str) -> int:
        target = current + index if index < 0 else index
        if not 0 <= target < current:
            raise err(where, f"layer index {index} resolves to {target}, which is not an "
                       f"earlier layer (this is layer {current}); MsnhNet crashes on it")
        if self.layers[target].opaque:
            raise err(where, f"layer {target} is a softmax, whose output shape MsnhNet "
                       "reports as 0x0x0; it cannot be referenced")
        return target

    def build(self, raw: RawLayer) -> Layer:
        index = len(self.layers)
        where = f"layer {index} ({raw.kind}, line {raw.line})"
        if raw.kind == "pixshf":
            raise err(where, "MsnhNet's pixshf does not compute pixel shuffle (measured "
                       "3.1 off F.pixel_shuffle); use a one-hot deconv instead")
        if raw.kind in _UNMODELLED:
            raise err(where, f"'{raw.kind}' is not modelled by the reference runtime")
        builder = getattr(self, f"_{raw.kind}", None)
        if builder is None or raw.kind == "config":
            raise err(where, f"unknown layer keyword '{raw.kind}'")
        if raw.is_null and raw.kind != "globalavgpool":
            raise err(where, f"[{raw.kind}] must be a map of fields (content error)")
        in_shape, opaque = self.prev()
        if opaque and raw.kind not in ("act", "connect"):
            raise err(where, "follows a softmax, whose output MsnhNet reports as 0x0x0; "
                       "only act or connect may follow it")
        f = Fields(raw, where)
        layer = Layer(index, raw.kind, raw.line, {}, in_shape, in_shape, opaque=False)
        builder(f, layer, where)
        if raw.kind != "globalavgpool":
            f.finish()
        if raw.kind == "act":
            layer.opaque = opaque
        layer.num_weights = sum(n for _, n in layer.block_sizes)
        self._charge(layer, where)
        self.layers.append(layer)
        return layer

    def _charge(self, layer: Layer, where: str) -> None:
        """Refuse a layer whose output, weights or scratch memory pass the budget."""
        if any(d < 1 or d > INT32_MAX for d in layer.out_shape):
            raise err(where, f"output shape {list(layer.out_shape)} is empty or does not fit "
                       "MsnhNet's 32-bit sizes")
        self.activation_bytes += self.batch * math.prod(layer.out_shape) * _F32
        self.weight_bytes += layer.num_weights * _F32
        # outputs are kept per sample and stacked at the end (x2); weights are read and copied
        total = 2 * self.activation_bytes + 2 * self.weight_bytes + _work_bytes(layer)
        self.limits.check_total(
            total, f"{where}: the network up to this layer (output "
                   f"{list(layer.out_shape)}, {layer.num_weights} weights)")

    def _activation_blocks(self, layer: Layer, act: Activation, channels: int) -> None:
        layer.params["act"] = act
        if act.name == "prelu":
            layer.block_sizes.append(("slopes", channels))

    # -- layers --------------------------------------------------------------------------
    def _conv(self, f: Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        filters = f.int("filters", 1)
        kh, kw = xy(f, "kSize", 1)
        sh, sw = xy(f, "stride", 1)
        ph, pw = xy(f, "padding", 0)
        dh, dw = xy(f, "dilation", 1)
        groups, use_bias = f.int("groups", 1), f.int("useBias", 1)
        bn, eps = f.int("batchNorm", 0), f.float("eps", 1e-5)
        act = act_field(f, where)
        if f.int("antialiasing", 0) != 0:
            raise err(where, "antialiasing is not modelled by the reference runtime")
        for name, (a, b) in (("kSize", (kh, kw)), ("stride", (sh, sw)), ("padding", (ph, pw)),
                             ("dilation", (dh, dw))):
            if a != b:
                raise err(where, f"asymmetric {name} ({name}X={b}, {name}Y={a}): MsnhNet "
                           "sizes the output with X=width but computes X along height; only "
                           "square conv parameters are safe (pad explicitly + zero-filled "
                           "square kernel + slice)")
        k, s, p, d = kh, sh, ph, (1 if kh == 1 else dh)
        if min(k, s, d, filters, groups) < 1 or p < 0:
            raise err(where, "kSize, stride, dilation, filters, groups must be >= 1, padding "
                       ">= 0")
        if c % groups or filters % groups:
            raise err(where, f"groups={groups} must divide input channels {c} and filters "
                       f"{filters}")
        if bn and not use_bias:
            raise err(where, "batchNorm: 1 with useBias: 0 reads a zero-sized bias buffer "
                       "in MsnhNet (undefined output); use useBias: 1")
        oh, ow = ops.conv_out(h, k, s, p, d), ops.conv_out(w, k, s, p, d)
        if oh < 1 or ow < 1:
            raise err(where, f"kernel larger than the padded input {h}x{w}")
        layer.params.update(k=k, s=s, p=p, d=d, groups=groups, filters=filters, bn=bn,
                            use_bias=use_bias, eps=eps)
        layer.out_shape = (filters, oh, ow)
        layer.block_sizes.append(("weight", filters * (c // groups) * k * k))
        if bn:
            layer.block_sizes += [(n, filters) for n in ("scale", "bias", "mean", "var")]
        elif use_bias:
            layer.block_sizes.append(("bias", filters))
        self._activation_blocks(layer, act, filters)

    def _deconv(self, f: Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        filters = f.int("filters", 1)
        kh, kw = xy(f, "kSize", 1)
        sh, sw = xy(f, "stride", 1)
        ph, pw = xy(f, "padding", 0)
        groups, use_bias = f.int("groups", 1), f.int("useBias", 1)
        act = act_field(f, where)
        if groups != 1:
            raise err(where, f"deconv groups={groups}: MsnhNet reads the first group's "
                       "input channels for every group; use a block-diagonal groups=1 weight")
        if act.name == "prelu":
            raise err(where, "prelu fused into deconv is not verified; use a separate act")
        if layer.index == 0 and h != w:
            raise err(where, f"deconv as layer 0 checks the input as W*W*C in MsnhNet, so a "
                       f"{h}x{w} input is rejected; put a no-op 'act none' first")
        if min(kh, kw, sh, sw, filters) < 1 or min(ph, pw) < 0:
            raise err(where, "kSize, stride, filters must be >= 1, padding >= 0")
        oh, ow = (h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw
        if oh < 1 or ow < 1:
            raise err(where, "padding leaves an empty output")
        layer.params.update(k=(kh, kw), s=(sh, sw), p=(ph, pw), filters=filters,
                            use_bias=use_bias)
        layer.out_shape = (filters, oh, ow)
        layer.block_sizes.append(("weight", c * filters * kh * kw))
        if use_bias:
            layer.block_sizes.append(("bias", filters))
        layer.params["act"] = act

    def _connect(self, f: Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        out = f.int("output", 0)
        use_bias, bn = f.int("useBias", 1), f.int("batchNorm", 0)
        eps = f.float("bnEps", 1e-5)
        act = act_field(f, where)
        if out < 1:
            raise err(where, "output must be >= 1")
        if bn and not use_bias:
            raise err(where, "batchNorm: 1 with useBias: 0 gives undefined output in MsnhNet")
        if act.name == "prelu":
            raise err(where, "prelu fused into connect is not verified; use a separate act")
        layer.params.update(out=out, bn=bn, use_bias=use_bias, eps=eps, act=act)
        layer.out_shape = (out, 1, 1)
        layer.block_sizes.append(("weight", out * c * h * w))
        if bn:
            layer.block_sizes += [(n, out) for n in ("scale", "mean", "var", "bias")]
        elif use_bias:
            layer.block_sizes.append(("bias", out))

    def _batchnorm(self, f: Fields, layer: Layer, where: str) -> None:
        c = layer.in_shape[0]
        layer.params["eps"] = f.float("eps", 1e-5)
        act = act_field(f, where)
        layer.block_sizes += [(n, c) for n in ("scale", "bias", "mean", "var")]
        self._activation_blocks(layer, act, c)

    def _act(self, f: Fields, layer: Layer, where: str) -> None:
        if not f.has("activation"):
            raise err(where, "act needs an 'activation' field")
        act = act_field(f, where)
        if act.name == "prelu" and self.prev()[1]:
            raise err(where, "prelu after a softmax has no channel count")
        self._activation_blocks(layer, act, layer.in_shape[0])

    def _pool_common(self, f: Fields, where: str, fallback_below: int):
        kh, kw = xy(f, "kSize", 1, fallback_below)
        sh, sw = xy(f, "stride", 1, fallback_below)
        ph, pw = xy(f, "padding", 0, fallback_below)
        ceil_mode = f.int("ceilMode", 0)
        if ceil_mode not in (0, 1, 2):
            raise err(where, f"ceilMode must be 0, 1 or 2, got {ceil_mode}")
        if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
            raise err(where, "kSize and stride must be >= 1, padding >= 0")
        return (kh, kw), (sh, sw), (ph, pw), ceil_mode

    def _maxpool(self, f: Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        k, s, p, ceil_mode = self._pool_common(f, where, 0)
        if f.int("maxPoolDepth", 0) != 0:
            raise err(where, "maxPoolDepth is not modelled by the reference runtime")
        f.int("outChannels", 1)
        if p != (0, 0):
            raise err(where, f"maxpool padding {p[1]}x{p[0]}: MsnhNet's AVX maxpool drops or "
                       "corrupts padded taps (stride 1, and k2 s2); write a 'padding' layer "
                       "with paddingVal -3.4e38 and an unpadded maxpool")
        if s[0] == s[1] and k[0] != k[1]:
            raise err(where, "non-square maxpool kernel with equal strides takes MsnhNet's "
                       "unverified AVX path")
        oh = ops.pool_out(h, k[0], s[0], 0, ceil_mode)
        ow = ops.pool_out(w, k[1], s[1], 0, ceil_mode)
        if oh < 1 or ow < 1:
            raise err(where, f"kernel larger than the input {h}x{w}")
        if (oh - 1) * s[0] >= h or (ow - 1) * s[1] >= w:
            raise err(where, "ceilMode leaves a window entirely outside the input")
        layer.params.update(k=k, s=s)
        layer.out_shape = (c, oh, ow)

    def _localavgpool(self, f: Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        k, s, p, ceil_mode = self._pool_common(f, where, 1)
        oh = ops.pool_out(h, k[0], s[0], p[0], ceil_mode)
        ow = ops.pool_out(w, k[1], s[1], p[1], ceil_mode)
        if oh < 1 or ow < 1:
            raise err(where, f"kernel larger than the padded input {h}x{w}")
        self.limits.check_total(_pool_work((1, h, w), k, s, p, oh, ow),
                                f"{where}: pooling window check")
        _, count = ops.avgpool_exclude_pad(np.zeros((1, h, w), np.float32), k, s, p, oh, ow)
        if (count == 0).any():
            raise err(where, "a pooling window lies entirely in the padding")
        layer.params.update(k=k, s=s, p=p)
        layer.out_shape = (c, oh, ow)

    def _globalavgpool(self, f: Fields, layer: Layer, where: str) -> None:
        layer.out_shape = (layer.in_shape[0], 1, 1)  # MsnhNet ignores any fields here

    def _padding(self, f: Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        t, d, left, r = (f.int(k, 0) for k in ("top", "down", "left", "right"))
        if min(t, d, left, r) < 0:
            raise err(where, "padding amounts must be >= 0")
        layer.params.update(pads=(t, d, left, r), value=f.float("paddingVal", 0.0))
        layer.out_shape = (c, h + t + d, w + left + r)

    def _route(self, f: Fields, layer: Layer, where: str) -> None:
        if layer.index == 0:
            raise err(where, "a route cannot be layer 0 (MsnhNet crashes)")
        if not f.has("layers"):
            raise err(where, "route needs 'layers'")
        idx = [self.resolve(i, layer.index, where)
               for i in as_int_list(f.str("layers", ""), "layers", where)]
        add = f.int("addModel", 0)
        if f.int("groups", 1) != 1 or f.int("groupsId", 0) != 0:
            raise err(where, "route groups/groupsId: MsnhNet reports the un-sliced channel "
                       "count, so the next layer misreads its input; slice another way")
        act = act_field(f, where)
        if act.name == "prelu":
            raise err(where, "prelu fused into route is not verified")
        shapes = [self.layers[i].out_shape for i in idx]
        if add:
            if len(idx) < 2:
                raise err(where, "addModel: 1 needs at least 2 layers")
            if len(set(shapes)) != 1:
                raise err(where, f"addModel: 1 needs equal shapes, got {shapes}")
            out = shapes[0]
        elif len(idx) == 1:
            out = shapes[0]
        else:
            if len({s[1:] for s in shapes}) != 1:
                raise err(where, f"concatenation needs equal H and W, got {shapes}")
            out = (sum(s[0] for s in shapes), shapes[0][1], shapes[0][2])
        layer.params.update(layers=idx, add=add, act=act)
        layer.out_shape = out

    def _varop(self, f: Fields, layer: Layer, where: str) -> None:
        kind = f.str("type", "")
        const = f.float("constVal", 0.0)
        idx_text = f.str("layers", "")
        raw_idx = as_int_list(idx_text, "layers", where) if idx_text else []
        if kind == "tanh":
            raise err(where, "varop tanh computes tan in MsnhNet; use 'act activation: tanh'")
        if kind not in VAROP_BINARY | VAROP_CONST | VAROP_UNARY:
            raise err(where, f"unknown varop type {kind!r}")
        idx = [self.resolve(i, layer.index, where) for i in raw_idx]
        if kind in VAROP_BINARY:
            if len(idx) not in (1, 2):
                raise err(where, f"binary varop '{kind}' needs 1 or 2 layer indices")
            if layer.index - 1 in idx:
                raise err(where, f"varop layers {raw_idx} name the previous layer; with one "
                           "index the previous layer is already operand A, with two neither "
                           "may be the previous layer")
            shapes = [self.layers[i].out_shape for i in idx]
            if len(idx) == 1:
                if self.prev()[1]:
                    raise err(where, "varop cannot follow a softmax (0x0x0 output)")
                shapes.insert(0, layer.in_shape)
            if len(set(shapes)) != 1:
                raise err(where, f"varop needs equal shapes (no broadcasting), got {shapes}")
            layer.out_shape = shapes[0]
        elif idx:
            raise err(where, f"varop '{kind}' operates on the previous layer and takes no "
                       "layer indices")
        layer.params.update(type=kind, layers=idx, const=const)

    def _softmax(self, f: Fields, layer: Layer, where: str) -> None:
        groups, temp = f.int("groups", 1), f.float("temperature", 1.0)
        total = int(np.prod(layer.in_shape))
        if groups < 1 or total % groups:
            raise err(where, f"groups={groups} must divide C*H*W={total}")
        if temp == 0:
            raise err(where, "temperature must be non-zero")
        layer.params.update(groups=groups, temperature=temp)
        layer.opaque = True

    def _upsample(self, f: Fields, layer: Layer, where: str) -> None:
        c, h, w = layer.in_shape
        st: dict[str, Any] = {"type": "nearest", "stride": 1, "strideX": -1, "strideY": -1,
                              "scale": 1.0, "scaleX": -1.0, "scaleY": -1.0, "alignCorners": 0}
        for key, value in f.raw.items:  # the parser's fallback runs after every key
            if key not in st:
                raise err(where, f"'{key}' is not supported in [upsample]")
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
                raise err(where, f"nearest upsample multiplies every value by scaleX "
                           f"({st['scaleX']}) in MsnhNet; write scaleX 1.0")
            if st["strideX"] < 1 or st["strideY"] < 1:
                raise err(where, "nearest upsample strides must be >= 1")
            out = (c, h * st["strideY"], w * st["strideX"])
        elif st["type"] == "bilinear":
            with np.errstate(over="ignore"):
                fh = np.float32(h) * np.float32(st["scaleY"])
                fw = np.float32(w) * np.float32(st["scaleX"])
            if not (abs(fh) <= INT32_MAX and abs(fw) <= INT32_MAX):
                raise err(where, f"bilinear scale gives an output size past 32 bits "
                           f"({h}x{w} times {st['scaleY']}x{st['scaleX']})")
            oh, ow = int(fh), int(fw)
            if oh < 1 or ow < 1:
                raise err(where, "bilinear scale gives an empty output")
            out = (c, oh, ow)
        else:
            raise err(where, f"upsample type must be nearest or bilinear, got {st['type']!r}")
        layer.params.update(type=st["type"], align=bool(st["alignCorners"]))
        layer.out_shape = out

    def _dims(self, f: Fields, default: tuple[int, int, int]) -> tuple[int, int, int]:
        d0, d1, d2 = (f.int(f"dim{i}", default[i]) for i in range(3))
        return d0, d1, d2

    def _view(self, f: Fields, layer: Layer, where: str) -> None:
        d0, d1, d2 = self._dims(f, (-1, -1, -1))
        if min(d0, d1, d2) < 1:
            raise err(where, "view needs all of dim0, dim1, dim2 >= 1")
        if d0 * d1 * d2 != int(np.prod(layer.in_shape)):
            raise err(where, f"view {d0},{d1},{d2} does not hold {layer.in_shape}")
        layer.out_shape = (d2, d1, d0)  # MsnhNet fills (W, H, C) from (dim0, dim1, dim2)

    def _permute(self, f: Fields, layer: Layer, where: str) -> None:
        dims = self._dims(f, (0, 1, 2))
        if sorted(dims) != [0, 1, 2]:
            raise err(where, f"permute dims {dims} are not a permutation of 0,1,2")
        layer.params["dims"] = dims
        shape = layer.in_shape
        layer.out_shape = (shape[dims[0]], shape[dims[1]], shape[dims[2]])

    def _reduction(self, f: Fields, layer: Layer, where: str) -> None:
        kind, axis = f.str("type", "sum"), f.int("axis", -1)
        if kind not in ("sum", "mean"):
            raise err(where, f"reduction type must be sum or mean, got {kind!r}")
        if axis not in (0, 1, 2):
            raise err(where, f"reduction axis must be 0, 1 or 2 (C/H/W), got {axis}")
        layer.params.update(type=kind, axis=axis)
        out = list(layer.in_shape)
        out[axis] = 1
        layer.out_shape = (out[0], out[1], out[2])

    def _slice(self, f: Fields, layer: Layer, where: str) -> None:
        starts = [f.int(f"start{i}", 0) for i in range(3)]
        steps = [f.int(f"step{i}", 1) for i in range(3)]
        if min(steps) < 1 or min(starts) < 0:
            raise err(where, "slice starts must be >= 0 and steps >= 1")
        out = tuple(len(range(s, n, t)) for s, n, t in zip(starts, layer.in_shape, steps))
        if min(out) < 1:
            raise err(where, f"slice leaves an empty output from {layer.in_shape}")
        layer.params.update(starts=starts, steps=steps)
        layer.out_shape = (out[0], out[1], out[2])

    def _clip(self, f: Fields, layer: Layer, where: str) -> None:
        lo, hi = f.float("min", -ops.FLT_MAX), f.float("max", ops.FLT_MAX)
        if lo > hi:
            raise err(where, f"clip min {lo} > max {hi}")
        layer.params.update(min=lo, max=hi)

