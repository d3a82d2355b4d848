"""Swap every node a target refuses for the exact module a rule builds.

Works on the graph ``torch.export`` records, not on module types, so ``F.instance_norm``,
``x + 3`` and ``x.clamp(0, 6)`` are found as reliably as ``nn.InstanceNorm2d``. The rewrite
happens in the unlifted :class:`torch.fx.GraphModule` of the captured program: the refused
``call_function`` node becomes a ``call_module`` of the replacement, named after the module
path it came from (``<path>.<op>_decomposed``), so later captures and error messages still
point at the user's module.

Replacements may themselves contain ops the target refuses (InstanceNorm's global pooling
on a large map for ``om``), so the pass repeats capture -> rewrite until nothing changes,
then the final capture decides: anything still refused is reported, all at once.

Known limitation, by design of ``torch.export``: a rewritten model is specialised to the
example input's shape (its graph carries the shapes and a guard checks them), which is what
Caffe, om and MsnhNet files are anyway. A model that needs no rewrite is returned as a plain
eval-mode copy, so ONNX export keeps its dynamic axes.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from deployplug.capture import CaptureCache, Graph, Node
from deployplug.decompositions.registry import Rule, choose_rule, why_not
from deployplug.errors import DeployError, OffendingOp, UnsupportedOpError
from deployplug.profiles import TargetProfile, get_target, offending_op

MAX_ROUNDS = 8


@dataclass(frozen=True)
class Applied:
    """One rewrite: which node, which rule, and the submodule that now computes it."""

    round: int
    node: str
    op: str
    module_path: str
    rule: str
    submodule: str


@dataclass
class DecomposeResult:
    """What a decomposition run did; ``offenders`` is empty when it succeeded."""

    module: nn.Module
    original: Graph | None
    applied: list[Applied] = field(default_factory=list)
    offenders: list[OffendingOp] = field(default_factory=list)
    #: the captured graph of ``module`` (None when the target needed no capture)
    graph: Graph | None = None


def decompose(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor] | str | TargetProfile | None = None,
    target: str | TargetProfile | torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """A target-legal copy of ``model`` (CPU, eval); the model itself is never modified.

    The arguments come in the order every public function uses: model, example input, then
    the target (``decompose(model, x, "om")``). The earlier order ``decompose(model, target,
    x)`` still works for one release and warns. Raises
    :class:`~deployplug.errors.UnsupportedOpError` naming every op that no rule can rewrite
    for ``target``.
    """
    if isinstance(example_input, (str, TargetProfile)):
        warnings.warn(
            "decompose(model, target, example_input) is deprecated: call "
            "decompose(model, example_input, target)", DeprecationWarning, stacklevel=2)
        example_input, target = target, example_input
    if not isinstance(target, (str, TargetProfile)):
        raise TypeError("decompose(model, example_input, target) needs a target name such as "
                        f"'caffe' or a TargetProfile, got {type(target).__name__}")
    # the deprecated order swaps the two above, and mypy cannot narrow example_input back
    result = run_decompose(model, target, example_input)  # type: ignore[arg-type]
    if result.offenders:
        raise UnsupportedOpError(result.offenders)
    return result.module


def run_decompose(
    model: nn.Module,
    target: str | TargetProfile,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    cache: CaptureCache | None = None,
) -> DecomposeResult:
    """The whole pass, returning the record instead of raising (used by ``check``).

    With ``cache`` (an export run's :class:`~deployplug.capture.CaptureCache`, made for the
    same example input) the caller vouches that ``model`` is already a private CPU eval copy:
    it is used as it is, not copied, and every capture goes through the cache, so a model
    that needs no rewrite comes back as the very object given, with its graph captured once.
    """
    profile = get_target(target)
    work = model if cache is not None else cpu_eval_copy(model)
    if profile.accepts_everything and not profile.ops:
        return DecomposeResult(module=work, original=None)
    if example_input is None:
        raise ValueError(
            f"decompose(..., target={profile.name!r}) needs example_input: which ops must be "
            "rewritten depends on the shapes the model sees"
        )
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    inputs = tuple(t.detach().cpu() for t in inputs)

    cache = cache if cache is not None else CaptureCache(inputs)
    current: nn.Module = work
    applied: list[Applied] = []
    original: Graph | None = None
    for round_ in range(MAX_ROUNDS + 1):
        program, graph = cache.program_and_graph(current)
        original = original or graph
        refused = [(n, r) for n in graph if (r := profile.refusal(n, graph)) is not None]
        plan = [(n, rule) for n, _ in refused if (rule := choose_rule(n, graph, profile))]
        if not plan or round_ == MAX_ROUNDS:
            offenders = [_offender(n, reason, graph, profile, round_) for n, reason in refused]
            return DecomposeResult(current, original, applied, offenders, graph)
        gm = _unlocked(program.module())
        replaced: dict[str, torch.fx.Node] = {}
        added = []
        for node, rule in plan:
            sub = _rewrite(gm, graph, node, rule, replaced, profile)
            added.append(sub)
            applied.append(Applied(round_, node.name, node.op, node.module_path, rule.name, sub))
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        _drop_unused_tensors(gm, added)
        gm.recompile()
        current = gm.eval()
    raise AssertionError("unreachable")  # pragma: no cover


def cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy on the CPU in eval mode: the caller's model stays untouched."""
    work = copy.deepcopy(model).cpu()
    work.eval()
    return work


def _unlocked(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give ``program.module()`` back nn.Module's train()/eval().

    torch.export installs instance-level ``train``/``eval`` that raise NotImplementedError,
    but ``torch.onnx.export`` calls ``model.train(False)``. Deleting the instance attributes
    restores the class methods; the graph is inference-only either way.
    """
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    return gm


def _drop_unused_tensors(gm: torch.fx.GraphModule, keep_under: list[str]) -> None:
    """Delete parameters/buffers no node reads any more (the replaced op's weights).

    ``delete_all_unused_submodules`` keeps a module that still has a used child (the
    replacement lives at ``<path>.<op>_decomposed``), so its old weights would stay in the
    state dict and the exported files.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    for name in names:
        if name in used or any(name.startswith(f"{p}.") for p in keep_under):
            continue
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]


def _offender(
    node: Node, reason: str, graph: Graph, profile: TargetProfile, round_: int
) -> OffendingOp:
    notes = list(why_not(node, graph, profile))
    if not notes:
        notes.append(f"no decomposition rule exists for '{node.op}'; rewrite that part of the "
                     "model or choose another target")
    if round_ == MAX_ROUNDS:
        notes.append(f"still refused after {MAX_ROUNDS} rounds of rewriting")
    return offending_op(node, reason, profile, notes)


def _rewrite(gm: torch.fx.GraphModule, graph: Graph, node: Node, rule: Rule,
             replaced: dict[str, torch.fx.Node], profile: TargetProfile) -> str:
    """Replace ``node``'s fx node in ``gm`` by a call of the module ``rule`` builds.

    ``replaced`` maps the fx names of nodes rewritten earlier in this round to their new
    ``call_module`` nodes, so a rewritten node can feed another one.
    """
    fx_nodes = {n.name: n for n in gm.graph.nodes} | replaced
    target = fx_nodes.get(node.fx_name)
    if target is None:
        raise DeployError(f"graph rewrite lost track of {node.op} at '{node.where}'")
    # Unlifting may rename placeholders ("input" -> "input_1"); user inputs keep their order.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_input = {v.name: placeholders[i] for i, v in enumerate(graph.inputs)}
    args = [by_input[name] if name in by_input else fx_nodes[graph.node(name).fx_name]
            for name in node.inputs]

    replacement = rule.build(node, graph, profile).eval()
    path = _free_path(gm, node)
    gm.add_submodule(path, replacement)
    with gm.graph.inserting_before(target):
        new = gm.graph.call_module(path, args=tuple(args))
    # Ops traced inside the replacement inherit this stack, so later captures and error
    # messages name "<path>.<op>_decomposed" rather than the bare original module.
    new.meta = dict(target.meta)
    stack = dict(target.meta.get("nn_module_stack") or {})
    stack[path] = (path, type(replacement).__qualname__)
    new.meta["nn_module_stack"] = stack
    # Later ops were captured against the original op's contiguous result (``view`` needs
    # it); a replacement may end in a permute or crop, so restore the layout. A no-op, and
    # absent from the next capture, when the result is already contiguous.
    with gm.graph.inserting_after(new):
        result = gm.graph.call_method("contiguous", (new,))
    result.meta = dict(new.meta)
    if isinstance(target.meta.get("val"), (tuple, list)):
        for user in list(target.users):
            if user.target is not _getitem() or user.args[1] != 0:
                raise DeployError(f"{node.op} at '{node.where}': only its first result can be "
                                  "rewritten, but another one is used")
            user.replace_all_uses_with(result)
            gm.graph.erase_node(user)
    else:
        target.replace_all_uses_with(result)
    gm.graph.erase_node(target)
    replaced[node.fx_name] = result
    return path


def _getitem():
    import operator

    return operator.getitem


def _free_path(gm: nn.Module, node: Node) -> str:
    base = f"{node.module_path}.{node.op}_decomposed" if node.module_path else (
        f"{node.op}_decomposed")
    base = re.sub(r"[^A-Za-z0-9_.]", "_", base)
    path, i = base, 1
    while _exists(gm, path):
        path = f"{base}_{i}"
        i += 1
    return path


def _exists(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return hasattr(gm, path.split(".")[0]) and "." not in path
