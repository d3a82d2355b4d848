"""Captured graph -> Caffe layers (BVLC types that OpenCV 4.x also loads).

Each normalized op has one *rule*: a ``check`` saying whether (and why not) the node can be
expressed exactly, and an ``emit`` that appends layers. The target profiles in
:mod:`deployplug.profiles.caffe` reuse the checks, so "what Caffe can express" is written once.

Ops BVLC Caffe has no layer for are composed here from exact primitives (all verified in
OpenCV against PyTorch):

* ``clamp(lo, hi)`` (relu6, hardtanh) = ``hi - ReLU((hi - lo) - ReLU(x - lo))`` with Power for
  the affine parts, so no Eltwise is needed;
* ``hardsigmoid`` = clamp(x/6 + 1/2, 0, 1); ``hardswish`` = x * hardsigmoid(x) (Eltwise PROD);
* ``silu`` = x * Sigmoid(x);
* nearest upsampling by integer factors = depthwise Deconvolution (kernel = stride = factor,
  weights 1) -- or the ``Upsample`` layer in the ``om`` dialect;
* bilinear by integer factors (align_corners=False) = edge rows/columns repeated with Slice +
  Concat, then a depthwise Deconvolution with a separable tent kernel (see ``bilinear_taps``);
* floor-mode pooling = Caffe's ceil-mode pooling plus Slice layers dropping the extra row/col;
* zero/constant padding (also asymmetric or negative) = identity depthwise 1x1 Convolution
  with symmetric pad, Power shifts for a non-zero value, and Slice crops.

Every value of the graph keeps the node name as its blob name and as the name of the layer
that produces it, so a layer in the files points back at the PyTorch module path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deployplug.capture import Graph, Node, Ref
from deployplug.errors import OffendingOp, UnsupportedOpError


@dataclass
class Layer:
    """One Caffe layer: params are ``{"convolution_param": {...}}`` style plain dicts."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: list[np.ndarray] = field(default_factory=list)
    node: str = ""


@dataclass
class CaffeNet:
    """A lowered network, independent of protobuf (the writer serializes it)."""

    name: str
    dialect: str
    inputs: list[tuple[str, tuple[int, ...]]]
    layers: list[Layer]
    outputs: list[str]
    #: graph value name -> blob name holding it (aliases share a blob)
    value_blobs: dict[str, str]
    #: facts runtimes need (e.g. channel counts of om Upsample layers)
    extras: dict[str, Any] = field(default_factory=dict)


Check = Callable[[Node, Graph, str], "str | None"]
Emit = Callable[["_Ctx", Node], None]


@dataclass(frozen=True)
class Rule:
    check: Check
    emit: Emit


RULES: dict[str, Rule] = {}


def _ok(node: Node, graph: Graph, dialect: str) -> str | None:
    return None


def rule(*ops: str, check: Check = _ok) -> Callable[[Emit], Emit]:
    def deco(emit: Emit) -> Emit:
        for op in ops:
            RULES[op] = Rule(check, emit)
        return emit

    return deco


def refusal(node: Node, graph: Graph, dialect: str = "bvlc") -> str | None:
    """``None`` when ``node`` lowers exactly to Caffe layers, otherwise why not."""
    r = RULES.get(node.op)
    if r is None:
        return f"Caffe has no layer (or exact composition) for '{node.op}'"
    try:
        return r.check(node, graph, dialect)
    except (KeyError, TypeError, ValueError) as exc:
        return f"unexpected arguments for '{node.op}': {exc}"


_DEFAULT_HINT = "rewrite it with deployplug.decompositions, or change the model"
SUGGESTIONS = {
    "conv_transpose2d": "set output_padding=0, or let deployplug.decompositions rewrite it",
    "add": "Caffe Eltwise cannot broadcast; make both operands the same shape",
    "sub": "Caffe Eltwise cannot broadcast; make both operands the same shape",
    "upsample_nearest2d": "use integer scale factors, or let deployplug.decompositions rewrite it",
    "upsample_bilinear2d": "use integer scale factors with align_corners=False",
}


def lower(graph: Graph, dialect: str = "bvlc", target: str = "caffe",
          name: str = "net") -> CaffeNet:
    """Lower every node, or raise :class:`UnsupportedOpError` listing *all* offenders first."""
    offenders = []
    for node in graph.nodes:
        reason = refusal(node, graph, dialect)
        if reason is not None:
            hint = SUGGESTIONS.get(node.op, _DEFAULT_HINT)
            offenders.append(OffendingOp(node.op, node.module_path, target, reason, (hint,)))
    if offenders:
        raise UnsupportedOpError(offenders)
    ctx = _Ctx(graph, dialect)
    for inp in graph.inputs:
        ctx.add(inp.name, "Input", [], [inp.name],
                {"input_param": {"shape": [{"dim": list(inp.shape)}]}})
        ctx.value_blobs[inp.name] = inp.name
    for node in graph.nodes:
        RULES[node.op].emit(ctx, node)
    outputs = [ctx.blob(o) for o in graph.outputs]
    _guard_power_fusion(ctx, set(outputs))
    return CaffeNet(name, dialect, [(v.name, tuple(v.shape)) for v in graph.inputs], ctx.layers,
                    outputs, dict(ctx.value_blobs), ctx.extras)


class _Ctx:
    """Mutable state of one lowering: layers so far and where each value lives."""

    def __init__(self, graph: Graph, dialect: str):
        self.graph = graph
        self.dialect = dialect
        self.layers: list[Layer] = []
        self.value_blobs: dict[str, str] = {}
        self.extras: dict[str, Any] = {}
        #: zero pads folded into the convolutions that read them: pad node -> (source, (ph, pw))
        self.folded = _foldable_pads(graph)
        self._names: set[str] = {v.name for v in graph.inputs} | {n.name for n in graph.nodes}
        self._taken: set[str] = set()

    def blob(self, value: str | Ref) -> str:
        return self.value_blobs[value.name if isinstance(value, Ref) else value]

    def fresh(self, base: str) -> str:
        """An intermediate blob/layer name under ``base`` that no graph value or layer uses."""
        i = 0
        while True:
            name = f"{base}/{i}"
            if name not in self._names and name not in self._taken:
                self._taken.add(name)
                return name
            i += 1

    def add(self, name: str, type_: str, bottoms: list[str], tops: list[str],
            params: dict[str, dict[str, Any]] | None = None,
            blobs: list[np.ndarray] | None = None, node: str = "") -> str:
        self._taken.add(name)
        self.layers.append(Layer(name, type_, list(bottoms), list(tops), params or {},
                                 [np.asarray(b, dtype=np.float32) for b in blobs or []], node))
        return tops[0]

    def step(self, node: Node, type_: str, bottoms: list[str],
             params: dict[str, dict[str, Any]] | None = None,
             blobs: list[np.ndarray] | None = None, final: bool = False) -> str:
        """Add a single-top layer; ``final`` names it (and its blob) after the node."""
        name = node.name if final else self.fresh(node.name)
        top = self.add(name, type_, bottoms, [name], params, blobs, node.name)
        if final:
            self.value_blobs[node.name] = top
        return top

    def alias(self, node: Node, blob: str) -> None:
        self.value_blobs[node.name] = blob


def _affine_scalar(layer: Layer) -> bool:
    """Layers OpenCV reports a single scale/shift for (what it folds into a preceding Power)."""
    if layer.type == "Power":
        return float(layer.params.get("power_param", {}).get("power", 1.0)) == 1.0
    if layer.type in ("Scale", "BatchNorm") and len(layer.bottoms) == 1:
        return all(b.size <= 1 for b in layer.blobs[:1])
    return False


def _guard_power_fusion(ctx: _Ctx, outputs: set[str]) -> None:
    """Keep OpenCV from fusing ``Power(power != 1, shift 0)`` with a following scalar affine.

    OpenCV 4.x folds the next layer's scale into the Power's *inner* scale, computing
    ``(a*k*x)^p`` for ``a*(k*x)^p`` (e.g. ``2 / x`` came out as ``0.5 / x``). An identity
    Reshape between the two is exact everywhere and stops that fusion.
    """
    consumers: dict[str, list[Layer]] = {}
    for layer in ctx.layers:
        for b in layer.bottoms:
            consumers.setdefault(b, []).append(layer)
    patched: list[Layer] = []
    for layer in ctx.layers:
        patched.append(layer)
        p = layer.params.get("power_param", {})
        if layer.type != "Power" or float(p.get("power", 1.0)) == 1.0 or p.get("shift", 0.0):
            continue
        users = consumers.get(layer.tops[0], [])
        if layer.tops[0] in outputs or len(users) != 1 or not _affine_scalar(users[0]):
            continue
        rank = len(ctx.graph.node(layer.node).shape or ()) or 4  # elementwise: node's rank
        guard = ctx.fresh(layer.tops[0])
        patched.append(Layer(guard, "Reshape", [layer.tops[0]], [guard],
                             {"reshape_param": {"shape": {"dim": [0] * rank}}}, [], layer.node))
        users[0].bottoms = [guard if b == layer.tops[0] else b for b in users[0].bottoms]
    ctx.layers[:] = patched


# ----------------------------------------------------------------------------- building blocks


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(v) == 1:
        v = v * 2
    return int(v[0]), int(v[1])


def _hw(prefix: str, v: tuple[int, int], scalar: str, default: int | None = None) -> dict:
    """``kernel_size: 3`` when square, ``kernel_h/kernel_w`` otherwise (``pad``, ``stride``)."""
    if v[0] == v[1]:
        return {} if v[0] == default else {scalar: v[0]}
    return {f"{prefix}_h": v[0], f"{prefix}_w": v[1]}


def _in_shape(graph: Graph, node: Node, idx: int = 0) -> tuple[int, ...]:
    return graph.shape_of(node.inputs[idx])


def _first(node: Node) -> Any:
    return node.args.get("self", node.args.get("input"))


def _scalar(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.reshape(()).item())
    return None


def _power(ctx: _Ctx, node: Node, bottom: str, *, power: float = 1.0, scale: float = 1.0,
           shift: float = 0.0, final: bool = False) -> str:
    params = {}
    for key, val, default in (("power", power, 1.0), ("scale", scale, 1.0), ("shift", shift, 0.0)):
        if val != default:
            params[key] = float(val)
    return ctx.step(node, "Power", [bottom], {"power_param": params}, final=final)


def _relu(ctx: _Ctx, node: Node, bottom: str, final: bool = False) -> str:
    return ctx.step(node, "ReLU", [bottom], final=final)


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _slice(ctx: _Ctx, node: Node, bottom: str, axis: int, start: int, end: int, size: int,
           final: bool) -> str:
    """Keep ``[start, end)`` of ``axis`` with one Slice layer; the other parts go unused."""
    if start == 0 and end == size:
        if final:
            ctx.alias(node, bottom)
        return bottom
    points = [p for p in (start, end) if 0 < p < size]
    keep = 0 if start == 0 else 1
    name = node.name if final else ctx.fresh(node.name)
    tops = [name if i == keep else ctx.fresh(node.name) for i in range(len(points) + 1)]
    ctx.add(name, "Slice", [bottom], tops,
            {"slice_param": {"axis": axis, "slice_point": points}}, node=node.name)
    if final:
        ctx.value_blobs[node.name] = name
    return name


# ----------------------------------------------------------------------------- conv / linear


def _conv_padding(node: Node) -> tuple[int, int] | str:
    pad = node.args.get("padding", 0)
    if isinstance(pad, str):
        if pad == "valid":
            return 0, 0
        k = node.args["weight"].shape[2:]
        d = _pair(node.args.get("dilation", 1))
        total = [d[i] * (k[i] - 1) for i in range(2)]
        if any(t % 2 for t in total):
            return "padding='same' needs asymmetric padding here, which Caffe lacks"
        return total[0] // 2, total[1] // 2
    return _pair(pad)


def _check_conv(node: Node, graph: Graph, dialect: str) -> str | None:
    w = node.args.get("weight")
    if not isinstance(w, torch.Tensor):
        return "the weight is computed at run time; Caffe needs constant weights"
    if w.dim() != 4:
        return f"only 2-D convolutions exist in Caffe (weight rank {w.dim()})"
    if isinstance(node.args.get("bias"), Ref):
        return "the bias is computed at run time; Caffe needs constant weights"
    pad = _conv_padding(node)
    return pad if isinstance(pad, str) else None


def _foldable_pads(graph: Graph) -> dict[str, tuple[Ref, tuple[int, int]]]:
    """Symmetric zero pads read only by convolutions: they become the convolutions' pad."""
    out = {}
    for node in graph.nodes:
        if node.op not in ("pad", "constant_pad_nd") or node.name in graph.outputs:
            continue
        pads = _pads(node, graph)
        if isinstance(pads, str) or pads[1] != 0.0:
            continue
        left, right, top, bottom = pads[0]
        users = graph.consumers(node.name)
        if left != right or top != bottom or min(left, top) < 0 or not users:
            continue
        if all(u.op == "conv2d" and _first(u) == Ref(node.name) for u in users):
            out[node.name] = (_first(node), (top, left))
    return out


@rule("conv2d", check=_check_conv)
def _emit_conv(ctx: _Ctx, node: Node) -> None:
    w, b = node.args["weight"], node.args.get("bias")
    pad = _conv_padding(node)
    assert not isinstance(pad, str)
    source = _first(node)
    if source.name in ctx.folded:  # F.pad(x) -> conv: one Convolution with the summed pad
        source, extra = ctx.folded[source.name]
        pad = (pad[0] + extra[0], pad[1] + extra[1])
    dil = _pair(node.args.get("dilation", 1))
    p = {"num_output": int(w.shape[0]), "bias_term": b is not None,
         **_hw("kernel", (int(w.shape[2]), int(w.shape[3])), "kernel_size"),
         **_hw("stride", _pair(node.args.get("stride", 1)), "stride", 1),
         **_hw("pad", pad, "pad", 0)}
    if dil != (1, 1):
        p["dilation"] = [dil[0]] if dil[0] == dil[1] else list(dil)
    if int(node.args.get("groups", 1)) != 1:
        p["group"] = int(node.args["groups"])
    blobs = [_np(w)] + ([_np(b)] if b is not None else [])
    ctx.step(node, "Convolution", [ctx.blob(source)], {"convolution_param": p}, blobs,
             final=True)


def _check_deconv(node: Node, graph: Graph, dialect: str) -> str | None:
    reason = _check_conv(node, graph, dialect)
    if reason:
        return reason
    if any(int(v) for v in node.args.get("output_padding", [0])):
        return "Caffe Deconvolution has no output_padding"
    if _pair(node.args.get("dilation", 1)) != (1, 1):
        return "dilated transposed convolution is not supported by OpenCV's Caffe importer"
    return None


@rule("conv_transpose2d", check=_check_deconv)
def _emit_deconv(ctx: _Ctx, node: Node) -> None:
    w, b = node.args["weight"], node.args.get("bias")
    groups = int(node.args.get("groups", 1))
    p = {"num_output": int(w.shape[1]) * groups, "bias_term": b is not None,
         **_hw("kernel", (int(w.shape[2]), int(w.shape[3])), "kernel_size"),
         **_hw("stride", _pair(node.args.get("stride", 1)), "stride", 1),
         **_hw("pad", _pair(node.args.get("padding", 0)), "pad", 0)}
    if groups != 1:
        p["group"] = groups
    blobs = [_np(w)] + ([_np(b)] if b is not None else [])
    ctx.step(node, "Deconvolution", [ctx.blob(_first(node))], {"convolution_param": p}, blobs,
             final=True)


def _check_linear(node: Node, graph: Graph, dialect: str) -> str | None:
    if not isinstance(node.args.get("weight"), torch.Tensor):
        return "the weight is computed at run time; Caffe needs constant weights"
    return None


@rule("linear", check=_check_linear)
def _emit_linear(ctx: _Ctx, node: Node) -> None:
    w, b = node.args["weight"], node.args.get("bias")
    rank = len(_in_shape(ctx.graph, node))
    p = {"num_output": int(w.shape[0]), "bias_term": b is not None}
    if rank != 2:
        p["axis"] = rank - 1  # PyTorch applies a Linear to the last axis only
    blobs = [_np(w)] + ([_np(b)] if b is not None else [])
    ctx.step(node, "InnerProduct", [ctx.blob(_first(node))], {"inner_product_param": p}, blobs,
             final=True)


def _check_bn(node: Node, graph: Graph, dialect: str) -> str | None:
    if node.args.get("training", False):
        return "BatchNorm in training mode; export an eval-mode model"
    if not isinstance(node.args.get("running_mean"), torch.Tensor):
        return "BatchNorm without running statistics cannot be exported"
    return None


@rule("batch_norm", check=_check_bn)
def _emit_bn(ctx: _Ctx, node: Node) -> None:
    mean, var = node.args["running_mean"], node.args["running_var"]
    gamma = node.args.get("weight")
    beta = node.args.get("bias")
    gamma = torch.ones_like(mean) if gamma is None else gamma
    beta = torch.zeros_like(mean) if beta is None else beta
    normed = ctx.step(node, "BatchNorm", [ctx.blob(_first(node))],
                      {"batch_norm_param": {"use_global_stats": True,
                                            "eps": float(node.args.get("eps", 1e-5))}},
                      [_np(mean), _np(var), np.ones(1, np.float32)])
    ctx.step(node, "Scale", [normed], {"scale_param": {"bias_term": True}},
             [_np(gamma), _np(beta)], final=True)


# ----------------------------------------------------------------------------- activations


@rule("relu")
def _emit_relu(ctx: _Ctx, node: Node) -> None:
    _relu(ctx, node, ctx.blob(_first(node)), final=True)


@rule("leaky_relu")
def _emit_leaky(ctx: _Ctx, node: Node) -> None:
    slope = float(node.args.get("negative_slope", 0.01))
    ctx.step(node, "ReLU", [ctx.blob(_first(node))], {"relu_param": {"negative_slope": slope}},
             final=True)


@rule("prelu", check=lambda n, g, d: None if isinstance(n.args.get("weight"), torch.Tensor)
      else "PReLU slopes computed at run time")
def _emit_prelu(ctx: _Ctx, node: Node) -> None:
    w = node.args["weight"].reshape(-1)
    params = {"prelu_param": {"channel_shared": True}} if w.numel() == 1 else {}
    ctx.step(node, "PReLU", [ctx.blob(_first(node))], params, [_np(w)], final=True)


@rule("sigmoid")
def _emit_sigmoid(ctx: _Ctx, node: Node) -> None:
    ctx.step(node, "Sigmoid", [ctx.blob(_first(node))], final=True)


@rule("tanh")
def _emit_tanh(ctx: _Ctx, node: Node) -> None:
    ctx.step(node, "TanH", [ctx.blob(_first(node))], final=True)


@rule("exp")
def _emit_exp(ctx: _Ctx, node: Node) -> None:
    ctx.step(node, "Exp", [ctx.blob(_first(node))], final=True)


@rule("abs")
def _emit_abs(ctx: _Ctx, node: Node) -> None:
    ctx.step(node, "AbsVal", [ctx.blob(_first(node))], final=True)


def _check_elu(node: Node, graph: Graph, dialect: str) -> str | None:
    if float(node.args.get("scale", 1)) != 1 or float(node.args.get("input_scale", 1)) != 1:
        return "Caffe ELU has no scale/input_scale (SELU/CELU)"
    return None


@rule("elu", check=_check_elu)
def _emit_elu(ctx: _Ctx, node: Node) -> None:
    ctx.step(node, "ELU", [ctx.blob(_first(node))],
             {"elu_param": {"alpha": float(node.args.get("alpha", 1.0))}}, final=True)


def _clamp_bounds(node: Node) -> tuple[float | None, float | None]:
    if node.op == "relu6":
        return 0.0, 6.0
    if node.op == "hardtanh":
        return float(node.args.get("min_val", -1.0)), float(node.args.get("max_val", 1.0))
    if node.op == "clamp_min":
        return _scalar(node.args["min"]), None
    if node.op == "clamp_max":
        return None, _scalar(node.args["max"])
    lo, hi = node.args.get("min"), node.args.get("max")
    return (None if lo is None else _scalar(lo)), (None if hi is None else _scalar(hi))


def _check_clamp(node: Node, graph: Graph, dialect: str) -> str | None:
    for key in ("min", "max"):
        v = node.args.get(key)
        if isinstance(v, Ref) or (isinstance(v, torch.Tensor) and v.numel() != 1):
            return f"clamp with a tensor '{key}' bound is not expressible in Caffe"
    lo, hi = _clamp_bounds(node)
    if lo is not None and hi is not None and lo > hi:
        return f"clamp with min {lo} > max {hi}"
    return None


def _clamp(ctx: _Ctx, node: Node, x: str, lo: float | None, hi: float | None,
           final: bool) -> str:
    """min(max(x, lo), hi) from ReLU and Power only (BVLC has neither Clip in OpenCV nor ReLU6)."""
    if lo is None and hi is None:
        if final:
            ctx.alias(node, x)
        return x
    if hi is None:
        if lo == 0:
            return _relu(ctx, node, x, final)
        r = _relu(ctx, node, _power(ctx, node, x, shift=-lo))
        return _power(ctx, node, r, shift=lo, final=final)
    if lo is None:
        r = _relu(ctx, node, _power(ctx, node, x, scale=-1.0, shift=hi))
        return _power(ctx, node, r, scale=-1.0, shift=hi, final=final)
    r = _relu(ctx, node, x if lo == 0 else _power(ctx, node, x, shift=-lo))  # max(x - lo, 0)
    t = _relu(ctx, node, _power(ctx, node, r, scale=-1.0, shift=hi - lo))  # max(hi-lo-r, 0)
    return _power(ctx, node, t, scale=-1.0, shift=hi, final=final)  # hi - t


@rule("relu6", "hardtanh", "clamp", "clamp_min", "clamp_max", check=_check_clamp)
def _emit_clamp(ctx: _Ctx, node: Node) -> None:
    lo, hi = _clamp_bounds(node)
    _clamp(ctx, node, ctx.blob(_first(node)), lo, hi, final=True)


def _hardsigmoid(ctx: _Ctx, node: Node, x: str, final: bool) -> str:
    return _clamp(ctx, node, _power(ctx, node, x, scale=1.0 / 6.0, shift=0.5), 0.0, 1.0, final)


@rule("hardsigmoid")
def _emit_hardsigmoid(ctx: _Ctx, node: Node) -> None:
    _hardsigmoid(ctx, node, ctx.blob(_first(node)), final=True)


@rule("hardswish")
def _emit_hardswish(ctx: _Ctx, node: Node) -> None:
    x = ctx.blob(_first(node))
    gate = _hardsigmoid(ctx, node, x, final=False)
    ctx.step(node, "Eltwise", [x, gate], {"eltwise_param": {"operation": "PROD"}}, final=True)


@rule("silu")
def _emit_silu(ctx: _Ctx, node: Node) -> None:
    x = ctx.blob(_first(node))
    gate = ctx.step(node, "Sigmoid", [x])
    ctx.step(node, "Eltwise", [x, gate], {"eltwise_param": {"operation": "PROD"}}, final=True)


def _check_softmax(node: Node, graph: Graph, dialect: str) -> str | None:
    if node.args.get("half_to_float"):
        return "half_to_float softmax"
    return None


@rule("softmax", "_softmax", check=_check_softmax)
def _emit_softmax(ctx: _Ctx, node: Node) -> None:
    rank = len(_in_shape(ctx.graph, node))
    axis = _norm_dim(int(node.args["dim"]), rank)
    ctx.step(node, "Softmax", [ctx.blob(_first(node))], {"softmax_param": {"axis": axis}},
             final=True)


# ----------------------------------------------------------------------------- arithmetic


def _operands(node: Node) -> tuple[Any, Any]:
    return node.args.get("self", node.args.get("input")), node.args.get("other")


def _channel_axis(const: torch.Tensor, out_shape: tuple[int, ...]) -> int | None:
    """The one axis (>= 1) along which ``const`` varies when broadcast to ``out_shape``."""
    if const.dim() > len(out_shape):
        return None
    shape = (1,) * (len(out_shape) - const.dim()) + tuple(const.shape)
    varying = [i for i, s in enumerate(shape) if s != 1]
    if len(varying) != 1 or varying[0] == 0 or shape[varying[0]] != out_shape[varying[0]]:
        return None
    return varying[0]


def _prefix_broadcast(small: tuple[int, ...], big: tuple[int, ...]) -> int | None:
    """k when ``small`` == big[:k] + ones (what a two-bottom Scale at axis 0 can broadcast)."""
    if len(small) != len(big):
        return None
    k = len(small)
    while k > 0 and small[k - 1] == 1 and big[k - 1] != 1:
        k -= 1
    if small[:k] != big[:k] or any(s != 1 for s in small[k:]) or k == 0:
        return None
    return k


def _check_binary(node: Node, graph: Graph, dialect: str) -> str | None:
    a, b = _operands(node)
    if node.op == "div" and node.args.get("rounding_mode") is not None:
        return "integer division (rounding_mode) has no Caffe layer"
    out = tuple(node.shape or ())
    refs = [v for v in (a, b) if isinstance(v, Ref)]
    if not refs:
        return "an op on constants only (fold it before export)"
    if len(refs) == 2:
        sa, sb = graph.shape_of(a.name), graph.shape_of(b.name)
        if sa == sb:
            return None
        if node.op in ("mul", "div") and sa == out and _prefix_broadcast(sb, sa):
            return None
        if node.op == "mul" and sb == out and _prefix_broadcast(sa, sb):
            return None
        return (f"broadcasting {list(sa)} with {list(sb)}: Caffe only broadcasts a product by "
                "a per-channel (N,C,1,1) tensor")
    x = refs[0]
    const = b if isinstance(a, Ref) else a
    if graph.shape_of(x.name) != out:
        return "the constant operand broadcasts the activation to a larger shape"
    if _scalar(const) is not None:
        if node.op == "div" and not isinstance(a, Ref) and _scalar(const) == 0:
            return "division of zero by a tensor"
        return None
    if isinstance(const, torch.Tensor) and _channel_axis(const, out) is not None:
        return None
    return "the constant operand is neither a scalar nor a per-channel vector"


def _const_rhs(ctx: _Ctx, node: Node, x: str, const: Any, const_first: bool) -> None:
    op, alpha = node.op, float(node.args.get("alpha", 1))
    s = _scalar(const)
    if s is not None:
        if op == "add":  # self + alpha * other
            if const_first:
                _power(ctx, node, x, scale=alpha, shift=s, final=True)
            else:
                _power(ctx, node, x, shift=alpha * s, final=True)
        elif op == "sub":  # self - alpha * other
            if const_first:
                _power(ctx, node, x, scale=-alpha, shift=s, final=True)
            else:
                _power(ctx, node, x, shift=-alpha * s, final=True)
        elif op == "mul":
            _power(ctx, node, x, scale=s, final=True)
        elif const_first:  # s / x
            inv = _power(ctx, node, x, power=-1.0)
            _power(ctx, node, inv, scale=s, final=True)
        else:
            _power(ctx, node, x, scale=1.0 / s, final=True)
        return
    axis = _channel_axis(const, tuple(node.shape or ()))
    vec = const.reshape(-1).to(torch.float32)
    ones = torch.ones_like(vec)
    gamma, beta = ones, None
    if op == "add":
        gamma, beta = (alpha * ones, vec) if const_first else (ones, alpha * vec)
    elif op == "sub":
        gamma, beta = (-alpha * ones, vec) if const_first else (ones, -alpha * vec)
    elif op == "mul":
        gamma = vec
    elif const_first:  # c / x
        x = _power(ctx, node, x, power=-1.0)
        gamma = vec
    else:
        gamma = 1.0 / vec
    params: dict[str, Any] = {"axis": axis} if axis != 1 else {}
    if beta is not None:
        params["bias_term"] = True
    blobs = [_np(gamma)] + ([_np(beta)] if beta is not None else [])
    ctx.step(node, "Scale", [x], {"scale_param": params}, blobs, final=True)


@rule("add", "sub", "mul", "div", check=_check_binary)
def _emit_binary(ctx: _Ctx, node: Node) -> None:
    a, b = _operands(node)
    op = node.op
    if isinstance(a, Ref) and isinstance(b, Ref):
        sa, sb = ctx.graph.shape_of(a.name), ctx.graph.shape_of(b.name)
        xa, xb = ctx.blob(a), ctx.blob(b)
        if op == "div":
            xb = _power(ctx, node, xb, power=-1.0)
        if sa != sb:  # per-channel product: flatten the small one, two-bottom Scale at axis 0
            big, small, shape = (xa, xb, sb) if sa == tuple(node.shape) else (xb, xa, sa)
            k = _prefix_broadcast(shape, tuple(node.shape))
            flat = ctx.step(node, "Reshape", [small],
                            {"reshape_param": {"shape": {"dim": list(shape[:k])}}})
            ctx.step(node, "Scale", [big, flat], {"scale_param": {"axis": 0}}, final=True)
            return
        if op in ("mul", "div"):
            ctx.step(node, "Eltwise", [xa, xb], {"eltwise_param": {"operation": "PROD"}},
                     final=True)
            return
        alpha = float(node.args.get("alpha", 1))
        coeff = [1.0, alpha if op == "add" else -alpha]
        params: dict[str, Any] = {"operation": "SUM"}
        if coeff != [1.0, 1.0]:
            params["coeff"] = coeff
        ctx.step(node, "Eltwise", [xa, xb], {"eltwise_param": params}, final=True)
        return
    if isinstance(a, Ref):
        _const_rhs(ctx, node, ctx.blob(a), b, const_first=False)
    else:
        _const_rhs(ctx, node, ctx.blob(b), a, const_first=True)


def _check_rsub(node: Node, graph: Graph, dialect: str) -> str | None:
    if not isinstance(node.args.get("self"), Ref) or _scalar(node.args.get("other")) is None:
        return "rsub with a non-scalar operand"
    return None


@rule("rsub", check=_check_rsub)
def _emit_rsub(ctx: _Ctx, node: Node) -> None:
    alpha = float(node.args.get("alpha", 1))
    _power(ctx, node, ctx.blob(node.args["self"]), scale=-alpha,
           shift=_scalar(node.args["other"]), final=True)


@rule("neg")
def _emit_neg(ctx: _Ctx, node: Node) -> None:
    _power(ctx, node, ctx.blob(_first(node)), scale=-1.0, final=True)


def _check_pow(node: Node, graph: Graph, dialect: str) -> str | None:
    if not isinstance(node.args.get("self"), Ref) or _scalar(node.args.get("exponent")) is None:
        return "only tensor ** scalar maps to Caffe Power"
    return None


@rule("pow", check=_check_pow)
def _emit_pow(ctx: _Ctx, node: Node) -> None:
    _power(ctx, node, ctx.blob(node.args["self"]), power=_scalar(node.args["exponent"]),
           final=True)


@rule("reciprocal", "sqrt", "rsqrt", "square")
def _emit_power_fn(ctx: _Ctx, node: Node) -> None:
    p = {"reciprocal": -1.0, "sqrt": 0.5, "rsqrt": -0.5, "square": 2.0}[node.op]
    _power(ctx, node, ctx.blob(_first(node)), power=p, final=True)


def _check_same_shape(node: Node, graph: Graph, dialect: str) -> str | None:
    a, b = _operands(node)
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        return "Eltwise MAX needs two tensors (use clamp for a constant bound)"
    if graph.shape_of(a.name) != graph.shape_of(b.name):
        return "Caffe Eltwise cannot broadcast"
    return None


@rule("maximum", "max", "minimum", "min", check=_check_same_shape)
def _emit_max(ctx: _Ctx, node: Node) -> None:
    a, b = _operands(node)
    xa, xb = ctx.blob(a), ctx.blob(b)
    if node.op in ("maximum", "max"):
        ctx.step(node, "Eltwise", [xa, xb], {"eltwise_param": {"operation": "MAX"}}, final=True)
        return
    na, nb = _power(ctx, node, xa, scale=-1.0), _power(ctx, node, xb, scale=-1.0)
    m = ctx.step(node, "Eltwise", [na, nb], {"eltwise_param": {"operation": "MAX"}})
    _power(ctx, node, m, scale=-1.0, final=True)  # min(a, b) = -max(-a, -b)


# ----------------------------------------------------------------------------- pooling


def caffe_pool_size(size: int, k: int, s: int, p: int) -> int:
    """Caffe's (and OpenCV's) pooled size: ceil, minus a last window starting in the padding."""
    out = int(math.ceil((size + 2 * p - k) / s)) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_geometry(node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    k = _pair(node.args["kernel_size"])
    stride = node.args.get("stride") or k
    return k, _pair(stride), _pair(node.args.get("padding", 0))


def _check_pool(node: Node, graph: Graph, dialect: str) -> str | None:
    shape = _in_shape(graph, node)
    if len(shape) != 4:
        return f"Caffe pools 4-D blobs only (got rank {len(shape)})"
    k, s, p = _pool_geometry(node)
    if _pair(node.args.get("dilation", 1)) != (1, 1):
        return "Caffe pooling has no dilation"
    if node.op == "avg_pool2d":
        if node.args.get("divisor_override") is not None:
            return "avg_pool2d divisor_override has no Caffe equivalent"
        if any(p) and not node.args.get("count_include_pad", True):
            return ("Caffe AVE pooling counts the padding; count_include_pad=False with "
                    "padding differs at the borders")
    for i in range(2):
        want = node.shape[2 + i]
        got = caffe_pool_size(shape[2 + i], k[i], s[i], p[i])
        if got not in (want, want + 1):
            return f"pooled size {got} in Caffe vs {want} in PyTorch cannot be reconciled"
    return None


def _pool(ctx: _Ctx, node: Node, method: str, k: tuple[int, int], s: tuple[int, int],
          p: tuple[int, int]) -> None:
    shape = _in_shape(ctx.graph, node)
    params = {"pool": method, **_hw("kernel", k, "kernel_size"), **_hw("stride", s, "stride", 1),
              **_hw("pad", p, "pad", 0)}
    got = [caffe_pool_size(shape[2 + i], k[i], s[i], p[i]) for i in range(2)]
    want = list(node.shape[2:])
    if got == want:
        ctx.step(node, "Pooling", [ctx.blob(_first(node))], {"pooling_param": params}, final=True)
        return
    # PyTorch floor mode: Caffe made one extra window; slice it off (portable to every reader)
    x = ctx.step(node, "Pooling", [ctx.blob(_first(node))], {"pooling_param": params})
    crop_h, crop_w = got[0] != want[0], got[1] != want[1]
    if crop_h:
        x = _slice(ctx, node, x, 2, 0, want[0], got[0], final=not crop_w)
    if crop_w:
        _slice(ctx, node, x, 3, 0, want[1], got[1], final=True)


@rule("max_pool2d", "avg_pool2d", check=_check_pool)
def _emit_pool(ctx: _Ctx, node: Node) -> None:
    k, s, p = _pool_geometry(node)
    _pool(ctx, node, "MAX" if node.op == "max_pool2d" else "AVE", k, s, p)


def _global(ctx: _Ctx, node: Node, method: str, final: bool) -> str:
    return ctx.step(node, "Pooling", [ctx.blob(_first(node))],
                    {"pooling_param": {"pool": method, "global_pooling": True}}, final=final)


def _check_adaptive(node: Node, graph: Graph, dialect: str) -> str | None:
    shape = _in_shape(graph, node)
    if len(shape) != 4:
        return "adaptive pooling of a non 4-D tensor"
    out = _pair(node.args["output_size"])
    if any(o == 0 or shape[2 + i] % o for i, o in enumerate(out)):
        return (f"adaptive pooling {list(shape[2:])} -> {list(out)} is not a fixed window; only "
                "output sizes dividing the input are exact in Caffe")
    return None


@rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d", check=_check_adaptive)
def _emit_adaptive(ctx: _Ctx, node: Node) -> None:
    shape = _in_shape(ctx.graph, node)
    out = _pair(node.args["output_size"])
    if out == (1, 1):
        _global(ctx, node, "AVE", final=True)
        return
    k = (shape[2] // out[0], shape[3] // out[1])
    _pool(ctx, node, "AVE", k, k, (0, 0))


def _reduce_dims(node: Node, graph: Graph) -> tuple[list[int], int]:
    rank = len(_in_shape(graph, node))
    dims = node.args.get("dim")
    dims = list(range(rank)) if dims in (None, []) else list(dims)
    return sorted(_norm_dim(int(d), rank) for d in dims), rank


def _check_reduce(node: Node, graph: Graph, dialect: str) -> str | None:
    if node.args.get("dtype") is not None:
        return "reduction with a dtype change"
    dims, rank = _reduce_dims(node, graph)
    if rank == 4 and dims in ([2, 3], [1]):
        return None
    return f"{node.op} over dims {dims} of a rank-{rank} tensor (Caffe: (2,3) or channel only)"


@rule("mean", "sum", check=_check_reduce)
def _emit_reduce(ctx: _Ctx, node: Node) -> None:
    dims, _ = _reduce_dims(node, ctx.graph)
    shape = _in_shape(ctx.graph, node)
    keep = bool(node.args.get("keepdim", False))
    if dims == [2, 3]:
        x = _global(ctx, node, "AVE", final=keep and node.op == "mean")
        if node.op == "sum":
            x = _power(ctx, node, x, scale=float(shape[2] * shape[3]), final=keep)
        if not keep:
            ctx.step(node, "Flatten", [x], final=True)
        return
    c = shape[1]  # channel reduction as a 1x1 convolution with constant weights
    w = np.full((1, c, 1, 1), 1.0 / c if node.op == "mean" else 1.0, np.float32)
    x = ctx.step(node, "Convolution", [ctx.blob(_first(node))],
                 {"convolution_param": {"num_output": 1, "bias_term": False, "kernel_size": 1}},
                 [w], final=keep)
    if not keep:
        _reshape(ctx, node, x, shape[:1] + shape[2:], shape)


# ----------------------------------------------------------------------------- shapes


def _reshape(ctx: _Ctx, node: Node, x: str, out: tuple[int, ...], src: tuple[int, ...]) -> None:
    if tuple(out) == tuple(src):
        ctx.alias(node, x)
        return
    if len(out) == 2 and len(src) > 2 and out[0] == src[0]:
        ctx.step(node, "Flatten", [x], final=True)
        return
    dims = list(out)
    if dims and src and dims[0] == src[0]:
        dims[0] = 0  # copy the batch axis, like every Caffe net does
    ctx.step(node, "Reshape", [x], {"reshape_param": {"shape": {"dim": dims}}}, final=True)


@rule("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze")
def _emit_reshape(ctx: _Ctx, node: Node) -> None:
    _reshape(ctx, node, ctx.blob(_first(node)), tuple(node.shape), _in_shape(ctx.graph, node))


def _check_cat(node: Node, graph: Graph, dialect: str) -> str | None:
    if not all(isinstance(t, Ref) for t in node.args["tensors"]):
        return "concatenation with a constant tensor"
    return None


@rule("cat", "concat", check=_check_cat)
def _emit_cat(ctx: _Ctx, node: Node) -> None:
    refs = node.args["tensors"]
    rank = len(node.shape)
    axis = _norm_dim(int(node.args.get("dim", 0)), rank)
    blobs = [ctx.blob(r) for r in refs]
    if len(blobs) == 1:
        ctx.alias(node, blobs[0])
        return
    ctx.step(node, "Concat", blobs, {"concat_param": {"axis": axis}}, final=True)


@rule("split", "split_with_sizes", "chunk")
def _emit_split(ctx: _Ctx, node: Node) -> None:
    src = _in_shape(ctx.graph, node)
    axis = _norm_dim(int(node.args.get("dim", 0)), len(src))
    sizes = [s[axis] for s in node.shapes]
    points = list(np.cumsum(sizes)[:-1])
    users = {int(n.args["arg1"]): n for n in ctx.graph.consumers(node.name) if n.op == "getitem"}
    tops = []
    for i in range(len(sizes)):
        tops.append(users[i].name if i in users else ctx.fresh(node.name))
    ctx.add(node.name, "Slice", [ctx.blob(_first(node))], tops,
            {"slice_param": {"axis": axis, "slice_point": [int(p) for p in points]}},
            node=node.name)
    for i, user in users.items():
        ctx.value_blobs[user.name] = tops[i]


def _check_getitem(node: Node, graph: Graph, dialect: str) -> str | None:
    src = node.args.get("arg0")
    if isinstance(src, Ref):
        try:
            op = graph.node(src.name).op
        except KeyError:
            op = ""
        if op in ("split", "split_with_sizes", "chunk"):
            return None
    return "indexing into a multi-output op other than split/chunk"


@rule("getitem", check=_check_getitem)
def _emit_getitem(ctx: _Ctx, node: Node) -> None:
    if node.name not in ctx.value_blobs:  # the Slice of the split binds it
        raise AssertionError(f"split output {node.name} was not bound")


def _slice_bounds(node: Node, graph: Graph) -> tuple[int, int, int, int]:
    src = _in_shape(graph, node)
    axis = _norm_dim(int(node.args.get("dim", 0)), len(src))
    size = src[axis]
    start, end = node.args.get("start"), node.args.get("end")
    start = 0 if start is None else int(start)
    end = size if end is None else int(end)
    start = max(0, min(size, start + size if start < 0 else start))
    end = max(start, min(size, end + size if end < 0 else end))
    return axis, start, end, size


def _check_slice(node: Node, graph: Graph, dialect: str) -> str | None:
    if int(node.args.get("step", 1)) != 1:
        return "strided slicing (step != 1) has no Caffe layer"
    axis, start, end, size = _slice_bounds(node, graph)
    if start >= end:
        return "empty slice"
    return None


@rule("slice", check=_check_slice)
def _emit_slice(ctx: _Ctx, node: Node) -> None:
    axis, start, end, size = _slice_bounds(node, ctx.graph)
    _slice(ctx, node, ctx.blob(_first(node)), axis, start, end, size, final=True)


@rule("select")
def _emit_select(ctx: _Ctx, node: Node) -> None:
    src = _in_shape(ctx.graph, node)
    axis = _norm_dim(int(node.args["dim"]), len(src))
    idx = int(node.args["index"])
    idx = idx + src[axis] if idx < 0 else idx
    kept = list(src)
    kept[axis] = 1
    x = _slice(ctx, node, ctx.blob(_first(node)), axis, idx, idx + 1, src[axis], final=False)
    _reshape(ctx, node, x, tuple(node.shape), tuple(kept))


def _pads(node: Node, graph: Graph) -> tuple[list[int], float] | str:
    if node.args.get("mode", "constant") != "constant":
        return f"padding mode '{node.args['mode']}' (Caffe pads with constants only)"
    pad = [int(p) for p in node.args["pad"]]
    rank = len(_in_shape(graph, node))
    if rank != 4 or any(pad[4:]):
        return "padding along the channel or batch axis has no Caffe layer"
    pad = (pad + [0, 0, 0, 0])[:4]
    value = node.args.get("value")
    return pad, 0.0 if value is None else float(value)


@rule("pad", "constant_pad_nd",
      check=lambda n, g, d: r if isinstance(r := _pads(n, g), str) else None)
def _emit_pad(ctx: _Ctx, node: Node) -> None:
    if node.name in ctx.folded:
        return  # the consuming convolutions pad by themselves
    pads, value = _pads(node, ctx.graph)
    left, right, top, bottom = pads
    shape = _in_shape(ctx.graph, node)
    ph, pw = max(top, bottom, 0), max(left, right, 0)
    h, w = shape[2] + 2 * ph, shape[3] + 2 * pw
    crop_h = (ph - top, h - (ph - bottom))
    crop_w = (pw - left, w - (pw - right))
    need_h, need_w = crop_h != (0, h), crop_w != (0, w)
    x = ctx.blob(_first(node))
    if ph or pw:
        last = not (value or need_h or need_w)
        if value:
            x = _power(ctx, node, x, shift=-value)
        c = shape[1]
        x = ctx.step(node, "Convolution", [x], {"convolution_param": {
            "num_output": c, "bias_term": False, "kernel_size": 1, "group": c,
            **_hw("pad", (ph, pw), "pad", 0)}}, [np.ones((c, 1, 1, 1), np.float32)], final=last)
        if value:
            x = _power(ctx, node, x, shift=value, final=not (need_h or need_w))
    if need_h:
        x = _slice(ctx, node, x, 2, crop_h[0], crop_h[1], h, final=not need_w)
    if need_w:
        x = _slice(ctx, node, x, 3, crop_w[0], crop_w[1], w, final=True)
    if node.name not in ctx.value_blobs:
        ctx.alias(node, x)


# ----------------------------------------------------------------------------- resampling


def _factors(node: Node, graph: Graph) -> tuple[int, int] | str:
    src = _in_shape(graph, node)
    out = node.shape
    if len(src) != 4:
        return "upsampling a non 4-D tensor"
    f = []
    for i in range(2):
        if out[2 + i] % src[2 + i]:
            return f"size {src[2 + i]} -> {out[2 + i]} is not an integer factor"
        f.append(out[2 + i] // src[2 + i])
    scales = node.args.get("scale_factors") or [node.args.get("scales_h"),
                                                node.args.get("scales_w")]
    for sc, fi in zip(scales, f):
        if sc is not None and float(sc) != fi:
            return f"scale factor {sc} is not the integer {fi}"
    return f[0], f[1]


def _check_nearest(node: Node, graph: Graph, dialect: str) -> str | None:
    f = _factors(node, graph)
    return f if isinstance(f, str) else None


@rule("upsample_nearest2d", "_upsample_nearest_exact2d", check=_check_nearest)
def _emit_nearest(ctx: _Ctx, node: Node) -> None:
    fh, fw = _factors(node, ctx.graph)
    c = _in_shape(ctx.graph, node)[1]
    x = ctx.blob(_first(node))
    if ctx.dialect == "om":
        ctx.step(node, "Upsample", [x], {"upsample_param": {
            "scale": 1.0, "stride_h": fh, "stride_w": fw}}, final=True)
        ctx.extras.setdefault("upsample_channels", {})[node.name] = c
        return
    ctx.step(node, "Deconvolution", [x], {"convolution_param": nearest_deconv_param(c, fh, fw)},
             [np.ones((c, 1, fh, fw), np.float32)], final=True)


def nearest_deconv_param(c: int, fh: int, fw: int) -> dict[str, Any]:
    """A depthwise Deconvolution that repeats every pixel ``fh x fw`` times (weights all 1)."""
    return {"num_output": c, "bias_term": False, "group": c,
            **_hw("kernel", (fh, fw), "kernel_size"), **_hw("stride", (fh, fw), "stride")}


def _check_bilinear(node: Node, graph: Graph, dialect: str) -> str | None:
    if node.args.get("align_corners"):
        return "bilinear with align_corners=True has no exact BVLC construct"
    f = _factors(node, graph)
    return f if isinstance(f, str) else None


def _repeat_edges(ctx: _Ctx, node: Node, x: str, axis: int, size: int) -> str:
    """Concat(first, x, last) along ``axis``: the border PyTorch's bilinear clamps to."""
    if size == 1:
        parts = [x, x, x]
    else:
        first = ctx.fresh(node.name)
        ctx.add(first, "Slice", [x], [first, ctx.fresh(node.name)],
                {"slice_param": {"axis": axis, "slice_point": [1]}}, node=node.name)
        last = ctx.fresh(node.name)
        ctx.add(last, "Slice", [x], [ctx.fresh(node.name), last],
                {"slice_param": {"axis": axis, "slice_point": [size - 1]}}, node=node.name)
        parts = [first, x, last]
    return ctx.step(node, "Concat", parts, {"concat_param": {"axis": axis}})


def bilinear_taps(f: int) -> tuple[np.ndarray, int]:
    """1-D Deconvolution kernel and pad reproducing align_corners=False bilinear by ``f``.

    On an input whose edges are repeated once, output ``o`` of a stride-``f`` Deconvolution
    is sum_i x'[i] w[o + pad - f*i]; with w[k] = max(0, 1 - |k - c|/f) that is exactly
    PyTorch's interpolation at source (o + 1/2)/f - 1/2 when c = pad - 1/2 - f/2 is the
    kernel's centre: kernel 2f and pad 3f/2 for even f, kernel 2f+1 and pad (3f+1)/2 for odd.
    """
    size = 2 * f + (f % 2)
    pad = (3 * f + (f % 2)) // 2
    centre = pad - 0.5 - f / 2
    k = np.arange(size, dtype=np.float64)
    return np.maximum(0.0, 1.0 - np.abs(k - centre) / f).astype(np.float32), pad


@rule("upsample_bilinear2d", check=_check_bilinear)
def _emit_bilinear(ctx: _Ctx, node: Node) -> None:
    shape = _in_shape(ctx.graph, node)
    c = shape[1]
    fh, fw = _factors(node, ctx.graph)
    x = _repeat_edges(ctx, node, ctx.blob(_first(node)), 2, shape[2])
    x = _repeat_edges(ctx, node, x, 3, shape[3])
    (th, ph), (tw, pw) = bilinear_taps(fh), bilinear_taps(fw)
    w = np.broadcast_to(np.outer(th, tw), (c, 1, th.size, tw.size)).copy()
    ctx.step(node, "Deconvolution", [x], {"convolution_param": {
        "num_output": c, "bias_term": False, "group": c,
        **_hw("kernel", (th.size, tw.size), "kernel_size"), **_hw("stride", (fh, fw), "stride"),
        **_hw("pad", (ph, pw), "pad")}}, [w], final=True)


# ----------------------------------------------------------------------------- argmax


def _check_argmax(node: Node, graph: Graph, dialect: str) -> str | None:
    if node.args.get("dim") is None:
        return "argmax over the flattened tensor (give dim=...)"
    return None


@rule("argmax", check=_check_argmax)
def _emit_argmax(ctx: _Ctx, node: Node) -> None:
    src = _in_shape(ctx.graph, node)
    axis = _norm_dim(int(node.args["dim"]), len(src))
    keep = bool(node.args.get("keepdim", False))
    x = ctx.step(node, "ArgMax", [ctx.blob(_first(node))],
                 {"argmax_param": {"axis": axis, "top_k": 1}}, final=keep)
    if not keep:
        kept = list(src)
        kept[axis] = 1
        _reshape(ctx, node, x, tuple(node.shape), tuple(kept))


def supported_ops() -> frozenset[str]:
    return frozenset(RULES)
