"""Model-level re-parameterization: walk the modules, let blocks fuse themselves, fold conv->BN.

Two passes, in this order:

1. **Block protocol.** Any module that defines ``fuse()`` (returns a replacement),
   ``reparameterize()`` or ``switch_to_deploy()`` (both in place) is converted. These are the
   names RepVGG, timm, DBB/ACNet, MobileOne, YOLOv6/7 and mmyolo blocks already use, so
   third-party blocks work without registration. A method is only called when it takes no
   required arguments: ``reparameterize(mu, logvar)`` of a VAE is a different thing.
2. **Generic conv->BatchNorm folding** for every pair the blocks left behind (plain stems,
   heads, downsample shortcuts). Pairs are found without running the model: a ``torch.fx``
   trace where modules are leaves gives the data flow; when tracing fails (data-dependent
   Python), ``nn.Sequential`` adjacency is used for that subtree instead. A pair is folded
   only when the conv's single consumer is the BN and neither module is called or shared
   elsewhere, so the rewrite cannot change any other path.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from deployplug.errors import BatchNormStatsError
from deployplug.reparam.fusion import fold_bn

PROTOCOL_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Deploy form of ``model``: every self-fusing block fused, every conv->BN pair folded.

    Returns a model in eval mode with the same dtype and device. With ``inplace=False`` (the
    default) the given model is left exactly as it was, parameters and training flag included.
    Running it twice is a no-op.
    """
    if inplace:
        target, borrowed = model, _Borrowed()
    else:
        target, borrowed = _deploy_copy(model)
    target.eval()
    target = convert_blocks(target)
    borrowed.release(target)  # before anything else may write to what fusion left behind
    fold_conv_bn(target)
    return target.eval()


class _Borrowed:
    """Modules and tensors a deploy copy shares with the original until fusion drops them."""

    def __init__(self, modules: set[int] | None = None, tensors: set[int] | None = None):
        self.modules = modules or set()
        self.tensors = tensors or set()

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
            for name, t in list(module._buffers.items()):
                if t is not None and id(t) in self.tensors:
                    module._buffers[name] = t.clone()


def _own_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)


def _deploy_copy(model: nn.Module) -> tuple[nn.Module, _Borrowed]:
    """Deep copy that does not duplicate what fusion is about to throw away.

    Blocks whose class sets ``fusion_reads_only = True`` promise that fusing only reads their
    submodules and tensors, builds new ones and drops the old. The copy of such a block may
    therefore borrow the original's submodules for the moment between copying and fusing,
    which saves copying nearly every weight (and module) of a RepVGG model. Only children
    used nowhere else are borrowed; :meth:`_Borrowed.release` guarantees nothing borrowed
    survives in the result.
    """
    module_uses: Counter[int] = Counter()
    tensor_uses: Counter[int] = Counter()
    owners = []
    for _, module in model.named_modules(remove_duplicate=False):
        module_uses[id(module)] += 1
        tensor_uses.update(id(t) for t in _own_tensors(module))
        if getattr(type(module), "fusion_reads_only", False) and not getattr(
                module, "deployed", True):
            owners.append(module)
    memo: dict[int, object] = {}
    borrowed = _Borrowed()
    for owner in owners:
        for child in owner.children():
            subtree = list(child.modules())
            tensors = [t for m in subtree for t in _own_tensors(m)]
            if all(module_uses[id(m)] == 1 for m in subtree) and all(
                    tensor_uses[id(t)] == 1 for t in tensors):
                memo[id(child)] = child
                borrowed.modules.update(id(m) for m in subtree)
                borrowed.tensors.update(id(t) for t in tensors)
    return copy.deepcopy(model, memo), borrowed


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


def _convert_one(module: nn.Module, path: str) -> nn.Module:
    name = _protocol_method(module)
    if name is None:
        return module
    try:
        with torch.no_grad():
            result = getattr(module, name)()
    except BatchNormStatsError as err:
        raise BatchNormStatsError(f"in '{path or type(module).__name__}': {err}") from err
    if name == "fuse" and isinstance(result, nn.Module):
        return result
    return module


def convert_blocks(module: nn.Module, path: str = "") -> nn.Module:
    """Apply the block protocol to ``module`` and, recursively, to what it contains afterwards.

    Parents go first (a composite block may fuse its children itself); the recursion then
    descends into the *converted* module, so a replacement's own children are reached too.
    Returns the (possibly replaced) module.
    """
    module = _convert_one(module, path)
    for name, child in list(module.named_children()):
        new = convert_blocks(child, f"{path}.{name}" if path else name)
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
    return (isinstance(conv, _ConvNd) and isinstance(bn, _BatchNorm)
            and not isinstance(conv.weight, nn.parameter.UninitializedParameter)
            and bn.num_features == conv.out_channels)


def _pairs_from_graph(graph: fx.Graph) -> Iterator[tuple[str, str]]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attr_roots = {str(n.target).rsplit(".", 1)[0] for n in graph.nodes if n.op == "get_attr"}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        (user,) = node.users
        if (user.op == "call_module" and user.args and user.args[0] is node
                and calls[node.target] == 1 and calls[user.target] == 1
                and node.target not in attr_roots and user.target not in attr_roots):
            yield node.target, user.target


def _find_pairs(module: nn.Module, prefix: str) -> Iterator[tuple[str, str]]:
    """(conv path, bn path) candidates under ``module``, traced if possible."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure just means "use the fallback"
        graph = None
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    if graph is not None:
        for conv, bn in _pairs_from_graph(graph):
            yield join(conv), join(bn)
        return
    children = list(module.named_children())
    if isinstance(module, nn.Sequential):
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if _is_pair(conv, bn):
                yield join(cname), join(bname)
    for name, child in children:
        if next(iter(child.children()), None) is not None:
            yield from _find_pairs(child, join(name))


def fold_conv_bn(model: nn.Module) -> int:
    """Fold every eligible conv->BatchNorm pair of ``model`` in place; returns how many.

    The conv receives the fused weight and bias (all its other settings are kept) and the BN
    slot becomes ``nn.Identity``.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    if not any(isinstance(m, _BatchNorm) for m in modules.values()):
        return 0
    shared = Counter(id(m) for m in modules.values())
    folded = 0
    for conv_path, bn_path in list(_find_pairs(model, "")):
        conv, bn = modules.get(conv_path), modules.get(bn_path)
        if conv is None or bn is None or not _is_pair(conv, bn):
            continue
        if shared[id(conv)] > 1 or shared[id(bn)] > 1:
            continue
        _fold_into(conv, bn, bn_path)
        _set_module(model, bn_path, nn.Identity())
        folded += 1
    return folded


@torch.no_grad()
def _fold_into(conv: _ConvNd, bn: _BatchNorm, bn_path: str) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise BatchNormStatsError(
            f"BatchNorm '{bn_path}' ({type(bn).__name__}) follows a convolution but has no "
            "running statistics (track_running_stats=False), so it cannot be folded; build it "
            "with track_running_stats=True and train or recalibrate it, or export with "
            "reparameterize=False")
    kernel, bias = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                           bn.weight, bn.bias, groups=conv.groups,
                           transposed=isinstance(conv, _ConvTransposeNd))
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(kernel, requires_grad=requires_grad)
    conv.bias = nn.Parameter(bias.to(kernel.dtype), requires_grad=requires_grad)


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
