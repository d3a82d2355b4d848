"""MsnhNet writer: the captured graph lowered to ``model.msnhnet`` + ``model.msnhbin``.

Lowering works on the normalized graph from :func:`deployplug.capture.capture`, never on
hooked ``torch.nn.functional`` calls. Every op is checked first and *all* offenders are
reported together before a file is written. The files are then re-read by the reference
runtime (:mod:`deployplug.runtimes.msnhnet`), which rejects every construct the real runtime
miscomputes, so a writer bug cannot produce a file that silently computes something else.

Layout: :mod:`.rules` is the rule registry, filled by :mod:`.conv`, :mod:`.pooling`,
:mod:`.shapes` and :mod:`.elementwise` and loaded by :mod:`.ops`; :mod:`.emit` places layers
and wires them; :mod:`.text` renders the two files. This module checks, lowers and writes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.capture import Graph, capture
from deployplug.errors import (
    ArtifactFormatError,
    ExportFailedError,
    OffendingOp,
    UnsupportedOpError,
)
from deployplug.exporters import register_exporter
from deployplug.exporters.base import Exporter, FormatRecord
from deployplug.exporters.msnhnet.emit import INPUT, Emitter, NeedInputLayer, canonical
from deployplug.exporters.msnhnet.ops import RULES
from deployplug.exporters.msnhnet.text import MLayer, render_bin, render_text
from deployplug.outdir import replace_file
from deployplug.profiles import TargetProfile
from deployplug.profiles import offenders as profile_offenders
from deployplug.profiles.msnhnet import MSNHNET
from deployplug.runtimes import msnhnet as runtime

TARGET = "msnhnet"
GRAPH_FILE, WEIGHTS_FILE = "model.msnhnet", "model.msnhbin"


def offenders(graph: Graph) -> list[OffendingOp]:
    """Every node MsnhNet cannot express, plus model-level limits (inputs, outputs)."""
    return profile_offenders(graph, MSNHNET)


def _lower_once(graph: Graph, first: str | None) -> Emitter:
    """One lowering pass; ``first`` is an optional no-op layer that holds the input."""
    value = graph.inputs[0]
    em = Emitter(in_shape=canonical(value.shape))
    em.bind(value.name, em.in_shape, INPUT)
    if first == "act":
        em.emit("act", [("activation", "none")])
        em.bind(value.name, em.in_shape)
    elif first == "batchnorm":  # exact identity, and it gives the weight file a block
        c = em.in_shape[0]
        ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
        em.emit("batchnorm", [("eps", 0.0)], [ones, zeros, zeros, ones])
        em.bind(value.name, em.in_shape)
    for node in graph.nodes:
        em.node = node.name
        result = RULES[node.op](em, node, graph)
        if result is False:
            continue
        shape = canonical(node.shape) if node.shape is not None else None
        if isinstance(result, str):
            em.where[node.name] = em.where[result]
            em.shapes[node.name] = em.shapes[result]
        elif shape is not None:
            em.bind(node.name, shape)
    em.node = None
    out = graph.outputs[0]
    if em.where[out] == INPUT:
        em.emit("act", [("activation", "none")])
    elif em.where[out] != em.last:
        em.use(out)
    return em


def lower(graph: Graph) -> Emitter:
    """Lower a graph MsnhNet can express (call :func:`offenders` first)."""
    first = None
    for _ in range(3):
        try:
            em = _lower_once(graph, first)
        except NeedInputLayer:
            first = "act"
            continue
        if sum(layer.num_weights for layer in em.layers) == 0 and first != "batchnorm":
            first = "batchnorm"
            continue
        return em
    raise ExportFailedError("msnhnet", "lowering could not place the input in a layer")


def write_files(graph: Graph, out_dir: Path) -> dict[str, Any]:
    """Lower ``graph`` and write both files; returns the facts for the manifest."""
    found = offenders(graph)
    if found:
        raise UnsupportedOpError(found)
    em = lower(graph)
    # MsnhNet runs every sample alone and no lowered layer mixes samples, so the files are
    # written for batch 1 and any batch size runs by looping (the MsnhNet runner does).
    batch = 1
    text = render_text(em.layers, batch, em.in_shape)
    blob = render_bin(em.layers)
    try:  # the reference runtime refuses anything MsnhNet would miscompute
        model = runtime.build(text, GRAPH_FILE)
        runtime.attach_weights(model, np.frombuffer(blob, dtype="<f4"), WEIGHTS_FILE)
    except ArtifactFormatError as exc:
        raise ExportFailedError("msnhnet", f"the lowered network is not valid: {exc}") from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_file(out_dir / GRAPH_FILE, text.encode())
    replace_file(out_dir / WEIGHTS_FILE, blob)
    out_value = graph.output_values[0] if graph.output_values else None
    return {
        "layers": len(em.layers),
        "weights": int(len(blob) // 4),
        "batch": batch,
        "input_shape": list(graph.inputs[0].shape),
        "output_shape": list(out_value.shape) if out_value else None,
        "layer_nodes": [layer.node for layer in em.layers],
        "node_layers": {name: idx for name, idx in em.where.items()
                        if "#" not in name and idx >= 0},
        "layer_kinds": dict(sorted(_count(em.layers).items())),
        "graph_ops": [[node.name, node.op] for node in graph.nodes],
    }


def _count(layers: list[MLayer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.kind] = counts.get(layer.kind, 0) + 1
    return counts


class MsnhNetExporter(Exporter):
    """``model.msnhnet`` + ``model.msnhbin``, checked by the numpy reference runtime."""

    format = "msnhnet"
    default_target = "msnhnet"
    accepted_targets = ("msnhnet",)

    def write(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], out_dir: Path,
              target: TargetProfile, **options: Any) -> FormatRecord:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        graph = options.get("graph")
        if graph is None:
            model = copy.deepcopy(model).cpu().eval()
            inputs = tuple(t.detach().cpu().float() for t in example_inputs)
            with torch.no_grad():
                graph = capture(model, inputs)
        info = write_files(graph, Path(out_dir))
        return FormatRecord(format=self.format, target=getattr(target, "name", str(target)),
                            files=[GRAPH_FILE, WEIGHTS_FILE], info=info, graph=graph)


register_exporter(MsnhNetExporter())

__all__ = ["GRAPH_FILE", "WEIGHTS_FILE", "MsnhNetExporter", "lower", "offenders",
           "write_files"]
