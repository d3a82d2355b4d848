"""Linear regions of a traced graph: connected linear ops with one input and one output.

A *region* ends at a *sink*: a linear node some non-linear node (or the graph output) reads.
It holds every linear ancestor of the sink, walking back through data inputs until a
non-linear node, which is the region's *source*. The region can become one convolution only
if:

* it reads exactly one source tensor (two sources mean a nonlinearity sits inside a branch,
  as in a ResNet block, or an op that looks linear but is not exactly a conv cut a branch);
* none of its intermediates is read outside it (the intermediate would still be needed);
* it is worth it: at least one convolution, and more than a lone conv or a conv->BatchNorm
  pair (those the conv->BN pass folds in place).

Each region also gets an *owner*: the deepest module whose forward contains all of it, which
is where the pass rewrites it (:mod:`deployplug.reparam.generic`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

from deployplug.reparam.linear_ops import Classified, describe_node

_MAX_LISTED = 4


@dataclass
class Region:
    """One candidate region; ``problem`` is why it cannot be collapsed, or ``None``."""

    sink: fx.Node
    nodes: list[fx.Node]
    sources: list[fx.Node]
    owner: str
    modules: tuple[str, ...]
    ops: Counter[str] = field(default_factory=Counter)
    problem: str | None = None
    multi_branch: bool = False

    @property
    def source(self) -> fx.Node:
        return self.sources[0]

    def signature(self, prefix: str = "") -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
        """What identifies this region in a trace of its owner alone: module paths relative
        to ``prefix`` and the op counts."""
        cut = len(prefix) + 1 if prefix else 0
        mods = tuple(sorted(m[cut:] for m in self.modules))
        return mods, tuple(sorted(self.ops.items()))


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _common_prefix(scopes: list[tuple[str, ...]]) -> str:
    if not scopes:
        return ""
    common = list(scopes[0])
    for scope in scopes[1:]:
        n = 0
        while n < min(len(common), len(scope)) and common[n] == scope[n]:
            n += 1
        common = common[:n]
    return common[-1] if common else ""


def _trivial(region_ops: list[str]) -> bool:
    """Nothing to gain: no convolution (pointwise arithmetic such as ``x + scale * x`` stays
    as written), or a lone conv, optionally followed by a BatchNorm (the fold's job)."""
    kinds = [k for k in region_ops if k != "identity"]
    return "conv" not in kinds or kinds in (["conv"], ["conv", "batch_norm"])


def find_regions(graph: fx.Graph, classified: Classified, prefix: str = "") -> list[Region]:
    """Every non-trivial region of ``graph``, with module paths prefixed by ``prefix`` (the
    traced module's path in the whole model). Regions that cannot be collapsed come with
    their ``problem`` set."""
    ops = classified.ops
    order = {n: i for i, n in enumerate(graph.nodes)}
    sinks = [n for n in graph.nodes if n in ops and any(u not in ops for u in n.users)]
    regions = []
    for sink in sinks:
        members: set[fx.Node] = set()
        stack = [sink]
        while stack:
            n = stack.pop()
            if n in members:
                continue
            members.add(n)
            stack.extend(i for i in ops[n].inputs if i in ops)
        nodes = sorted(members, key=order.__getitem__)
        kinds = [ops[n].kind for n in nodes]
        if _trivial(kinds):
            continue
        sources: list[fx.Node] = []
        for n in nodes:
            for i in ops[n].inputs:
                if i not in ops and i not in sources:
                    sources.append(i)
        modules = tuple(sorted({_join(prefix, str(n.target)) for n in nodes
                                if n.op == "call_module"}))
        owner = _join(prefix, _common_prefix([classified.scopes[n] for n in nodes]))
        counts = Counter(ops[n].report_kind for n in nodes if ops[n].kind != "identity")
        region = Region(sink, nodes, sources, owner, modules or (owner,), counts)
        region.problem = _problem(region, members, classified)
        has_sum = "add" in counts
        if region.problem is None or len(sources) == 1:
            region.multi_branch = has_sum
        else:
            region.multi_branch = has_sum and any(
                s in classified.near_misses for s in sources)
        regions.append(region)
    return regions


def _problem(region: Region, members: set[fx.Node], classified: Classified) -> str | None:
    if len(region.sources) != 1:
        missed = [classified.near_misses[s] for s in region.sources
                  if s in classified.near_misses]
        if missed:
            return "a branch is cut by an op that is not exactly a convolution: " + missed[0]
        names = ", ".join(describe_node(s) for s in region.sources[:_MAX_LISTED])
        return (f"the linear ops read {len(region.sources)} different tensors ({names}); a "
                "nonlinear op sits inside a branch, so the branches are not one linear map "
                "of one input")
    for n in region.nodes:
        if n is region.sink:
            continue
        outside = [u for u in n.users if u not in members]
        if outside:
            return (f"the intermediate '{describe_node(n, classified.ops.get(n))}' is also "
                    f"used outside the region (by '{describe_node(outside[0])}'), so it "
                    "cannot disappear into one conv")
    return None
