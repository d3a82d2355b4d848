"""What :func:`deployplug.reparam.reparameterize` did, region by region, and what it left alone.

Pass an empty :class:`ReparamReport` as ``report=`` and read it afterwards::

    report = ReparamReport()
    fused = reparameterize(model, report=report)
    print(report)                 # one line per region collapsed or left alone
    report.op_counts()            # {"before": {"conv": n, "batch_norm": n, "add": n},
                                  #  "after": {...}}
    report.to_dict()              # JSON-ready, for a manifest or a logger

An out-parameter keeps the return type of ``reparameterize`` (the model) unchanged for every
existing caller, and costs nothing when not asked for: the whole-model op counts need up to
two extra traces (none before fusion when no block fuses itself: the generic pass's own trace
is counted), which only run when a report is requested.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from deployplug.reparam.linear_ops import ADD, CONV_FUNCS, SUB

COUNTED = ("conv", "batch_norm", "add")
_SUMS = ADD | SUB


class LinearRegionWarning(UserWarning):
    """A block that looks multi-branch was left unfused; the message names it and says why."""


@dataclass(frozen=True)
class CollapsedRegion:
    """A linear region replaced by one convolution.

    ``owner`` is the module whose forward held the region (``""`` for the model itself) and
    ``replaced_by`` how it was rewritten: ``"conv"`` (the owner *is* now the conv),
    ``"sequential"`` (the conv followed by the owner's remaining child calls, under their
    old names) or ``"graph_module"`` (the owner's traced forward with the region swapped for
    the conv). ``check_error`` is the normalized error of the built conv (its weights read
    in float64) against the region's own modules in float64 on the re-check's input; regions
    of one structure are checked once and share it
    (:func:`~deployplug.reparam.region_check.structure_key`).
    """

    owner: str
    modules: tuple[str, ...]
    ops: dict[str, int]
    conv: dict[str, Any]
    conv_path: str
    replaced_by: str
    check_error: float


@dataclass(frozen=True)
class SkippedRegion:
    """A region (or an untraceable module) left as it was, and why."""

    owner: str
    modules: tuple[str, ...]
    ops: dict[str, int]
    reason: str
    multi_branch: bool


@dataclass
class ReparamReport:
    """Per-region account of a :func:`~deployplug.reparam.reparameterize` call."""

    collapsed: list[CollapsedRegion] = field(default_factory=list)
    left_alone: list[SkippedRegion] = field(default_factory=list)
    protocol: list[tuple[str, str]] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    counts_before: dict[str, int | None] | None = None
    counts_after: dict[str, int | None] | None = None

    def op_counts(self) -> dict[str, dict[str, int | None] | None]:
        """Whole-model counts of convolutions, BatchNorms and branch additions (an add or
        sub of two computed tensors), before and after; ``None`` where not countable."""
        return {"before": self.counts_before, "after": self.counts_after}

    def to_dict(self) -> dict[str, Any]:
        return {
            "collapsed": [asdict(r) for r in self.collapsed],
            "left_alone": [asdict(r) for r in self.left_alone],
            "protocol": [{"module": p, "method": m} for p, m in self.protocol],
            "folded": [{"conv": c, "batch_norm": b} for c, b in self.folded],
            "op_counts": self.op_counts(),
        }

    def __str__(self) -> str:
        lines = [f"reparameterize: {len(self.protocol)} block(s) by their own method, "
                 f"{len(self.collapsed)} linear region(s) collapsed, "
                 f"{len(self.left_alone)} left alone, {len(self.folded)} conv->BN fold(s)"]
        if self.counts_before is not None:
            lines.append(f"  op counts before {self.counts_before} after {self.counts_after}")
        for path, method in self.protocol:
            lines.append(f"  fused by {method}(): {path or '<model>'}")
        for r in self.collapsed:
            c = r.conv
            lines.append(
                f"  collapsed {r.owner or '<model>'} -> {r.conv_path} ({r.replaced_by}): "
                f"{_ops_text(r.ops)} -> {c['class']}({c['in_channels']}, "
                f"{c['out_channels']}, k={tuple(c['kernel_size'])}, s={tuple(c['stride'])}, "
                f"p={tuple(c['padding'])}, d={tuple(c['dilation'])}, g={c['groups']})")
        for s in self.left_alone:
            lines.append(f"  left alone {s.owner or '<model>'} ({_ops_text(s.ops)}): {s.reason}")
        return "\n".join(lines)


def _ops_text(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "no ops"


# ----------------------------------------------------------------------------- op counts

def count_ops(model: nn.Module) -> dict[str, int | None]:
    """Convolutions, BatchNorms and branch additions in ``model``'s traced forward.

    Counted from a ``torch.fx`` trace (module calls and functional calls alike); an add or
    sub counts only when both operands depend on the input. A model that cannot be traced is
    counted by its modules instead, and its adds are ``None`` (unknown).
    """
    from deployplug.reparam.generic import RegionTracer

    try:
        graph = RegionTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model is counted by its modules
        return count_modules(model)
    return count_graph(model, graph)


def count_modules(model: nn.Module) -> dict[str, int | None]:
    """The counts of a model that cannot be traced: its conv and BatchNorm modules, adds
    unknown."""
    mods = list(model.modules())
    return {"conv": sum(isinstance(m, _ConvNd) for m in mods),
            "batch_norm": sum(isinstance(m, _BatchNorm) for m in mods), "add": None}


def count_graph(model: nn.Module, graph: fx.Graph) -> dict[str, int | None]:
    """:func:`count_ops` of a ``RegionTracer`` trace of ``model`` already at hand (the
    generic pass's own, so a report does not trace the model a second time)."""
    live: set[fx.Node] = set()
    counts: dict[str, int] = dict.fromkeys(COUNTED, 0)
    for node in graph.nodes:
        if node.op == "placeholder" or any(r in live for r in node.all_input_nodes):
            live.add(node)
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            if isinstance(module, _ConvNd):
                counts["conv"] += 1
            elif isinstance(module, _BatchNorm):
                counts["batch_norm"] += 1
        elif node.op == "call_function" and node.target in CONV_FUNCS:
            counts["conv"] += 1
        elif node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            counts["batch_norm"] += 1
        if (node.op in ("call_function", "call_method") and node.target in _SUMS
                and sum(isinstance(a, fx.Node) and a in live for a in node.args[:2]) == 2):
            counts["add"] += 1
    return dict(counts)  # a copy typed by the return annotation: every count is known here
