"""Model -> one normalized graph, shared by the pre-flight check and every graph lowering.

Why ``torch.export`` and not hooks: converters that monkeypatch ``torch.nn.functional`` miss
aliases (``x.relu()``, ``torch.relu``), in-place forms and scalar operands. ``torch.export``
records every op at the ATen level whatever Python spelling produced it, gives each node a
concrete shape and the module path it came from, and never touches global state.

The normalized graph keeps exactly what a lowering needs:

* ``Node.op`` is the ATen op name without namespace, overload or in-place underscore
  (``conv2d``, ``add``, ``max_pool2d``, ``upsample_bilinear2d``...).
* ``Node.args`` binds every schema argument *by name* with defaults filled in. Activation
  tensors appear as :class:`Ref`; parameters, buffers and constants appear as real tensors,
  so ``node.args["weight"]`` of a ``conv2d`` is the weight itself.
* ``Node.inputs`` lists the activation values a node reads, in schema order.
* Identity-like ops (``clone``, ``contiguous``, ``dropout`` in eval, ``alias``...) are removed.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from deployplug.errors import CaptureError

# Ops that only forward their first input at inference time.
_IDENTITY_OPS = frozenset(
    {
        "clone",
        "contiguous",
        "alias",
        "detach",
        "lift_fresh_copy",
        "dropout",
        "feature_dropout",
        "alpha_dropout",
        "feature_alpha_dropout",
        "native_dropout",
        "_to_copy",
        "to",
        "type_as",
    }
)
# Ops whose node is kept for its side effect only in export IR; they produce no value we use.
_DROPPED_OPS = frozenset(
    {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}
)
# Multi-output ATen ops of which inference only uses output 0; collapsed to one value.
_FIRST_RESULT_OPS = {
    "_native_batch_norm_legit_no_training": "batch_norm",
    "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
    "max_pool2d_with_indices": "max_pool2d",
    "native_layer_norm": "layer_norm",
}


@dataclass(frozen=True)
class Ref:
    """A reference to an activation value: a graph input or a node output."""

    name: str


@dataclass(frozen=True)
class Value:
    """A graph input or output: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Node:
    """One normalized op. See the module docstring for the conventions."""

    name: str
    op: str
    target: str
    args: dict[str, Any]
    inputs: list[str]
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    module_path: str
    module_type: str
    shapes: tuple[tuple[int, ...], ...] = field(default_factory=tuple)
    # Name of the torch.fx node this was normalized from (the graph rewriter needs it).
    fx_name: str = ""

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output shape of a node that yields one tensor (``shape`` says ``None`` otherwise).

        Lowering and rules size things from it; a node without one is refused by name here
        rather than failing later with a bare ``TypeError``.
        """
        if self.shape is None:
            raise CaptureError(f"node {self.name} ({self.op} at '{self.where}') has no single "
                               "tensor output shape")
        return self.shape

    @property
    def where(self) -> str:
        """Module path for messages; the model's own forward when the op is top-level."""
        return self.module_path or "<top-level forward>"


@dataclass
class Graph:
    """A topologically ordered, normalized inference graph."""

    inputs: list[Value]
    nodes: list[Node]
    outputs: list[str]
    output_values: list[Value] = field(default_factory=list)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of any value (input or node output) by name."""
        for v in self.inputs:
            if v.name == name:
                return v.shape
        shape = self.node(name).shape
        if shape is None:
            raise KeyError(f"value {name!r} has no single tensor shape")
        return shape

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def ops(self) -> Counter[str]:
        return Counter(n.op for n in self.nodes)


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variant: same maths on a functional graph
    return _FIRST_RESULT_OPS.get(name, name)


def _module_info(fx_node: torch.fx.Node) -> tuple[str, str]:
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, type_name = list(stack.values())[-1]
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    path = _clean_path(path)
    return path, type_name.rsplit(".", 1)[-1]


def _clean_path(path: str) -> str:
    """``L['self'].layer1[0].conv`` style paths (strict export) -> ``layer1.0.conv``."""
    path = path.replace("L['self']", "").replace("['", ".").replace("']", "")
    path = path.replace("[", ".").replace("]", "")
    return path.lstrip(".")


class _Namer:
    """Readable unique node names that carry the module path (used for Caffe layer names)."""

    def __init__(self, per_module: Counter[str]):
        self._per_module = per_module
        self._used: set[str] = set()

    def __call__(self, module_path: str, op: str, fallback: str) -> str:
        if module_path and self._per_module[module_path] == 1:
            base = module_path
        elif module_path:
            base = f"{module_path}.{op}"
        else:
            base = fallback
        name, i = base, 1
        while name in self._used:
            name = f"{base}_{i}"
            i += 1
        self._used.add(name)
        return name


def export_program(
    model: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    """``torch.export`` the model (non-strict) and functionalize it without decomposing ops."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, tuple(example_inputs), strict=False)
            return program.run_decompositions({})
    except Exception as exc:  # torch raises many unrelated types here
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Make forward() free of "
            "data-dependent Python control flow, or export a sub-module."
        ) from exc


class CaptureCache:
    """``torch.export`` results of one export run, keyed by the module object captured.

    An export of three formats hands the same target-legal module to several stages (the
    decomposition pass of each target, each writer); ``torch.export`` is by far the slowest
    step, so each module is captured once. Keys are object identities, and the cache holds
    the module too, so an id cannot be reused by another object while the cache lives. The
    example inputs are fixed for the life of the cache.
    """

    def __init__(self, example_inputs: Sequence[torch.Tensor]):
        self.inputs = tuple(example_inputs)
        self._entries: dict[int, tuple[nn.Module, torch.export.ExportedProgram, Graph]] = {}
        self.captures = 0  # how many times torch.export actually ran (for tests and benches)

    def program_and_graph(self, model: nn.Module) -> tuple[torch.export.ExportedProgram, Graph]:
        entry = self._entries.get(id(model))
        if entry is None or entry[0] is not model:
            program = export_program(model, self.inputs)
            entry = (model, program, fold_constants(graph_from_program(program)))
            self._entries[id(model)] = entry
            self.captures += 1
        return entry[1], entry[2]

    def graph(self, model: nn.Module) -> Graph:
        return self.program_and_graph(model)[1]


def capture(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
            fold: bool = True) -> Graph:
    """Capture ``model`` (put in eval mode by the caller) on ``example_inputs``.

    With ``fold`` (the default) arithmetic on parameters alone (``self.scale.exp()``,
    ``w.flip(1)``) is evaluated now, so every consumer of the graph sees constants there.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    program = export_program(model, example_inputs)
    graph = graph_from_program(program)
    return fold_constants(graph) if fold else graph


def graph_from_program(program: torch.export.ExportedProgram) -> Graph:
    """Normalize an :class:`~torch.export.ExportedProgram` into a :class:`Graph`."""
    sig = program.graph_signature
    state = dict(program.state_dict)
    constants = dict(getattr(program, "constants", {}) or {})
    lifted: dict[str, torch.Tensor] = {}
    for spec in sig.input_specs:
        arg_name = getattr(spec.arg, "name", None)
        if spec.target is None or arg_name is None:
            continue
        if spec.target in state:
            lifted[arg_name] = state[spec.target].detach()
        elif spec.target in constants:
            const = constants[spec.target]
            if isinstance(const, torch.Tensor):
                lifted[arg_name] = const.detach()
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]

    fx_nodes = list(program.graph.nodes)
    per_module: Counter[str] = Counter()
    for n in fx_nodes:
        if n.op == "call_function" and _op_name(n.target) not in ("getitem", *_DROPPED_OPS):
            per_module[_module_info(n)[0]] += 1
    namer = _Namer(per_module)

    alias: dict[str, str] = {}  # fx name -> normalized value name
    inputs: list[Value] = []
    nodes: list[Node] = []
    for n in fx_nodes:
        if n.op == "placeholder" and n.name in user_inputs:
            val = n.meta.get("val")
            inputs.append(Value(n.name, tuple(val.shape), val.dtype))
            alias[n.name] = n.name
        elif n.op == "call_function":
            node = _normalize(n, lifted, alias, namer)
            if node is not None:
                nodes.append(node)

    outputs: list[str] = []
    output_values: list[Value] = []
    out_node = next(n for n in fx_nodes if n.op == "output")
    for arg in _as_tuple(out_node.args[0]):
        if isinstance(arg, torch.fx.Node):
            name = alias.get(arg.name, arg.name)
            outputs.append(name)
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                output_values.append(Value(name, tuple(val.shape), val.dtype))
    return Graph(inputs=inputs, nodes=nodes, outputs=outputs, output_values=output_values)


def _bind(fx_node: torch.fx.Node) -> dict[str, Any]:
    schema = getattr(fx_node.target, "_schema", None)
    if schema is None:
        return {f"arg{i}": a for i, a in enumerate(fx_node.args)} | dict(fx_node.kwargs)
    bound: dict[str, Any] = {}
    positional = list(fx_node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(positional) and not arg.kwarg_only:
            bound[arg.name] = positional[i]
        elif arg.name in fx_node.kwargs:
            bound[arg.name] = fx_node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _normalize(
    n: torch.fx.Node, lifted: dict[str, torch.Tensor], alias: dict[str, str], namer: _Namer
) -> Node | None:
    op = _op_name(n.target)
    if op in _DROPPED_OPS:
        return None
    raw = _bind(n)

    if op == "getitem":
        source, index = n.args[0], n.args[1]
        assert isinstance(source, torch.fx.Node)  # getitem always indexes a node's result
        src_name = alias.get(source.name)
        src_op = _op_name(source.target) if source.op == "call_function" else ""
        if src_name is not None and src_op in _FIRST_RESULT_OPS.values() and index == 0:
            alias[n.name] = src_name
            return None

    def convert(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            if value.name in lifted:
                return lifted[value.name]
            return Ref(alias.get(value.name, value.name))
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    args = {k: convert(v) for k, v in raw.items()}
    refs: list[str] = []
    for v in args.values():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, Ref) and item.name not in refs:
                refs.append(item.name)

    if op in _IDENTITY_OPS and refs:
        alias[n.name] = refs[0]
        return None

    val = n.meta.get("val")
    if op in _FIRST_RESULT_OPS.values() and isinstance(val, (list, tuple)):
        val = val[0]
    shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    dtype = val.dtype if isinstance(val, torch.Tensor) else None
    shapes: tuple[tuple[int, ...], ...] = ()
    if isinstance(val, (list, tuple)):
        shapes = tuple(tuple(v.shape) for v in val if isinstance(v, torch.Tensor))
    module_path, module_type = _module_info(n)
    name = namer(module_path, op, n.name)
    alias[n.name] = name
    return Node(
        name=name,
        op=op,
        target=str(n.target),
        args=args,
        inputs=refs,
        shape=shape,
        dtype=dtype,
        module_path=module_path,
        module_type=module_type,
        shapes=shapes,
        fx_name=n.name,
    )


def format_graph(graph: Graph) -> str:
    """A compact human-readable listing (used in reports and debugging)."""
    lines = [f"inputs: {', '.join(f'{v.name}{list(v.shape)}' for v in graph.inputs)}"]
    for n in graph.nodes:
        lines.append(f"{n.name:<40} {n.op:<24} {n.inputs} -> {list(n.shape or ())}")
    lines.append(f"outputs: {', '.join(graph.outputs)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluation
def run_node(node: Node, args: dict[str, Any]) -> Any:
    """Run one normalized node's ATen op on concrete arguments (bound by schema name)."""
    if node.op == "getitem":
        return operator.getitem(args["arg0"], args["arg1"])
    fn: Any = torch.ops
    for part in node.target.split("."):
        fn = getattr(fn, part)
    result = fn(**args)
    if isinstance(result, (tuple, list)) and node.shape is not None:
        result = result[0]  # collapsed multi-result ops: inference uses result 0 only
    return result


def _substitute(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, Ref) and value.name in env:
        return env[value.name]
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    return value


def evaluate(graph: Graph, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """PyTorch's value of every graph value, by name: the reference for layer-by-layer checks."""
    env: dict[str, Any] = {v.name: t for v, t in zip(graph.inputs, inputs, strict=True)}
    with torch.no_grad():
        for node in graph.nodes:
            env[node.name] = run_node(node, {k: _substitute(v, env) for k, v in node.args.items()})
    return env


def fold_constants(graph: Graph) -> Graph:
    """Evaluate the nodes that read no activation and inline their results as constants.

    ``torch.export`` keeps arithmetic on parameters in the graph; a deployment format wants
    it done once, at export time, so the result becomes a weight of the node that uses it.
    """
    consts: dict[str, Any] = {}
    nodes = []
    for node in graph.nodes:
        args = {k: _substitute(v, consts) for k, v in node.args.items()}
        live = [r for r in node.inputs if r not in consts]
        if not live and node.name not in graph.outputs:
            with torch.no_grad():
                consts[node.name] = run_node(node, args)
            continue
        nodes.append(replace(node, args=args, inputs=live))
    return Graph(graph.inputs, nodes, list(graph.outputs), list(graph.output_values))
