"""Putting a collapsed region's conv into the model: the new module and the owner's rewrite.

The owner's traced graph gets one ``call_module`` of the new conv in place of the region (and
loses the constants only the region used); :func:`rebuild` then returns the simplest module
computing that graph: the conv itself, an ``nn.Sequential`` of same-named children, or a
``torch.fx.GraphModule`` (see :mod:`deployplug.reparam.generic`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from deployplug.reparam.affine_form import ConvSpec
from deployplug.reparam.linear_ops import Classified, fetch_attr
from deployplug.reparam.linear_regions import Region

# Callable rather than the classes: their stubs want rank-sized tuples (``tuple[int, int]``),
# while a spec holds ``tuple[int, ...]`` whose length is that rank by construction.
_CONV_CLASSES: dict[int, Callable[..., _ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def reference_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in module.parameters():
        if t.is_floating_point():
            return t
    for b in module.buffers():
        if b.is_floating_point():
            return b
    return None


class ConvTemplates:
    """Convolution modules built once per set of settings, then copied.

    ``ConvNd.__init__`` initialises a weight it is about to lose (on the meta device, through
    torch's decompositions), which costs more than everything else :func:`make_conv` does. A
    shallow copy of a module torch's own constructor built, with every container attribute
    (parameters, hooks, padding list) copied, is the same module without that work.
    """

    def __init__(self) -> None:
        self._built: dict[tuple[Any, ...], nn.Module] = {}

    def new(self, spec: ConvSpec) -> nn.Module:
        cls = _CONV_CLASSES[len(spec.stride)]
        settings = (cls, spec.in_channels, spec.out_channels, tuple(spec.weight.shape[2:]),
                    spec.stride, spec.padding, spec.dilation, spec.groups, spec.padding_mode)
        template = self._built.get(settings)
        if template is None:
            template = cls(*settings[1:-1], bias=True, padding_mode=spec.padding_mode,
                           device="meta")
            self._built[settings] = template
        conv = copy.copy(template)
        state = vars(conv)
        for name, value in state.items():
            if isinstance(value, (dict, list, set)):
                state[name] = value.copy()  # same type (OrderedDict stays OrderedDict)
        return conv


def make_conv(spec: ConvSpec, like: torch.Tensor | None,
              templates: ConvTemplates | None = None) -> nn.Module:
    """The ``ConvNd`` of ``spec`` in ``like``'s dtype and device: its float64 kernel is
    summed and rounded once, straight into the new parameter."""
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    requires_grad = like.requires_grad if isinstance(like, nn.Parameter) else True
    if not bool(torch.isfinite(spec.bias).all()):
        raise ValueError("the composed bias is not finite")
    conv = (templates or ConvTemplates()).new(spec)
    conv.weight = nn.Parameter(spec.weight.write(dtype, device), requires_grad=requires_grad)
    conv.bias = nn.Parameter(spec.bias.to(device=device, dtype=dtype, copy=True),
                             requires_grad=requires_grad)
    return conv.eval()


def fresh_name(module: nn.Module, graph: fx.Graph, taken: dict[str, nn.Module]) -> str:
    used = {str(n.target).split(".")[0] for n in graph.nodes
            if n.op in ("call_module", "get_attr")}
    base, i = "reparam", 0
    name = base
    while name in used or name in taken or hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def rewrite(graph: fx.Graph, region: Region, classified: Classified, name: str) -> None:
    with graph.inserting_before(region.sink):
        new = graph.call_module(name, (region.source,))
    region.sink.replace_all_uses_with(new)
    feeding: list[fx.Node] = []
    erased: set[fx.Node] = set()
    for node in reversed(region.nodes):
        feeding += [r for r in node.all_input_nodes if r in classified.constants]
        graph.erase_node(node)
    while feeding:  # constants only the region used: the folded-away parameter arithmetic
        node = feeding.pop()
        if node not in erased and not node.users:
            feeding += [r for r in node.all_input_nodes if r in classified.constants]
            graph.erase_node(node)
            erased.add(node)


def rebuild(module: nn.Module, graph: fx.Graph,
             new_modules: dict[str, nn.Module]) -> tuple[nn.Module, str]:
    """The simplest module computing ``graph``: the conv, a Sequential chain, or a
    GraphModule (see the module docstring)."""
    holders: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            holders[target] = new_modules.get(target) or fetch_attr(module, target)
    chain = _chain(graph)
    if chain is not None:
        if len(chain) == 1:
            return holders[chain[0]], "conv"
        seq = nn.Sequential(OrderedDict((t, holders[t]) for t in chain))
        return keep_plain_attributes(module, seq), "sequential"
    gm = fx.GraphModule(holders, graph, class_name=f"{type(module).__name__}Fused")
    return keep_plain_attributes(module, gm), "graph_module"


_PLAIN = (bool, int, float, str, type(None), tuple, list, dict, torch.Size, torch.dtype)


def keep_plain_attributes(old: nn.Module, new: nn.Module) -> nn.Module:
    """Plain-data attributes of the replaced module (``default_input_shape``,
    ``num_classes``...) that code outside ``forward`` may read, where ``new`` has no such
    attribute of its own."""
    for name, value in vars(old).items():
        if not name.startswith("_") and isinstance(value, _PLAIN) and not _has(new, name):
            # what nn.Module.__setattr__ does for a plain new name; containers are copied,
            # since ``old`` may be the given model's own module, lent to the pass
            vars(new)[name] = copy.deepcopy(value) if isinstance(value, (list, dict)) else value
    return new


def _has(module: nn.Module, name: str) -> bool:
    """``hasattr`` for a module of torch's own classes, without raising (and catching) the
    ``AttributeError`` of ``nn.Module.__getattr__`` for every missing name."""
    return (name in vars(module) or hasattr(type(module), name) or name in module._parameters
            or name in module._buffers or name in module._modules)


def _chain(graph: fx.Graph) -> list[str] | None:
    """Targets of a forward that is just ``x -> child_a -> child_b -> ... -> return``."""
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or placeholders[0].args or str(
            placeholders[0].target).startswith("*"):
        return None
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    output = nodes[-1]
    prev = placeholders[0]
    targets: list[str] = []
    for node in body:
        if (node.op != "call_module" or node.args != (prev,) or node.kwargs
                or "." in str(node.target) or str(node.target) in targets
                or len(prev.users) != 1):
            return None
        targets.append(str(node.target))
        prev = node
    if not targets or output.args != (prev,) or len(prev.users) != 1:
        return None
    return targets
