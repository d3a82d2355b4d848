"""Numpy kernels for one sample (C, H, W) with MsnhNet's measured semantics.

These are pure functions; parameter validation (what the real runtime miscomputes) lives in
:mod:`deployplug.runtimes.msnhnet.builder`, so every kernel here can assume legal arguments.
Arithmetic is float32 like the C++ runtime, accumulations of matrix products excepted.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def conv2d(x: np.ndarray, w: np.ndarray, k: tuple[int, int], s: tuple[int, int],
           p: tuple[int, int], d: tuple[int, int], groups: int) -> np.ndarray:
    """Grouped, dilated convolution; ``w`` is OIHW. ``k,s,p,d`` are (H, W) pairs."""
    c, h, wd = x.shape
    o = w.shape[0]
    oh, ow = conv_out(h, k[0], s[0], p[0], d[0]), conv_out(wd, k[1], s[1], p[1], d[1])
    xp = np.pad(x, ((0, 0), (p[0], p[0]), (p[1], p[1])))
    cols: np.ndarray = np.empty((c, k[0], k[1], oh, ow), dtype=F32)
    for a in range(k[0]):
        for b in range(k[1]):
            r0, c0 = a * d[0], b * d[1]
            rows = slice(r0, r0 + s[0] * (oh - 1) + 1, s[0])
            cols[:, a, b] = xp[:, rows, c0:c0 + s[1] * (ow - 1) + 1:s[1]]
    cols = cols.reshape(groups, (c // groups) * k[0] * k[1], oh * ow)
    wm = w.reshape(groups, o // groups, -1)
    out = np.matmul(wm.astype(np.float64), cols.astype(np.float64))
    return out.reshape(o, oh, ow).astype(F32)


def deconv2d(x: np.ndarray, w: np.ndarray, k: tuple[int, int], s: tuple[int, int],
             p: tuple[int, int]) -> np.ndarray:
    """Transposed convolution, groups 1; ``w`` is (C_in, C_out, kH, kW) like PyTorch."""
    c, h, wd = x.shape
    o = w.shape[1]
    full = np.zeros((o, (h - 1) * s[0] + k[0], (wd - 1) * s[1] + k[1]), dtype=np.float64)
    xf = x.reshape(c, h * wd).astype(np.float64)
    for a in range(k[0]):
        for b in range(k[1]):
            contrib = (w[:, :, a, b].astype(np.float64).T @ xf).reshape(o, h, wd)
            full[:, a:a + s[0] * (h - 1) + 1:s[0], b:b + s[1] * (wd - 1) + 1:s[1]] += contrib
    oh = (h - 1) * s[0] - 2 * p[0] + k[0]
    ow = (wd - 1) * s[1] - 2 * p[1] + k[1]
    return full[:, p[0]:p[0] + oh, p[1]:p[1] + ow].astype(F32)


def pool_out(size: int, k: int, s: int, p: int, ceil_mode: int) -> int:
    """MsnhNet's pooled size (not PyTorch's when ``p > 0`` and ``ceil_mode == 1``)."""
    if ceil_mode == 2:
        return int((size + p - k) / s) + 1
    base = (size + 2 * p - k) // s + 1
    if ceil_mode == 1 and (size + 2 * p - k) % s > p:
        base += 1
    return base


def _windows(x: np.ndarray, k: tuple[int, int], s: tuple[int, int], oh: int, ow: int):
    for a in range(k[0]):
        for b in range(k[1]):
            yield x[:, a:a + s[0] * (oh - 1) + 1:s[0], b:b + s[1] * (ow - 1) + 1:s[1]]


def _pad_to(x: np.ndarray, p: tuple[int, int], need: tuple[int, int], value: float) -> np.ndarray:
    """Pad ``p`` on every side, then extra at the bottom/right until ``need`` rows/cols exist."""
    extra_h = max(0, need[0] - (x.shape[1] + 2 * p[0]))
    extra_w = max(0, need[1] - (x.shape[2] + 2 * p[1]))
    return np.pad(x, ((0, 0), (p[0], p[0] + extra_h), (p[1], p[1] + extra_w)),
                  constant_values=value)


def maxpool(x: np.ndarray, k: tuple[int, int], s: tuple[int, int], oh: int, ow: int) -> np.ndarray:
    """Unpadded max pooling; taps past the bottom/right edge (ceil mode) are skipped."""
    need = ((oh - 1) * s[0] + k[0], (ow - 1) * s[1] + k[1])
    xp = _pad_to(x, (0, 0), need, -np.inf)
    out = np.full((x.shape[0], oh, ow), -np.inf, dtype=F32)
    for win in _windows(xp, k, s, oh, ow):
        np.maximum(out, win, out=out)
    return out


def avgpool_exclude_pad(x: np.ndarray, k: tuple[int, int], s: tuple[int, int],
                        p: tuple[int, int], oh: int, ow: int) -> tuple[np.ndarray, np.ndarray]:
    """Average over in-image taps only; also returns the per-window tap counts."""
    need = ((oh - 1) * s[0] + k[0], (ow - 1) * s[1] + k[1])
    xp = _pad_to(x.astype(np.float64), p, need, 0.0)
    mask = _pad_to(np.ones((1,) + x.shape[1:]), p, need, 0.0)
    total = np.zeros((x.shape[0], oh, ow))
    count = np.zeros((1, oh, ow))
    for win in _windows(xp, k, s, oh, ow):
        total += win
    for win in _windows(mask, k, s, oh, ow):
        count += win
    return (total / np.maximum(count, 1)).astype(F32), count


def bilinear(x: np.ndarray, oh: int, ow: int, align_corners: bool) -> np.ndarray:
    """Size-based bilinear resize, sampling like PyTorch's ``interpolate(size=...)``."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dst = np.arange(n_out, dtype=np.float64)
        if align_corners:
            ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            src = dst * ratio
        else:
            src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    h0, h1, lh = axis(x.shape[1], oh)
    w0, w1, lw = axis(x.shape[2], ow)
    xd = x.astype(np.float64)
    top = xd[:, h0][:, :, w0] * (1 - lw) + xd[:, h0][:, :, w1] * lw
    bottom = xd[:, h1][:, :, w0] * (1 - lw) + xd[:, h1][:, :, w1] * lw
    return (top * (1 - lh[:, None]) + bottom * lh[:, None]).astype(F32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(F32)


def _softplus(x: np.ndarray, threshold: float) -> np.ndarray:
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        mid = np.log(np.exp(xd) + 1.0)
    return np.where(xd > threshold, xd, np.where(xd < -threshold, np.exp(xd), mid)).astype(F32)


def activation(x: np.ndarray, name: str, params: list[float],
               slopes: np.ndarray | None = None) -> np.ndarray:
    """One named activation. The caller has already resolved unknown names to ``relu``."""
    xd = x.astype(np.float64)
    if name == "none":
        return x
    if name == "relu":
        return np.maximum(x, F32(0))
    if name == "relu6":
        return np.clip(x, F32(0), F32(6))
    if name == "leaky":
        slope = params[0] if params else 0.1
        return np.where(x > 0, x, x * F32(slope)).astype(F32)
    if name == "logistic":
        return _sigmoid(x)
    if name == "tanh":
        return np.tanh(x)
    if name == "swish":
        return (xd * _sigmoid(x)).astype(F32)
    if name == "mish":
        return (xd * np.tanh(_softplus(x, 20.0).astype(np.float64))).astype(F32)
    if name == "hardswish":
        return (xd * np.clip(xd + 3.0, 0.0, 6.0) / 6.0).astype(F32)
    if name == "hardtan":
        return np.clip(x, F32(-1), F32(1))
    if name == "elu":
        return np.where(xd >= 0, xd, np.expm1(np.minimum(xd, 0))).astype(F32)
    if name == "selu":
        neg = 1.6732 * np.expm1(np.minimum(xd, 0))
        return (1.0507 * np.where(xd >= 0, xd, neg)).astype(F32)
    if name == "softplus":
        return _softplus(x, params[0] if params else 0.1)
    if name == "prelu":
        assert slopes is not None
        return np.where(x > 0, x, x * slopes.reshape(-1, *([1] * (x.ndim - 1)))).astype(F32)
    raise AssertionError(f"activation {name!r} is validated before use")


def varop_binary(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` is the first operand (previous layer or out[J]), ``b`` the second."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "add": lambda: a + b,
            "sub": lambda: a - b,
            "subInv": lambda: b - a,
            "mul": lambda: a * b,
            "div": lambda: a / b,
            "divInv": lambda: b / a,
        }[kind]().astype(F32)


def varop_const(kind: str, x: np.ndarray, c: float) -> np.ndarray:
    cf = F32(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "addConst": lambda: x + cf,
            "subConst": lambda: x - cf,
            "subConstInv": lambda: cf - x,
            "mulConst": lambda: x * cf,
            "divConst": lambda: x / cf,
            "divConstInv": lambda: cf / x,
        }[kind]().astype(F32)


def varop_unary(kind: str, x: np.ndarray, c: float) -> np.ndarray:
    """Unary math. ``pow`` goes through exp/log like a fast float pow: NaN for negatives."""
    with np.errstate(all="ignore"):
        if kind == "pow":
            return np.exp(F32(c) * np.log(x.astype(np.float64))).astype(F32)
        fn = {
            "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan,
            "cos": np.cos, "cosh": np.cosh, "sin": np.sin, "sinh": np.sinh, "tan": np.tan,
            "exp": np.exp, "log": np.log, "log10": np.log10, "sqrt": np.sqrt,
        }[kind]
        return fn(x).astype(F32)
