"""The generic linear-region pass: collapse any linear multi-branch region into one conv.

No block has to cooperate. The pass reads the model's graph, finds every region of linear,
translation-equivariant ops with one input and one output
(:mod:`~deployplug.reparam.linear_ops`, :mod:`~deployplug.reparam.linear_regions`),
composes it into one convolution in float64 from the parameters
(:mod:`~deployplug.reparam.region_algebra` over :mod:`~deployplug.reparam.affine_form`),
re-checks the result numerically (:mod:`~deployplug.reparam.region_check`), and rewrites the
model (:mod:`~deployplug.reparam.rewrite`). This module decides what goes where. Exact or
untouched: a region that fails any step stays as it is, and the reason is recorded in the
:class:`~deployplug.reparam.report.ReparamReport`.

**Why torch.fx and not torch.export.** The pass needs the module structure (which block a
node belongs to, so the block can be rewritten in place and keep its path) and parameter
values as attributes, not lifted inputs; ``torch.fx`` symbolic tracing gives both, records
each node's module stack, and takes milliseconds, where ``torch.export`` functionalizes,
decomposes module calls into ATen ops and takes orders of magnitude longer. The tracer keeps
torch's own modules as single nodes and traces through everything else, so a user's subclass
with its own ``forward`` is seen for what it computes. A model (or module) that fx cannot
trace is left alone with the reason, and its children are tried one by one.

**Where the result goes.** Each region has an *owner*, the deepest module whose forward holds
all of it, and the owner is replaced at its path by the simplest module that computes its
forward with the region swapped for the new conv: the conv itself when the region was the
whole forward, an ``nn.Sequential`` of the conv and the owner's remaining children (old names
kept, so ``block.act`` stays ``block.act``) when the rest is a chain of child calls, and a
``torch.fx.GraphModule`` otherwise (functional code after the region, or a region spanning
sibling modules, rewritten in their common parent). The first two shapes are read off the
whole-model trace; anything else re-traces the owner alone, with every child that holds no
region op kept as one call (an SE gate stays an SE module). Nothing is specialised to a
shape, so batch and spatial sizes stay dynamic.

**Belt and braces.** The composed conv is compared in float64 with the region's own modules
(their own ``forward`` on float64 copies of their tensors) on a small random input with
windows at both borders and every tap on real input; anything above
``region_check.CHECK_TOLERANCE`` (or the model dtype's rounding, for constants torch.fx
computed at trace time) is refused, not applied, and so is a built conv whose weights are not
the composed values rounded to its dtype. The check runs once per region structure
(:func:`~deployplug.reparam.region_check.structure_key`): the algebra's arithmetic depends on
the structure only, so the identical blocks of a stage need one check, not one full-width
float64 run each.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from deployplug.reparam.affine_form import ConvSpec, Refused
from deployplug.reparam.linear_ops import Classified, classify, hooks_of
from deployplug.reparam.linear_regions import Region, find_regions
from deployplug.reparam.region_algebra import Float64, compose
from deployplug.reparam.region_check import (
    CHECK_TOLERANCE,
    exact_check,
    first_line,
    structure_key,
)
from deployplug.reparam.report import (
    CollapsedRegion,
    LinearRegionWarning,
    SkippedRegion,
    count_graph,
    count_modules,
)
from deployplug.reparam.rewrite import (
    ConvTemplates,
    fresh_name,
    keep_plain_attributes,
    make_conv,
    rebuild,
    reference_tensor,
    rewrite,
)
from deployplug.reparam.selfcheck import Change

# Values that differ only by the model's own rounding (a pad value computed in float32 at
# trace time against a bias computed in float64) are equal: this many units of its dtype.
_ULPS = 16
_MAX_WARNED = 12


class RegionTracer(fx.Tracer):
    """Keeps torch's own modules as leaves and traces through every other module.

    That is ``fx.Tracer``'s default; it is named here because the pass depends on it: a
    subclass of a torch module that overrides ``forward`` lives in the user's package, so it
    is traced through and its real arithmetic is seen.
    """


@dataclass
class _Outcome:
    collapsed: list[CollapsedRegion]
    skipped: list[SkippedRegion]
    changes: list[Change]
    # float64 check errors of the region structures that passed (region_check.structure_key)
    checked: dict[Hashable, float] = field(default_factory=dict)
    # op counts of the model before the pass changed it, when asked for
    counts: dict[str, int | None] | None = None
    # whether any module has forward hooks (if none, no region needs looking for them)
    hooks: bool = False
    templates: ConvTemplates = field(default_factory=ConvTemplates)


class _CallIndex:
    """Which nodes of a trace each module call made: ``keys[path]`` are the call keys of the
    module at ``path`` (one per call), ``nodes[key]`` the nodes made inside that call."""

    def __init__(self, graph: fx.Graph):
        self.keys: dict[str, set[str]] = defaultdict(set)
        self.nodes: dict[str, list[fx.Node]] = defaultdict(list)
        for node in graph.nodes:
            for key, value in (node.meta.get("nn_module_stack") or {}).items():
                self.keys[value[0]].add(key)
                self.nodes[key].append(node)


@dataclass
class _Found:
    """A collapsible region as found in the trace of ``root`` (at ``prefix`` in the model)."""

    region: Region
    classified: Classified
    graph: fx.Graph
    prefix: str
    root: nn.Module
    calls: _CallIndex
    f64: Float64


def collapse_linear_regions(model: nn.Module, count: bool = False
                            ) -> tuple[nn.Module, _Outcome]:
    """Collapse every exact linear region of ``model`` in place; returns the (possibly new)
    root and what was done. Never raises for a model it cannot handle: it leaves it alone.
    With ``count`` the outcome also holds the model's op counts from before any change
    (:func:`~deployplug.reparam.report.count_ops`, from the trace the pass makes anyway)."""
    outcome = _Outcome([], [], [])
    traced, untraceable = _trace_tree(model, "")
    if count:
        whole = not untraceable and len(traced) == 1
        outcome.counts = count_graph(model, traced[0][2]) if whole else count_modules(model)
    for path, module, exc in untraceable:
        convs = sum(1 for child in module.children()
                    if any(isinstance(m, nn.modules.conv._ConvNd) for m in child.modules()))
        outcome.skipped.append(SkippedRegion(
            path, (path,), {}, f"torch.fx cannot trace it ({type(exc).__name__}: "
            f"{first_line(exc)}); only its children were searched for regions", convs >= 2))
    wanted: dict[str, list[_Found]] = defaultdict(list)
    for prefix, module, graph in traced:
        classified = classify(graph, module)
        index = None
        f64 = Float64()
        for region in find_regions(graph, classified, prefix):
            if region.problem is not None:
                outcome.skipped.append(_skipped(region, region.problem))
                continue
            index = index or _CallIndex(graph)
            wanted[region.owner].append(_Found(region, classified, graph, prefix, module, index,
                                               f64))
    uses: Counter[int] = Counter()
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] += 1
        outcome.hooks = outcome.hooks or hooks_of(m)
    rewritten: list[str] = []
    for owner in sorted(wanted, key=lambda p: (-p.count(".") - bool(p), p)):
        found = wanted[owner]
        stale = any(r == owner or r.startswith(owner + ".") or not owner for r in rewritten)
        if not (len(found) == 1 and not stale
                and _fast_collapse(model, found[0], outcome, uses)):
            model = _collapse_owner(model, owner, [f.region.signature(owner) for f in found],
                                    _involved(found, owner), outcome, uses)
        rewritten.append(owner)
    _warn(outcome.skipped)
    return model, outcome


def _involved(found: list[_Found], owner: str) -> set[str]:
    """Paths, relative to ``owner``, of the modules whose forward holds region ops."""
    paths: set[str] = set()
    for f in found:
        for node in f.region.nodes:
            scope = list(f.classified.scopes[node])
            if node.op == "call_module":
                scope.append(str(node.target))
            for path in scope:
                full = f"{f.prefix}.{path}" if f.prefix and path else f.prefix or path
                if owner and full.startswith(owner + "."):
                    paths.add(full[len(owner) + 1:])
                elif not owner and full:
                    paths.add(full)
    return paths


class _OwnerTracer(RegionTracer):
    """Traces an owner through only the children that hold region ops; every other child
    (an SE gate, an activation module of the user's own) stays one call, so it survives the
    rewrite as the module it was."""

    def __init__(self, involved: set[str]):
        super().__init__()
        self.involved = involved

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name):
            return True
        q = module_qualified_name
        return bool(q) and not any(p == q or p.startswith(q + ".") for p in self.involved)


def _trace_tree(module: nn.Module, path: str
                ) -> tuple[list[tuple[str, nn.Module, fx.Graph]],
                           list[tuple[str, nn.Module, BaseException]]]:
    """Trace ``module``; if fx cannot, record why and trace each non-leaf child instead."""
    tracer = RegionTracer()
    try:
        return [(path, module, tracer.trace(module))], []
    except Exception as exc:  # noqa: BLE001 - any tracing failure: try the children
        traced: list[tuple[str, nn.Module, fx.Graph]] = []
        failed: list[tuple[str, nn.Module, BaseException]] = [(path, module, exc)]
        for name, child in module.named_children():
            if child is None or tracer.is_leaf_module(child, name):
                continue
            t, f = _trace_tree(child, f"{path}.{name}" if path else name)
            traced += t
            failed += f
        return traced, failed


def _skipped(region: Region, reason: str) -> SkippedRegion:
    return SkippedRegion(region.owner, region.modules, dict(region.ops), reason,
                         region.multi_branch)


def _warn(skipped: list[SkippedRegion]) -> None:
    flagged = [s for s in skipped if s.multi_branch]
    if not flagged:
        return
    lines = [f"'{s.owner or '<model>'}': {s.reason}" for s in flagged[:_MAX_WARNED]]
    if len(flagged) > _MAX_WARNED:
        lines.append(f"... and {len(flagged) - _MAX_WARNED} more (see the ReparamReport)")
    warnings.warn(f"{len(flagged)} multi-branch region(s) were left unfused and stay "
                  "multi-branch in the deploy model:\n  " + "\n  ".join(lines),
                  LinearRegionWarning, stacklevel=4)


# ----------------------------------------------------------------------------- per owner

def _collapse_owner(model: nn.Module, owner: str, signatures: list[Any], involved: set[str],
                    outcome: _Outcome, uses: Counter[int]) -> nn.Module:
    module = model.get_submodule(owner) if owner else model
    blocker = _owner_blocker(model, owner, module, uses)
    graph = None
    if blocker is None:
        try:
            graph = _OwnerTracer(involved).trace(module)
        except Exception as exc:  # noqa: BLE001 - traced inside the model, not alone
            blocker = f"it cannot be traced on its own ({type(exc).__name__}: {first_line(exc)})"
    if blocker is not None or graph is None:
        outcome.skipped.append(SkippedRegion(owner, (owner,), {}, f"'{owner or '<model>'}' "
                                             f"is not rewritten: {blocker}", True))
        return model
    classified = classify(graph, module)
    f64 = Float64()
    like = reference_tensor(module)
    remaining = list(signatures)
    new_modules: dict[str, nn.Module] = {}
    done: list[tuple[Region, ConvSpec, str, float]] = []
    for region in find_regions(graph, classified, owner):
        sig = region.signature(owner)
        if region.owner != owner or region.problem is not None or sig not in remaining:
            continue
        remaining.remove(sig)
        try:
            spec, conv, error = _fuse(region, classified, module, owner, f64, like, outcome)
        except Refused as why:
            outcome.skipped.append(_skipped(region, str(why)))
            continue
        name = fresh_name(module, graph, new_modules)
        new_modules[name] = conv
        rewrite(graph, region, classified, name)
        done.append((region, spec, name, error))
    for modules, ops in remaining:  # seen in the whole model, not in the owner's own trace
        outcome.skipped.append(SkippedRegion(
            owner, tuple(f"{owner}.{m}" if owner else m for m in modules), dict(ops),
            "the region is not found again when its owner is traced on its own (its forward "
            "depends on how it is called)", True))
    if not done:
        return model
    graph.lint()
    replacement, how = rebuild(module, graph, new_modules)
    if owner:
        parent_path, _, leaf = owner.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, replacement)
    else:
        model = replacement
    outcome.changes.append(Change(owner, module, "collapsed by the generic linear-region pass"))
    for region, spec, name, error in done:
        conv_path = owner if how == "conv" else (f"{owner}.{name}" if owner else name)
        outcome.collapsed.append(CollapsedRegion(owner, region.modules, dict(region.ops),
                                                 spec.describe(), conv_path, how, error))
    return model


def _fast_collapse(model: nn.Module, found: _Found, outcome: _Outcome,
                   uses: Counter[int]) -> bool:
    """Collapse a block whose forward is ``region -> child -> child ...`` straight from the
    whole-model trace, without tracing the block again; ``False`` leaves it to
    :func:`_collapse_owner` (any other shape of forward, or anything unusual)."""
    region, owner = found.region, found.region.owner
    rel = owner[len(found.prefix) + 1:] if found.prefix else owner
    if not rel:
        return False
    module = model.get_submodule(owner)
    if (_owner_blocker(model, owner, module, uses) is not None
            or not _one_tensor_argument(module)):
        return False
    tail = _tail_chain(found, rel)
    if tail is None:
        return False
    try:
        spec, conv, error = _fuse(region, found.classified, found.root, found.prefix,
                                  found.f64, reference_tensor(module), outcome)
    except Refused as why:
        outcome.skipped.append(_skipped(region, str(why)))
        return True
    name = "reparam"
    while name in tail:
        name += "_"
    if tail:
        replacement: nn.Module = keep_plain_attributes(module, nn.Sequential(OrderedDict(
            [(name, conv)] + [(t, module.get_submodule(t)) for t in tail])))
        how, conv_path = "sequential", f"{owner}.{name}"
    else:
        replacement, how, conv_path = conv, "conv", owner
    parent_path, _, leaf = owner.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, replacement)
    outcome.changes.append(Change(owner, module, "collapsed by the generic linear-region pass"))
    outcome.collapsed.append(CollapsedRegion(owner, region.modules, dict(region.ops),
                                             spec.describe(), conv_path, how, error))
    return True


def _one_tensor_argument(module: nn.Module) -> bool:
    """``forward`` takes exactly one required positional argument and nothing else, so a
    conv or an ``nn.Sequential`` can be called the way the block was."""
    forward = module.forward
    function = getattr(forward, "__func__", None)
    if function is None or "forward" in vars(module):
        return _takes_one_tensor(forward, 0)
    try:
        known = _ONE_TENSOR.get(function)
        if known is None:  # every block of a class shares its forward: inspect it once
            known = _ONE_TENSOR[function] = _takes_one_tensor(function, 1)
    except TypeError:  # a callable that cannot be weakly referenced: not cached
        known = _takes_one_tensor(function, 1)
    return known


_ONE_TENSOR: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _takes_one_tensor(function: Any, skip: int) -> bool:
    """One required positional parameter, after the first ``skip`` (``self``)."""
    try:
        params = list(inspect.signature(function).parameters.values())[skip:]
    except (TypeError, ValueError):
        return False
    return (len(params) == 1 and params[0].default is inspect.Parameter.empty
            and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                   inspect.Parameter.POSITIONAL_OR_KEYWORD))


def _tail_chain(found: _Found, rel: str) -> list[str] | None:
    """Names of the owner's children called after the region, if the owner's forward (in the
    whole-model trace) is exactly: its input -> the region -> a chain of its children."""
    region, constants = found.region, found.classified.constants
    keys = found.calls.keys.get(rel, set())
    if len(keys) != 1:
        return None  # called more than once, or not visible in the trace
    (key,) = keys
    calls = found.calls.nodes[key]
    members = set(calls)
    if region.source in members or not set(region.nodes) <= members:
        return None
    for node in calls:
        if any(i not in members and i is not region.source and i not in constants
               for i in node.all_input_nodes):
            return None
    inside = set(region.nodes)
    prev, names = region.sink, []
    for node in calls:
        if node in inside or node in constants:
            continue
        target = str(node.target)
        name = target[len(rel) + 1:]
        if (node.op != "call_module" or node.args != (prev,) or node.kwargs
                or not target.startswith(rel + ".") or "." in name or name in names
                or list(prev.users) != [node]):
            return None
        names.append(name)
        prev = node
    if any(u in members for u in prev.users):
        return None
    return names


def _fuse(region: Region, classified: Classified, root: nn.Module, prefix: str,
          f64: Float64, like: torch.Tensor | None,
          outcome: _Outcome) -> tuple[ConvSpec, nn.Module, float]:
    """The region's conv spec, the conv module built from it (dtype and device of ``like``)
    and the float64 check error that covers it, or :class:`Refused`."""
    hooked = _hooked_scope(root, region, classified, prefix) if outcome.hooks else None
    if hooked is not None:
        raise Refused(f"module '{hooked}' has forward hooks, which see values the collapsed "
                      "region no longer computes")
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    rtol = max(CHECK_TOLERANCE, _ULPS * torch.finfo(dtype).eps)
    try:
        form, candidates = compose(region, classified, f64, rtol)
        spec = form.conv_spec(candidates)
        conv = make_conv(spec, like, outcome.templates)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        # Something about these ops the algebra does not model: leave them as they are.
        raise Refused(f"its ops could not be composed ({type(exc).__name__}: "
                      f"{first_line(exc)})") from None
    key = structure_key(region, classified, root, spec, dtype)
    error = outcome.checked.get(key)
    if error is None:
        error = exact_check(region, classified, root, spec, conv, f64, rtol)
        outcome.checked[key] = error
    return spec, conv, error


def _owner_blocker(model: nn.Module, owner: str, module: nn.Module,
                   uses: Counter[int]) -> str | None:
    if hooks_of(module):
        return "it has forward hooks, which would be lost with it"
    if owner and uses[id(module)] > 1:
        paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is module]
        return (f"the same module is registered at {len(paths)} paths ({', '.join(paths[:3])}"
                "); rewriting one would leave the others different")
    return None


def _hooked_scope(root: nn.Module, region: Region, classified: Classified,
                  prefix: str) -> str | None:
    """A module inside the region's owner, traced through, that has hooks (fx does not run
    them, and they would see values the collapsed region no longer computes). Modules above
    the owner see the same input and output as before, so their hooks do not matter."""
    owner = region.owner
    seen: set[str] = set()
    for node in region.nodes:
        for path in classified.scopes[node]:
            full = f"{prefix}.{path}" if prefix and path else prefix or path
            if path in seen or not (not owner or full.startswith(owner + ".")):
                continue
            seen.add(path)
            if path and hooks_of(root.get_submodule(path)):
                return full
    return None
