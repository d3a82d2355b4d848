"""Model-level re-parameterization: walk the modules, let blocks fuse themselves, fold conv->BN.

Three passes, in this order:

1. **Block protocol.** Any module that defines ``fuse()`` (returns a replacement),
   ``reparameterize()`` or ``switch_to_deploy()`` (both in place) is converted. These are the
   names RepVGG, timm, DBB/ACNet, MobileOne, YOLOv6/7 and mmyolo blocks already use, so
   third-party blocks work without registration. A method is only called when it takes no
   required arguments: ``reparameterize(mu, logvar)`` of a VAE is a different thing.
2. **Generic linear regions** (:mod:`deployplug.reparam.generic`): any block whose ops are
   linear between its nonlinearities (RepVGG, ACB, DBB, MobileOne, ... written without fuse
   methods, or with methods under other names) is found in the traced graph and collapsed
   into one convolution when that is exact; what is left alone is reported with the reason.
3. **Generic conv->BatchNorm folding** for every pair the blocks left behind (plain stems,
   heads, downsample shortcuts). Pairs are found without running the model: a ``torch.fx``
   trace where modules are leaves gives the data flow; when tracing fails (data-dependent
   Python), ``nn.Sequential`` adjacency is used for that subtree instead, but only in
   containers that run their children in order and return the last output alone
   (:func:`~deployplug.reparam.eligibility.runs_children_in_order`). A pair is folded only
   when the conv's single consumer is the BN, neither module is called or shared elsewhere,
   and both compute exactly what torch's own classes compute
   (:mod:`deployplug.reparam.eligibility`); weight-normalized and spectral-normalized convs
   are folded through their eval-mode weight (:mod:`deployplug.reparam.parametrized`).
   Anything else is left as it is and logged with the reason.

What the structure cannot show, an example input can: with ``example_input`` the result is
compared with the unfused model block by block (:mod:`deployplug.reparam.selfcheck`). One gap
needs it: a module that ``torch.fx`` cannot trace may still call a child of an in-order
``nn.Sequential`` directly, and only running the model reveals that.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from deployplug.errors import BatchNormStatsError
from deployplug.reparam.eligibility import bn_blocker, conv_blocker, runs_children_in_order
from deployplug.reparam.fusion import fold_bn
from deployplug.reparam.generic import collapse_linear_regions
from deployplug.reparam.linear_ops import LINEAR_LEAF_CLASSES, hooks_of
from deployplug.reparam.parametrized import bake
from deployplug.reparam.report import ReparamReport, count_ops
from deployplug.reparam.selfcheck import Change, Inputs, as_inputs, check, record

PROTOCOL_METHODS = ("fuse", "reparameterize", "switch_to_deploy")
DEFAULT_TOLERANCE = 1e-5

log = logging.getLogger(__name__)


def reparameterize(model: nn.Module, inplace: bool = False, example_input: Inputs | None = None,
                   tolerance: float = DEFAULT_TOLERANCE, *, report: ReparamReport | None = None,
                   generic: bool = True) -> nn.Module:
    """Deploy form of ``model``: every self-fusing block fused, every linear multi-branch region
    collapsed into one conv, every provable conv->BN folded.

    Returns a model in eval mode with the same dtype and device. With ``inplace=False`` (the
    default) the given model is left exactly as it was, parameters and training flags
    included; it is never hooked, and the result shares no module or tensor with it (the
    copy borrows modules the passes only read and copies whatever of them survives).
    Running it twice is a no-op. The result is usually
    the same object tree with blocks replaced at their paths; a region that spans modules is
    rewritten as a ``torch.fx.GraphModule`` of their common parent (which may be the model,
    so use the returned object, also with ``inplace=True``).

    ``generic=False`` skips the generic linear-region pass
    (:mod:`deployplug.reparam.generic`), leaving only blocks' own methods and conv->BN
    folding. An empty :class:`~deployplug.reparam.report.ReparamReport` passed as ``report``
    is filled in: blocks fused by their methods, regions collapsed (modules, ops, the conv
    they became), regions left alone with the reason, conv->BN folds, and whole-model op
    counts before and after. Multi-branch regions left alone also raise a
    :class:`~deployplug.reparam.report.LinearRegionWarning`.

    With ``example_input`` (a tensor or a tuple of tensors) the unfused model (in eval mode)
    and the result are both run on it, and :class:`~deployplug.errors.ReparameterizationError`
    names the first changed block, in execution order, whose output moved by more than
    ``tolerance`` (normalized error ``max|a-b| / max|ref|``), or reports a changed final output.
    With ``inplace=True`` the model has already been converted when that error is raised.
    """
    inputs = as_inputs(example_input) if example_input is not None else None
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    if inplace:
        target, borrowed = model, _Borrowed()
    else:
        target, borrowed = _deploy_copy(model, lend_leaves=generic,
                                        watched=inputs is not None)
    changes: list[Change] = []
    try:
        target.eval()
        reference = record(target, inputs, _watch_list(target)) if inputs is not None else None
        # Counted now only if something may change the model before the generic pass, which
        # otherwise counts it from its own trace (one trace fewer)
        count_later = report is not None and generic and not any(
            _protocol_method(m) is not None for m in target.modules())
        if report is not None and not count_later:
            report.counts_before = count_ops(target)
        target = _convert_blocks(target, "", changes)
        protocol = list(changes)
        if protocol:
            target.eval()  # what blocks built while fusing is new, and in training mode
        if generic:
            target, outcome = collapse_linear_regions(target, count=count_later)
            changes += outcome.changes
            if report is not None:
                report.collapsed += outcome.collapsed
                report.left_alone += outcome.skipped
                if count_later:
                    report.counts_before = outcome.counts
        borrowed.release(target)  # before anything else may write to what fusion left behind
    finally:
        borrowed.restore_modes()
    if report is not None:
        report.protocol += [(c.path, c.how.split()[-1].rstrip("()")) for c in protocol]
    folds = _fold_all(target)
    changes += [Change(bn_path, bn, f"folded into conv '{conv_path}' by the conv->BN pass")
                for conv_path, bn_path, bn in folds]
    target.eval()  # the modules the passes built (new convs, GraphModules, Identity slots)
    if report is not None:
        report.folded += [(conv_path, bn_path) for conv_path, bn_path, _ in folds]
        report.counts_after = count_ops(target)
    if inputs is not None and reference is not None and changes:
        check(target, inputs, reference, changes, tolerance)
    return target


def _watch_list(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose output fusion may change: every protocol block, every BatchNorm not
    inside one (a block's own BNs are covered by comparing the block), and every other
    module holding two or more convolutions or BatchNorms (a block the generic pass may
    collapse, so a wrong collapse is named by its block)."""
    watch: dict[str, nn.Module] = {}
    blocks: list[str] = []
    for path, module in model.named_modules():
        inside = any(b == "" or path.startswith(b + ".") for b in blocks)
        if _protocol_method(module) is not None:
            watch[path] = module
            blocks.append(path)
        elif not inside and (isinstance(module, _BatchNorm) or (path and sum(
                isinstance(m, (_ConvNd, _BatchNorm)) for m in module.modules()) >= 2)):
            watch[path] = module
    return watch


class _Borrowed:
    """Modules and tensors a deploy copy shares with the original until fusion drops them."""

    def __init__(self, modules: set[int] | None = None, tensors: set[int] | None = None):
        self.modules = modules or set()
        self.tensors = tensors or set()
        self.modes: list[tuple[nn.Module, bool]] = []

    def release(self, target: nn.Module) -> None:
        """Safety net: copy anything borrowed that survived fusion, so nothing aliases."""
        if not self.modules:
            return
        for path, module in list(target.named_modules()):
            if path and id(module) in self.modules:
                _set_module(target, path, copy.deepcopy(module))
        for module in target.modules():
            for name, t in list(module._parameters.items()):
                if t is not None and id(t) in self.tensors:
                    module._parameters[name] = nn.Parameter(t.detach().clone(), t.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None and id(b) in self.tensors:
                    module._buffers[name] = b.clone()

    def restore_modes(self) -> None:
        """Borrowed modules are the original's: give them back the training flags they had
        before the copy was switched to eval."""
        for module, training in self.modes:
            module.training = training


def _own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)


def _detached_attributes(model: nn.Module) -> dict[int, object]:
    """Deep-copy memo entries for tensors that ``copy.deepcopy`` refuses: non-leaf tensors kept
    as module attributes, such as the weight the legacy ``torch.nn.utils.weight_norm`` hook
    computes with autograd on. The hook recomputes that attribute before every use, so the
    copy may hold it detached."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in (*vars(module).values(), *module._buffers.values()):
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return memo


def _deploy_copy(model: nn.Module, lend_leaves: bool = False,
                 watched: bool = False) -> tuple[nn.Module, _Borrowed]:
    """Deep copy that does not duplicate what fusion is about to throw away.

    Blocks whose class sets ``fusion_reads_only = True`` promise that fusing only reads their
    submodules and tensors, builds new ones and drops the old. The copy of such a block may
    therefore borrow the original's submodules for the moment between copying and fusing,
    which saves copying nearly every weight (and module) of a RepVGG model. With
    ``lend_leaves`` (the generic pass will run) the same holds for torch's own linear leaf
    modules (:data:`~deployplug.reparam.linear_ops.LINEAR_LEAF_CLASSES`: convs, BatchNorms,
    pads, pools, identities) outside any block that fuses itself: that pass only reads them
    and replaces the regions they form. ``watched`` (an example input will be recorded, with
    hooks on BatchNorms) keeps BatchNorms out of that, so no hook ever touches the original.
    Only modules used nowhere else are borrowed; :meth:`_Borrowed.release` guarantees nothing
    borrowed survives in the result, and :meth:`_Borrowed.restore_modes` that switching the
    copy to eval mode does not leave the original's borrowed modules in eval mode.
    """
    module_uses: Counter[int] = Counter()
    tensor_uses: Counter[int] = Counter()
    owners = []
    trivial = []
    for _, module in model.named_modules(remove_duplicate=False):
        module_uses[id(module)] += 1
        tensor_uses.update(id(t) for t in _own_tensors(module))
        if getattr(type(module), "fusion_reads_only", False) and not getattr(
                module, "deployed", True):
            owners.append(module)
        elif module_uses[id(module)] == 1 and _trivial(module):
            trivial.append(module)
    memo = _detached_attributes(model)
    borrowed = _Borrowed()

    def lend(root: nn.Module, subtree: list[nn.Module]) -> None:
        tensors = [t for m in subtree for t in _own_tensors(m)]
        if all(module_uses[id(m)] == 1 for m in subtree) and all(
                tensor_uses[id(t)] == 1 for t in tensors):
            memo[id(root)] = root
            borrowed.modules.update(id(m) for m in subtree)
            borrowed.tensors.update(id(t) for t in tensors)
            borrowed.modes.extend((m, m.training) for m in subtree)

    for owner in owners:
        for child in owner.children():
            lend(child, list(child.modules()))
    if lend_leaves:
        for module in _outside_protocol_blocks(model):
            if id(module) in borrowed.modules or hooks_of(module):
                continue
            if type(module) in LINEAR_LEAF_CLASSES:
                if not (watched and isinstance(module, _BatchNorm)):
                    lend(module, [module])
            elif type(module) is nn.Sequential and not watched:
                # a plain container of such leaves: only ever read or traced, and replaced
                # in its parent when it is a region's owner (a leaf never is one)
                children = list(module.children())
                if children and all(type(c) in LINEAR_LEAF_CLASSES and not hooks_of(c)
                                    for c in children):
                    lend(module, [module, *children])
    for module in trivial:
        if id(module) not in memo and id(module) not in borrowed.modules:
            memo[id(module)] = _copy_trivial(module)
    return copy.deepcopy(model, memo), borrowed


_IMMUTABLE = (bool, int, float, str, type(None))


def _trivial(module: nn.Module) -> bool:
    """A module of torch's own (``torch.nn``) classes holding nothing but immutable settings
    and empty containers (no tensors, children or hooks): an activation, a pooling, a
    flatten. For such a module a shallow copy with new empty containers is its deep copy."""
    if not type(module).__module__.startswith("torch.nn.modules."):
        return False
    for value in vars(module).values():
        if isinstance(value, (dict, list, set)):
            if value:
                return False
        elif not (isinstance(value, _IMMUTABLE) or (type(value) is tuple and all(
                isinstance(v, _IMMUTABLE) for v in value))):
            return False
    return True


def _copy_trivial(module: nn.Module) -> nn.Module:
    """The deep copy of a :func:`_trivial` module, without ``copy.deepcopy``'s walk."""
    clone = copy.copy(module)
    state = vars(clone)
    for name, value in state.items():
        if isinstance(value, (dict, list, set)):
            state[name] = value.copy()
    return clone


def _outside_protocol_blocks(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and its descendants, except any block with a fusion method and everything
    inside it: such a method may write to its submodules."""
    if _protocol_method(module) is not None:
        return
    yield module
    for child in module.children():
        yield from _outside_protocol_blocks(child)


# ----------------------------------------------------------------------------- pass 1

def _protocol_method(module: nn.Module) -> str | None:
    """The first protocol method ``module`` defines that can be called without arguments."""
    for name in PROTOCOL_METHODS:
        method = getattr(type(module), name, None)
        if method is None or not callable(method):
            continue
        try:
            params = list(inspect.signature(getattr(module, name)).parameters.values())
        except (TypeError, ValueError):
            continue
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params):
            return name
    return None


def _convert_one(module: nn.Module, path: str, changes: list[Change] | None) -> nn.Module:
    name = _protocol_method(module)
    if name is None:
        return module
    try:
        with torch.no_grad():
            result = getattr(module, name)()
    except BatchNormStatsError as err:
        raise BatchNormStatsError(f"in '{path or type(module).__name__}': {err}") from err
    if changes is not None:
        changes.append(Change(path, module, f"converted by its {name}()"))
    if name == "fuse" and isinstance(result, nn.Module):
        return result
    return module


def convert_blocks(module: nn.Module, path: str = "") -> nn.Module:
    """Apply the block protocol to ``module`` and, recursively, to what it contains afterwards.

    Parents go first (a composite block may fuse its children itself); the recursion then
    descends into the *converted* module, so a replacement's own children are reached too.
    Returns the (possibly replaced) module.
    """
    return _convert_blocks(module, path, None)


def _convert_blocks(module: nn.Module, path: str, changes: list[Change] | None) -> nn.Module:
    module = _convert_one(module, path, changes)
    for name, child in list(module.named_children()):
        new = _convert_blocks(child, f"{path}.{name}" if path else name, changes)
        if new is not child:
            setattr(module, name, new)
    return module


# ----------------------------------------------------------------------------- pass 2

class _LeafTracer(fx.Tracer):
    """Traces through containers and custom modules but keeps every module without children
    (and every ``torch.nn`` built-in) as a single ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return next(iter(m.children()), None) is None or super().is_leaf_module(
            m, module_qualified_name)


def _is_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """Shape-level candidate: a convolution and a BatchNorm over its output channels."""
    return (isinstance(conv, _ConvNd) and isinstance(bn, _BatchNorm)
            and bn.num_features == conv.out_channels)


def _pairs_from_graph(graph: fx.Graph) -> Iterator[tuple[str, str]]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]

    def read_directly(path: str) -> bool:
        return any(a == path or a.startswith(path + ".") for a in attrs)

    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        (user,) = node.users
        if (user.op == "call_module" and user.args == (node,) and not user.kwargs
                and calls[node.target] == 1 and calls[user.target] == 1
                and not read_directly(node.target) and not read_directly(user.target)):
            yield node.target, user.target


def _find_pairs(module: nn.Module, prefix: str) -> Iterator[tuple[str, str]]:
    """(conv path, bn path) candidates under ``module``, traced if possible."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure just means "use the fallback"
        graph = None
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if graph is not None:
        for conv_path, bn_path in _pairs_from_graph(graph):
            yield join(conv_path), join(bn_path)
        return
    children = [(name, child) for name, child in module._modules.items() if child is not None]
    if runs_children_in_order(module):
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if _is_pair(conv, bn):
                yield join(cname), join(bname)
    elif any(_is_pair(a, b) for (_, a), (_, b) in zip(children, children[1:])):
        log.info("'%s' (%s) cannot be traced and does not run its children in order; its "
                 "conv->BatchNorm children are left unfolded", prefix or "<model>",
                 type(module).__name__)
    for name, child in children:
        if next(iter(child.children()), None) is not None:
            yield from _find_pairs(child, join(name))


def fold_conv_bn(model: nn.Module) -> int:
    """Fold every provably exact conv->BatchNorm pair of ``model`` in place; returns how many.

    The conv receives the fused weight and bias (all its other settings are kept) and the BN
    slot becomes ``nn.Identity``. A weight-normalized or spectral-normalized conv first gets
    its eval-mode weight as a plain parameter.
    """
    return len(_fold_all(model))


def _fold_all(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Fold what can be folded; returns ``(conv path, bn path, removed BatchNorm)`` per fold."""
    modules = dict(model.named_modules(remove_duplicate=False))
    if not any(isinstance(m, _BatchNorm) for m in modules.values()):
        return []
    shared = Counter(id(m) for m in modules.values())
    folded = []
    for conv_path, bn_path in list(_find_pairs(model, "")):
        conv, bn = modules.get(conv_path), modules.get(bn_path)
        if conv is None or bn is None or not _is_pair(conv, bn):
            continue
        reason = _pair_blocker(conv, bn, shared)
        if reason is not None:
            log.info("conv '%s' -> BatchNorm '%s' left unfolded: %s", conv_path, bn_path, reason)
            continue
        _require_stats(bn, bn_path)
        bake(conv)
        _fold_into(conv, bn)
        _set_module(model, bn_path, nn.Identity())
        folded.append((conv_path, bn_path, bn))
    return folded


def _pair_blocker(conv: nn.Module, bn: nn.Module, shared: Counter[int]) -> str | None:
    if shared[id(conv)] > 1:
        return "the conv is registered at more than one path"
    if shared[id(bn)] > 1:
        return "the BatchNorm is registered at more than one path"
    reason = conv_blocker(conv)
    if reason is not None:
        return f"conv: {reason}"
    reason = bn_blocker(bn)
    return None if reason is None else f"BatchNorm: {reason}"


def _require_stats(bn: _BatchNorm, bn_path: str) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise BatchNormStatsError(
            f"BatchNorm '{bn_path}' ({type(bn).__name__}) follows a convolution but has no "
            "running statistics (track_running_stats=False), so it cannot be folded; build it "
            "with track_running_stats=True and train or recalibrate it, or export with "
            "reparameterize=False")


@torch.no_grad()
def _fold_into(conv: _ConvNd, bn: _BatchNorm) -> None:
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None, "_require_stats vetted this BatchNorm"
    kernel, bias = fold_bn(conv.weight, conv.bias, mean, var, bn.eps,
                           bn.weight, bn.bias, groups=conv.groups,
                           transposed=isinstance(conv, _ConvTransposeNd))
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(kernel, requires_grad=requires_grad)
    conv.bias = nn.Parameter(bias.to(kernel.dtype), requires_grad=requires_grad)


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
