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
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.capture import Graph, capture, evaluate
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


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_files(graph: Graph, out_dir: Path) -> dict[str, Any]:
    """Lower ``graph`` and write both files; returns the facts for the manifest."""
    found = offenders(graph)
    if found:
        raise UnsupportedOpError(found)
    em = lower(graph)
    # MsnhNet runs every sample alone and no lowered layer mixes samples, so the files are
    # written for batch 1 and any batch size runs by looping (``run_files``).
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
    _atomic_write(out_dir / GRAPH_FILE, text.encode())
    _atomic_write(out_dir / WEIGHTS_FILE, blob)
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


def run_files(out_dir: Path, info: dict[str, Any], x: np.ndarray,
              model: runtime.MsnhNetModel | None = None) -> np.ndarray:
    """Run the written files on ``x``, splitting it into batches of the configured size.

    Both files are read through the bounded reference-runtime loader; a sample or a recorded
    output shape that does not fit the graph is an :class:`ArtifactFormatError`, not a
    reshape error.
    """
    if model is None:
        model = runtime.load(Path(out_dir) / GRAPH_FILE, Path(out_dir) / WEIGHTS_FILE)
    x = np.asarray(x, dtype=np.float32)
    per_sample = int(np.prod(model.in_shape))
    if x.ndim < 1 or x.shape[0] < 1 or x.size != x.shape[0] * per_sample:
        raise ArtifactFormatError(f"input of shape {list(x.shape)} does not fit the graph's "
                                  f"input C,H,W {model.in_shape}")
    x = x.reshape((x.shape[0],) + model.in_shape)
    if x.shape[0] % model.batch:
        raise ArtifactFormatError(f"input batch {x.shape[0]} is not a multiple of the "
                                  f"configured batch {model.batch}")
    outs = [model.run(x[i:i + model.batch]) for i in range(0, x.shape[0], model.batch)]
    y = np.concatenate(outs)  # type: ignore[arg-type]
    shape = info.get("output_shape")
    if shape:
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ArtifactFormatError(f"recorded output_shape {shape!r} is not a list of ints")
        target = (x.shape[0],) + tuple(shape[1:])
        if int(np.prod(target, dtype=object)) != y.size:
            raise ArtifactFormatError(f"the graph's output {list(y.shape)} does not fit the "
                                      f"recorded output shape {shape}")
        return y.reshape(target)
    return y


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
        record = FormatRecord(format=self.format, target=getattr(target, "name", str(target)),
                              files=[GRAPH_FILE, WEIGHTS_FILE], info=info)
        # Kept in memory only (not in the manifest): the exact graph that was lowered, so a
        # later layer-by-layer comparison does not depend on which model it is handed.
        record._graph = graph  # type: ignore[attr-defined]
        return record

    def run(self, out_dir: Path, record: FormatRecord,
            inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.run_samples(out_dir, record, [inputs])[0]

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        if any(len(inputs) != 1 for inputs in samples):
            raise ArtifactFormatError("MsnhNet networks take one input, got "
                                      f"{max(len(inputs) for inputs in samples)}")
        model = runtime.load(Path(out_dir) / GRAPH_FILE, Path(out_dir) / WEIGHTS_FILE)
        return [[run_files(Path(out_dir), record.info, inputs[0], model)] for inputs in samples]

    def first_divergence(self, out_dir: Path, record: FormatRecord, model: nn.Module,
                         inputs: Sequence[np.ndarray], tolerance: float) -> str | None:
        """The first graph node whose MsnhNet layer output departs from PyTorch's value.

        PyTorch's values come from the graph that was lowered when it is still in memory,
        otherwise from re-capturing ``model``; a model whose graph differs from the lowered
        one (say, before fusion) cannot be mapped to layers, and ``None`` is returned.
        """
        node_layers: dict[str, int] = record.info.get("node_layers", {})
        if not node_layers or len(inputs) != 1:
            return None
        net = runtime.load(Path(out_dir) / GRAPH_FILE, Path(out_dir) / WEIGHTS_FILE)
        x = np.asarray(inputs[0], dtype=np.float32)[: net.batch]
        xt = torch.from_numpy(x.copy())
        graph = getattr(record, "_graph", None)
        if graph is None:
            with torch.no_grad():
                graph = capture(copy.deepcopy(model).cpu().eval(), (xt,))
            if [[n.name, n.op] for n in graph.nodes] != record.info.get("graph_ops"):
                return None
        try:
            with torch.no_grad():
                values = evaluate(graph, [xt])
        except Exception:  # an op torch cannot replay from the normalized graph
            return None
        outs = net.run(x.reshape((net.batch,) + net.in_shape), keep_all=True)
        for node in graph.nodes:
            idx = node_layers.get(node.name)
            ref = values.get(node.name)
            if idx is None or not isinstance(ref, torch.Tensor) or net.layers[idx].opaque:
                continue
            got = outs[idx]
            if got.size != ref.numel():
                continue
            ref_np = ref.detach().numpy().reshape(got.shape)
            scale = max(float(np.abs(ref_np).max()), 1e-12)
            if float(np.abs(got - ref_np).max()) / scale > tolerance:
                return f"{node.name} ({node.op} at '{node.where}', layer {idx})"
        return None


register_exporter(MsnhNetExporter())

__all__ = ["MsnhNetExporter", "lower", "offenders", "run_files", "write_files"]
