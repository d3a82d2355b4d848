"""Execution: a shape-checked, weighted layer list run sample by sample in numpy.

Kept apart from shape checking so a runner can assume legal parameters (the builder has
refused everything else) and reads as the layer's maths only. One runner per keyword.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deployplug.errors import ArtifactFormatError
from deployplug.runtimes.msnhnet import ops
from deployplug.runtimes.msnhnet.layer import VAROP_BINARY, VAROP_CONST, Activation, Layer, Shape


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

