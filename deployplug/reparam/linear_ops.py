"""Which nodes of a traced graph are linear, translation-equivariant ops, read from the graph.

:func:`classify` walks a ``torch.fx`` graph once and sorts every node into one of three kinds:

* **constants**: parameters and buffers (``get_attr``) and any arithmetic on them alone
  (``self.gamma.view(1, -1, 1, 1)``, a BatchNorm's bias-equivalent), evaluated in float64 from
  the stored values, never from an input;
* **linear ops** (:class:`LinearOp`): a convolution with zero or other padding, an eval
  BatchNorm, identity and eval dropout, a per-channel or scalar scale and shift, padding,
  average pooling, and the sum or difference of two tensors, each with the data input(s) it
  reads and the attributes the algebra needs;
* everything else, which ends a region. Ops that *look* linear but are not exactly one
  convolution (a BatchNorm without running statistics, an average pool that divides by the
  number of valid pixels at the border, ``ceil_mode``) are remembered with the reason, so a
  region cut short by one can say why.

Modules are trusted only as far as :mod:`deployplug.reparam.eligibility` trusts them: torch's
own classes with their own ``forward`` and no hooks. A subclass that overrides ``forward`` is
traced *through* by the region tracer instead, so what it really computes is what is seen.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from deployplug.reparam.eligibility import _CALL_PATH, _changed_method, bn_blocker, conv_blocker

ADD = {operator.add, operator.iadd, torch.add, "add"}
SUB = {operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "subtract"}
MUL = {operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "multiply"}
DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "divide",
       "true_divide"}
NEG = {operator.neg, torch.neg, torch.negative, "neg", "negative"}
PASS_THROUGH = {operator.pos, torch.clone, "clone", "contiguous"}
DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            F.feature_alpha_dropout}
CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
POOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout)
_PAD_MODULES = {nn.ZeroPad1d: "zeros", nn.ZeroPad2d: "zeros", nn.ZeroPad3d: "zeros",
                nn.ConstantPad1d: "zeros", nn.ConstantPad2d: "zeros", nn.ConstantPad3d: "zeros",
                nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
                nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
                nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
                nn.CircularPad1d: "circular", nn.CircularPad2d: "circular",
                nn.CircularPad3d: "circular"}
_DIMS_OF = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
            nn.AvgPool3d: 3, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
# torch's own leaf modules the pass reads as linear ops. It only ever reads them (and drops
# the ones it collapses), so a deploy copy may lend them out instead of copying them.
LINEAR_LEAF_CLASSES: frozenset[type] = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, *_IDENTITY_MODULES, *_PAD_MODULES})
# Constant folding runs arbitrary torch functions on parameters; these draw random numbers,
# allocate uninitialised memory or write in place, so their result is not a fixed value.
_IMPURE_WORDS = ("rand", "normal", "bernoulli", "dropout", "empty", "uniform", "multinomial",
                 "poisson", "exponential", "seed", "cauchy", "geometric", "log_normal")


@dataclass
class LinearOp:
    """One linear op of the graph: what it is, which data it reads, what the algebra needs.

    ``kind`` is one of ``conv``, ``batch_norm``, ``affine``, ``identity``, ``pad``,
    ``avg_pool``, ``add``. ``dims`` is the spatial rank the op implies when it implies one;
    ``channels`` maps ``"in"``/``"out"`` to the channel counts it fixes.
    """

    node: fx.Node
    kind: str
    inputs: tuple[fx.Node, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str | None = None
    dims: int | None = None
    channels: dict[str, int] = field(default_factory=dict)

    @property
    def report_kind(self) -> str:
        """Name used in op counts: ``add`` for a sum or difference of branches."""
        if self.kind == "affine":
            return "scale_shift"
        return self.kind


@dataclass
class Classified:
    """Result of :func:`classify` for one graph."""

    ops: dict[fx.Node, LinearOp]
    constants: dict[fx.Node, Any]
    near_misses: dict[fx.Node, str]
    scopes: dict[fx.Node, tuple[str, ...]]


# ----------------------------------------------------------------------------- helpers

def fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _as64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    if isinstance(value, torch.Tensor):
        return value.detach()
    return value


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _impure(target: Any) -> bool:
    name = _name(target).lower()
    if name.endswith("_") and not name.endswith("__"):
        return True
    return any(word in name for word in _IMPURE_WORDS)


def _plain(module: nn.Module, base: type) -> bool:
    """``module`` computes what ``base`` computes: inherited forward and call path, no hooks."""
    return (isinstance(module, base)
            and _changed_method(type(module), base, ("forward", *_CALL_PATH)) is None
            and not hooks_of(module))


def hooks_of(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(module, "_forward_hooks_with_kwargs", None)
                or getattr(module, "_forward_pre_hooks_with_kwargs", None))


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    bound = dict(defaults)
    if len(node.args) > len(names):
        raise TypeError("too many positional arguments")
    bound.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names:
            raise TypeError(f"unexpected keyword {key}")
        bound[key] = value
    return bound


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    return out * dims if len(out) == 1 else out


def conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(before, after) per spatial dim for a conv ``padding`` (ints or ``same``/``valid``).

    ``same`` splits ``dilation * (k - 1)`` with the smaller half first, as torch does.
    """
    dims = len(kernel)
    if padding == "valid":
        return (0,) * dims, (0,) * dims
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    p = _tuple(padding, dims)
    return p, p


def channel_dim_hint(value: torch.Tensor | float) -> tuple[int | None, int | None] | None:
    """For a constant that scales or shifts a tensor: (spatial rank, channels) it implies.

    A constant broadcast against ``(N, C, *spatial)`` acts per channel only if its single
    non-1 dim sits on ``C``; its position from the right is then the spatial rank. All-1
    shapes are scalars (rank unknown). ``None`` means it varies over more than one dim, so
    it is no per-channel constant at all.
    """
    if not isinstance(value, torch.Tensor):
        return (None, None)
    shape = tuple(value.shape)
    big = [i for i, s in enumerate(shape) if s != 1]
    if not big:
        return (None, None)
    if len(big) > 1:
        return None
    return (len(shape) - 1 - big[0], shape[big[0]])


# ----------------------------------------------------------------------------- classify

def classify(graph: fx.Graph, root: nn.Module) -> Classified:
    """Sort every node of ``graph`` (traced from ``root``) into constants, linear ops and the
    rest; see the module docstring."""
    out = Classified({}, {}, {}, {})
    for node in graph.nodes:
        out.scopes[node] = _scope(node)
        if node.op == "get_attr":
            try:
                out.constants[node] = _as64(fetch_attr(root, str(node.target)))
            except AttributeError:
                continue
            continue
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        refs = node.all_input_nodes
        if node.op != "call_module" and all(r in out.constants for r in refs):
            value = _fold_constant(node, out.constants)
            if value is not _NOT_CONSTANT:
                out.constants[node] = value
            continue
        try:
            result = _linear(node, root, out.constants)
        except (TypeError, ValueError, AttributeError):
            continue
        if isinstance(result, LinearOp):
            out.ops[node] = result
        elif isinstance(result, str):
            out.near_misses[node] = result
    return out


_NOT_CONSTANT = object()


def _fold_constant(node: fx.Node, constants: dict[fx.Node, Any]) -> Any:
    if _impure(node.target):
        return _NOT_CONSTANT
    target = node.target
    args = fx.node.map_arg(node.args, lambda n: constants[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: constants[n])
    try:
        with torch.no_grad():
            if node.op == "call_method":
                assert isinstance(target, str), "fx names a called method by its name"
                return getattr(args[0], target)(*args[1:], **kwargs)
            assert callable(target), "fx holds a called function as the function itself"
            return target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a constant that cannot be evaluated is no constant
        return _NOT_CONSTANT


def _scope(node: fx.Node) -> tuple[str, ...]:
    """Module paths (outermost first) whose forward made this call; a called leaf module is
    not its own scope."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [entry[0] for entry in stack.values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return tuple(paths)


def _data(args: Iterable[Any], constants: dict[fx.Node, Any]) -> list[fx.Node]:
    return [a for a in args if isinstance(a, fx.Node) and a not in constants]


def _value(arg: Any, constants: dict[fx.Node, Any]) -> Any:
    return constants[arg] if isinstance(arg, fx.Node) else arg


def _linear(node: fx.Node, root: nn.Module,
            constants: dict[fx.Node, Any]) -> LinearOp | str | None:
    if node.op == "call_module":
        return _module_op(node, fetch_attr(root, str(node.target)))
    target = node.target
    method = node.op == "call_method"
    key: Any = target
    if key in ADD or key in SUB:
        return _add_sub(node, constants, subtract=key in SUB)
    if key in MUL:
        return _mul(node, constants)
    if key in DIV:
        if node.kwargs.get("rounding_mode") is not None or len(node.args) != 2:
            return None
        x, c = node.args
        if not isinstance(x, fx.Node) or x in constants or _data([c], constants):
            return None
        return _affine(node, x, 1.0 / _value(c, constants), None)
    if key in NEG:
        (x,) = node.args
        return _affine(node, x, -1.0, None)
    if key in PASS_THROUGH:
        if len(node.args) == 1 and not node.kwargs:
            return LinearOp(node, "identity", (_traced(node.args[0]),))
        return None
    if method:
        return None
    if target in DROPOUTS:
        bound = _bind(node, ("input", "p", "training", "inplace"),
                      {"p": 0.5, "training": True, "inplace": False})
        if bound["training"] is False:
            return LinearOp(node, "identity", (_traced(bound["input"]),))
        return "dropout in training mode"
    if target in CONV_FUNCS:
        return _functional_conv(node, constants, CONV_FUNCS[target])
    if target is F.batch_norm:
        return _functional_bn(node, constants)
    if target is F.pad:
        bound = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant",
                                                                "value": None})
        return _pad(node, bound["input"], tuple(bound["pad"]), bound["mode"], bound["value"])
    if target in POOL_FUNCS:
        return _functional_pool(node, POOL_FUNCS[target])
    return None


def _traced(arg: Any) -> fx.Node:
    """``arg`` as the data input of an op. fx only ever passes a traced value (a Node) there;
    anything else is no data input, and the ``TypeError`` makes :func:`classify` leave the
    node unclassified instead of recording an op that reads a literal."""
    if not isinstance(arg, fx.Node):
        raise TypeError(f"expected a traced value as data input, got {type(arg).__name__}")
    return arg


def _affine(node: fx.Node, x: Any, scale: Any, shift: Any) -> LinearOp | None:
    if not isinstance(x, fx.Node):
        return None
    hints = [channel_dim_hint(v) for v in (scale, shift) if v is not None]
    known = [h for h in hints if h is not None]
    if len(known) != len(hints):
        return None  # varies over a spatial or batch dim: not translation-equivariant
    op = LinearOp(node, "affine", (x,), {"scale": scale, "shift": shift})
    for dims, channels in known:
        if dims is not None:
            assert channels is not None, "a channel dim is only found together with its size"
            op.dims = dims
            op.channels = {"in": channels, "out": channels}
    ranks = [v.dim() for v in (scale, shift) if isinstance(v, torch.Tensor)]
    op.attrs["rank"] = max(ranks, default=0)
    return op


def _add_sub(node: fx.Node, constants: dict[fx.Node, Any], subtract: bool) -> LinearOp | None:
    if len(node.args) != 2:
        return None
    alpha = node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"alpha"} or not isinstance(alpha, (int, float)):
        return None
    a, b = node.args
    sign = -1.0 if subtract else 1.0
    data = _data((a, b), constants)
    if len(data) == 2:  # both are data inputs, in order
        return LinearOp(node, "add", (data[0], data[1]), {"coefficients": (1.0, sign * alpha)})
    if len(data) != 1:
        return None
    if data[0] is a:
        return _affine(node, a, None, _scaled(_value(b, constants), sign * alpha))
    return _affine(node, b, sign * alpha, _value(a, constants))


def _scaled(value: Any, factor: float) -> Any:
    return value if factor == 1 else value * factor


def _mul(node: fx.Node, constants: dict[fx.Node, Any]) -> LinearOp | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    data = _data((a, b), constants)
    if len(data) != 1:
        return None
    x, c = (a, b) if data[0] is a else (b, a)
    return _affine(node, x, _value(c, constants), None)


def _module_op(node: fx.Node, module: nn.Module) -> LinearOp | str | None:
    if len(node.args) != 1 or node.kwargs:
        return None
    x = node.args[0]
    if not isinstance(x, fx.Node):
        return None
    path = str(node.target)
    if isinstance(module, _ConvNd):
        if module.transposed:
            return None
        reason = conv_blocker(module)
        if reason is not None:
            return f"convolution '{path}' is not a plain torch convolution: {reason}"
        k = tuple(module.kernel_size)
        before, after = conv_padding(module.padding, k, tuple(module.dilation))
        return LinearOp(node, "conv", (x,), {
            "module": module, "stride": tuple(module.stride), "dilation": tuple(module.dilation),
            "groups": module.groups, "before": before, "after": after,
            "padding_mode": module.padding_mode}, path, len(k),
            {"in": module.in_channels, "out": module.out_channels})
    if isinstance(module, _BatchNorm):
        reason = bn_blocker(module)
        if reason is None and (module.running_mean is None or module.running_var is None):
            reason = "it has no running statistics, so it normalises with batch statistics"
        if reason is not None:
            return f"BatchNorm '{path}': {reason}"
        return LinearOp(node, "batch_norm", (x,), {
            "mean": module.running_mean, "var": module.running_var, "eps": module.eps,
            "weight": module.weight, "bias": module.bias}, path, _DIMS_OF.get(type(module)),
            {"in": module.num_features, "out": module.num_features})
    if any(_plain(module, base) for base in _IDENTITY_MODULES):
        return LinearOp(node, "identity", (x,), {}, path)
    for base, mode in _PAD_MODULES.items():
        if _plain(module, base):
            dims = int(base.__name__[-2])
            value = float(getattr(module, "value", 0.0))
            # a cast: nn.Module.__getattr__ is typed Tensor | Module; the pad classes hold ints
            padding = cast("tuple[int, ...]", module.padding)
            return _pad(node, x, tuple(padding), "constant" if mode == "zeros" else mode,
                        value, path, dims)
    pool = next((b for b in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
                 if _plain(module, b)), None)
    if pool is not None:
        assert isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)), "_plain checked"
        dims = _DIMS_OF[pool]
        return _pool(node, x, dims, module.kernel_size, module.stride, module.padding,
                     module.ceil_mode, module.count_include_pad,
                     getattr(module, "divisor_override", None), path)
    return None


def _pad(node: fx.Node, x: Any, pad: tuple[int, ...], mode: str, value: Any,
         path: str | None = None, dims: int | None = None) -> LinearOp | str | None:
    if not isinstance(x, fx.Node) or len(pad) % 2:
        return None
    if mode == "constant":
        mode = "zeros"
    if mode not in ("zeros", "reflect", "replicate", "circular"):
        return None
    n = len(pad) // 2
    before = tuple(int(v) for v in pad[0::2])[::-1]  # F.pad lists the last dim first
    after = tuple(int(v) for v in pad[1::2])[::-1]
    if any(v < 0 for v in before + after):
        return f"padding at '{path or node.name}' crops (negative padding)"
    return LinearOp(node, "pad", (x,), {"before": before, "after": after, "mode": mode,
                                        "value": 0.0 if value is None else float(value),
                                        "padded_dims": n}, path, dims)


def _pool(node: fx.Node, x: fx.Node, dims: int, kernel: Any, stride: Any, padding: Any,
          ceil_mode: bool, count_include_pad: bool, divisor: Any,
          path: str | None) -> LinearOp | str:
    k = _tuple(kernel, dims)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _tuple(
        stride, dims)
    p = _tuple(padding, dims)
    where = path or node.name
    if ceil_mode:
        return (f"average pool '{where}' uses ceil_mode=True, whose last window may be partial "
                "and divided differently")
    if divisor is None and not count_include_pad and any(p):
        return (f"average pool '{where}' pads with count_include_pad=False, so its border "
                "windows divide by fewer pixels than the interior ones")
    return LinearOp(node, "avg_pool", (x,), {
        "kernel": k, "stride": s, "padding": p,
        "divisor": float(divisor) if divisor else float(math.prod(k))}, path, dims)


def _functional_conv(node: fx.Node, constants: dict[fx.Node, Any], dims: int) -> LinearOp | None:
    bound = _bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    x, w, b = bound["input"], bound["weight"], bound["bias"]
    if not isinstance(x, fx.Node) or x in constants or w not in constants:
        return None
    if b is not None and b not in constants:
        return None
    weight = constants[w]
    if not isinstance(weight, torch.Tensor) or weight.dim() != dims + 2:
        return None
    dilation = _tuple(bound["dilation"], dims)
    before, after = conv_padding(bound["padding"], tuple(weight.shape[2:]), dilation)
    groups = int(bound["groups"])
    return LinearOp(node, "conv", (x,), {
        "weight": weight, "bias": None if b is None else constants[b],
        "stride": _tuple(bound["stride"], dims), "dilation": dilation, "groups": groups,
        "before": before, "after": after, "padding_mode": "zeros"}, None, dims,
        {"in": weight.shape[1] * groups, "out": weight.shape[0]})


def _functional_bn(node: fx.Node, constants: dict[fx.Node, Any]) -> LinearOp | str | None:
    bound = _bind(node, ("input", "running_mean", "running_var", "weight", "bias", "training",
                         "momentum", "eps"),
                  {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                   "eps": 1e-5})
    x = bound["input"]
    if bound["training"] is not False:
        return "batch_norm called in training mode (batch statistics)"
    values = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        arg = bound[name]
        if arg is not None and arg not in constants:
            return None
        values[name] = None if arg is None else constants[arg]
    if values["running_mean"] is None or values["running_var"] is None:
        return "batch_norm without running statistics"
    c = values["running_mean"].numel()
    return LinearOp(node, "batch_norm", (x,), {
        "mean": values["running_mean"], "var": values["running_var"],
        "eps": float(bound["eps"]), "weight": values["weight"], "bias": values["bias"]},
        None, None, {"in": c, "out": c})


def _functional_pool(node: fx.Node, dims: int) -> LinearOp | str | None:
    names: tuple[str, ...] = ("input", "kernel_size", "stride", "padding", "ceil_mode",
                              "count_include_pad")
    if dims > 1:
        names += ("divisor_override",)
    bound = _bind(node, names, {"stride": None, "padding": 0, "ceil_mode": False,
                                "count_include_pad": True, "divisor_override": None})
    x = bound["input"]
    if not isinstance(x, fx.Node):
        return None
    return _pool(node, x, dims, bound["kernel_size"], bound["stride"], bound["padding"],
                 bool(bound["ceil_mode"]), bool(bound["count_include_pad"]),
                 bound.get("divisor_override"), None)


def describe_node(node: fx.Node, op: LinearOp | None = None) -> str:
    """Short human name for a node: the module path if it is a module call, else the op."""
    if op is not None and op.module:
        return op.module
    if node.op == "call_module":
        return str(node.target)
    return f"{_name(node.target)} ({node.name})"

