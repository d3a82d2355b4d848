"""The model each artifact was written from, built the same way at export and at verify.

An artifact is lowered from a fused, decomposed copy of the model, not from the model as
written: BatchNorms folded into convolutions, multi-branch blocks collapsed, ops a target
refuses replaced by exact rules. Comparing an artifact layer by layer against anything else
blames the wrong layer (every conv of a net with BatchNorm "differs"). So the export
(:mod:`deployplug.pipeline`) and a later ``dp.verify(dir, model=...)`` build that model with
the same functions, here: :func:`deploy_copy`, then fusion, then :func:`legal_model` per
target. A rebuilt graph is then held against the node names and ops recorded at export, and
a different one is reported as such instead of being compared.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deployplug.capture import CaptureCache, Graph
from deployplug.io_spec import FlatOutputs, output_spec, strip_compiled_children, unwrap_compiled
from deployplug.profiles import TargetProfile, get_target


def deploy_copy(model: nn.Module) -> nn.Module:
    """A CPU, float32, eval-mode deep copy; the original keeps its device, dtype and mode.

    ``torch.compile`` wrappers (the model itself or any child) are replaced by the modules they
    wrap: the compiled function is the inner module's, and that is what can be captured.
    """
    from deployplug.reparam.passes import _detached_attributes

    source = unwrap_compiled(model)
    clone = strip_compiled_children(copy.deepcopy(source, _detached_attributes(source)))
    return clone.cpu().float().eval()


def legal_model(model: nn.Module, profile: TargetProfile, inputs: tuple[torch.Tensor, ...],
                decompose: bool, cache: CaptureCache
                ) -> tuple[nn.Module, list[dict[str, Any]], Graph | None]:
    """The target-legal model, the rewrites that made it so, and its graph when captured.

    Each rewrite records the op, the module path, the rule and the ``submodule`` path its
    replacement lives at, which is how a layer is traced back to the rule that produced it.
    """
    if not decompose or profile.accepts_everything:
        return model, [], None
    from deployplug.decompositions.apply import run_decompose
    from deployplug.errors import UnsupportedOpError

    result = run_decompose(model, profile, inputs, cache=cache)
    if result.offenders:
        raise UnsupportedOpError(result.offenders)
    rewrites = [{"op": a.op, "module_path": a.module_path, "rule": a.rule,
                 "submodule": a.submodule} for a in result.applied]
    return result.module, rewrites, result.graph


@dataclass
class Rebuilt:
    """Per format, the graph its files were written from, or why it could not be rebuilt."""

    graphs: dict[str, Graph] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def _exported_part(model: nn.Module, extra: Mapping[str, Any]) -> nn.Module | None:
    """The submodule the export wrote (``extra["exported_module"]``), when it was one."""
    name = extra.get("exported_module")
    if not isinstance(name, str) or not name or name.endswith(".forward"):
        return None
    try:
        part = model.get_submodule(name)
    except AttributeError:
        return None
    return part if part is not model else None


def rebuild_graphs(model: nn.Module, records: Sequence[Any], stages: Mapping[str, Any],
                   extra: Mapping[str, Any], inputs: Sequence[torch.Tensor],
                   tolerance: float) -> Rebuilt:
    """Fuse and decompose ``model`` as the export recorded in ``stages`` did, per record.

    ``records`` are the formats' :class:`~deployplug.exporters.base.FormatRecord`; each one's
    ``info["graph_ops"]`` (node names and ops, in order) must equal the rebuilt graph. When the
    export wrote a submodule (``extra["exported_module"]``) and the whole model does not match,
    that submodule is tried too. ``tolerance`` is the fusion self-check's, as at export.
    """
    out = Rebuilt()
    candidates = [model]
    part = _exported_part(model, extra)
    if part is not None:
        candidates.append(part)
    pending = list(records)
    for i, candidate in enumerate(candidates):
        last = i == len(candidates) - 1
        try:
            found = _rebuild_one(candidate, pending, stages, inputs, tolerance)
        except Exception as exc:  # fusion's self-check, a capture the model refuses...
            if last:
                for record in pending:
                    out.problems.setdefault(record.format, f"the model could not be fused and "
                                            f"lowered again: {type(exc).__name__}: {exc}")
            continue
        for record in list(pending):
            graph, problem = found[record.format]
            if graph is not None:
                out.graphs[record.format] = graph
                out.problems.pop(record.format, None)
                pending.remove(record)
            elif last or record.format not in out.problems:
                out.problems[record.format] = problem
    return out


def _rebuild_one(model: nn.Module, records: Sequence[Any], stages: Mapping[str, Any],
                 inputs: Sequence[torch.Tensor], tolerance: float
                 ) -> dict[str, tuple[Graph | None, str]]:
    from deployplug.runtimes.layer_compare import graph_mismatch

    inputs = tuple(inputs)
    work = deploy_copy(model)
    with torch.no_grad():
        flat = output_spec(work(*inputs)).flat
    if stages.get("reparameterize", True):
        from deployplug.reparam import reparameterize

        work = reparameterize(work, inplace=True, example_input=inputs, tolerance=tolerance)
    if not flat:
        work = FlatOutputs(work)
    cache = CaptureCache(inputs)
    found: dict[str, tuple[Graph | None, str]] = {}
    for record in records:
        try:
            profile = get_target(record.target)
            legal, _, graph = legal_model(work, profile, inputs,
                                          bool(stages.get("decompose", True)), cache)
            graph = graph if graph is not None else cache.graph(legal)
        except Exception as exc:
            found[record.format] = (None, f"the model could not be lowered for target "
                                    f"{record.target!r} again: {type(exc).__name__}: {exc}")
            continue
        mismatch = graph_mismatch(graph, record.info.get("graph_ops"))
        if mismatch is None and not isinstance(record.info.get("graph_ops"), list):
            mismatch = "the export recorded no graph to check it against"
        if mismatch is None:
            found[record.format] = (graph, "")
        else:
            steps = " and ".join(s for s, on in (("fused", stages.get("reparameterize", True)),
                                                 ("decomposed", stages.get("decompose", True)))
                                 if on) or "captured"
            found[record.format] = (None, f"the model given is not the one these files were "
                                    f"written from: {steps} as at export, its graph differs "
                                    f"({mismatch}); no layer is blamed")
    return found


__all__ = ["Rebuilt", "deploy_copy", "legal_model", "rebuild_graphs"]
