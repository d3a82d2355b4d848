"""MsnhNet layers against PyTorch, node by node, in the reference runtime.

MsnhNet layers have no names, only indices, so rows name them ``#12``. The writer records
which layer holds each graph value (``info["node_layers"]``) and which node each layer was
emitted for (``info["layer_nodes"]``, routes and padding layers included), so a node's row
lists every layer that computes it. A node living in the same layer as its input (a reshape
that changes nothing) has no row.

The reference runtime refuses a file whose layers do not fit together (a varop over two
shapes after a changed padding). Then the layers are built one by one up to the first one it
refuses, the prefix runs with the weights it needs, and every value before the refused layer
is compared; the refused layer is named with the runtime's reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deployplug.capture import Graph
from deployplug.errors import ArtifactFormatError
from deployplug.layer_profile import LayerProfile
from deployplug.runtimes import msnhnet as runtime
from deployplug.runtimes.layer_compare import (
    ArtifactValues,
    MappedLayer,
    bisect_prefix,
    build_profile,
    first_input_alias,
    reference_values,
)
from deployplug.runtimes.msnhnet.builder import Builder
from deployplug.runtimes.msnhnet.executor import MsnhNetModel
from deployplug.runtimes.msnhnet.layer import Layer


def layer_name(index: int) -> str:
    return f"#{index}"


def _records(info: Mapping[str, Any]) -> tuple[dict[str, int], list[str | None]]:
    node_layers = info.get("node_layers")
    layer_nodes = info.get("layer_nodes", [])
    if not isinstance(node_layers, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in node_layers.items()):
        raise ArtifactFormatError("msnhnet record: info.node_layers must map names to layer "
                                  "indices")
    if not isinstance(layer_nodes, list) or not all(n is None or isinstance(n, str)
                                                    for n in layer_nodes):
        raise ArtifactFormatError("msnhnet record: info.layer_nodes must list node names")
    return node_layers, layer_nodes


def mapped_layers(graph: Graph, info: Mapping[str, Any], kinds: Sequence[str]
                  ) -> list[MappedLayer]:
    """A row for every node held in a layer of its own, with the layers computing it."""
    node_layers, layer_nodes = _records(info)
    inputs = {v.name for v in graph.inputs}
    owned: dict[str, set[int]] = {}
    for i, name in enumerate(layer_nodes):
        if name is not None and i < len(kinds):
            owned.setdefault(name, set()).add(i)
    rows = []
    for node in graph.nodes:
        idx = node_layers.get(node.name)
        if idx is None or not 0 <= idx < len(kinds) or node.name in inputs:
            continue
        if first_input_alias(node, node_layers):
            continue
        layers = sorted(owned.get(node.name, set()) | {idx})
        rows.append(MappedLayer(node.name, layer_name(idx), [layer_name(i) for i in layers],
                                [kinds[i] for i in layers]))
    return rows


def build_prefix(text: str, source: str) -> tuple[MsnhNetModel, list[str], str | None, str]:
    """``(model of the layers that build, every layer's keyword, refused layer, reason)``."""
    batch, shape, raws = runtime.parse_network(text, source)
    builder = Builder(shape, batch)
    stopped, reason = None, ""
    for i, raw in enumerate(raws):
        try:
            builder.build(raw)
        except ArtifactFormatError as exc:
            stopped, reason = layer_name(i), str(exc)
            break
    kinds = [raw.kind for raw in raws]
    return MsnhNetModel(batch, shape, builder.layers), kinds, stopped, reason


def _attach_prefix(model: MsnhNetModel, weights: np.ndarray) -> tuple[int, str]:
    """Hand out weights to as many layers as the file has floats for; ``(layers, reason)``."""
    offset = 0
    for i, layer in enumerate(model.layers):
        if offset + layer.num_weights > weights.size:
            return i, (f"the weight file ends at float {weights.size}, inside layer {i}'s "
                       "weights")
        layer.blocks = {}
        for name, n in layer.block_sizes:
            layer.blocks[name] = weights[offset:offset + n]
            offset += n
    return len(model.layers), ""


def _run(model: MsnhNetModel, layers: list[Layer], x: np.ndarray) -> list[np.ndarray]:
    prefix = MsnhNetModel(model.batch, model.in_shape, layers)
    chunks = [prefix.run(x[i:i + model.batch], keep_all=True)
              for i in range(0, x.shape[0], model.batch)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(layers))]


def evaluate(model: MsnhNetModel, rows: Sequence[MappedLayer], x: np.ndarray,
             stopped: str | None, reason: str) -> ArtifactValues:
    """Every row's layer output from the built prefix (cut shorter if a layer fails to run)."""
    x = np.asarray(x, dtype=np.float32)
    per_sample = int(np.prod(model.in_shape))
    if x.ndim < 1 or x.shape[0] % model.batch or x.size != x.shape[0] * per_sample:
        raise ArtifactFormatError(f"input of shape {list(x.shape)} does not fit the graph's "
                                  f"input C,H,W {model.in_shape} in batches of {model.batch}")
    x = x.reshape((x.shape[0],) + model.in_shape)
    index = {r.node: int(r.artifact[1:]) for r in rows}
    results: dict[int, list[np.ndarray]] = {}
    errors: dict[int, str] = {}

    def runs(keep: int) -> bool:
        if keep == 0:
            results[0] = []
            return True
        try:
            results[keep] = _run(model, model.layers[:keep], x)
        except Exception as exc:  # numpy kernel failures: run a shorter prefix
            errors[keep] = f"{type(exc).__name__}: {exc}"
            return False
        return True

    total = len(model.layers)
    keep = total if runs(total) else bisect_prefix(total, runs)
    if keep not in results:
        runs(keep)
    if keep < total:
        stopped, reason = layer_name(keep), errors.get(keep + 1, "")
    outs = results.get(keep, [])
    values = {node: outs[i] for node, i in index.items() if i < len(outs)}
    return ArtifactValues(values, stopped, reason)


def layer_profile(graph_file: Path, weights_file: Path, info: Mapping[str, Any],
                  graph: Graph, inputs: Sequence[np.ndarray], tolerance: float,
                  source: str = "verify", reference: dict[str, Any] | None = None,
                  ran: list[np.ndarray] | None = None) -> LayerProfile:
    """The profile of the files on ``inputs``; ``ran``: every layer's output of a whole run
    of exactly these files on this input, when the runner just made one."""
    if len(inputs) != 1:
        raise ArtifactFormatError(f"MsnhNet networks take one input, got {len(inputs)}")
    model, kinds, stopped, reason = build_prefix(runtime.read_graph_text(graph_file),
                                                 graph_file.name)
    built, short = _attach_prefix(model, runtime.read_weights(weights_file))
    if built < len(model.layers):
        model.layers[built:] = []
        stopped, reason = layer_name(built), short
    rows = mapped_layers(graph, info, kinds)
    if reference is None:
        reference = reference_values(graph, inputs)
    if ran is not None and stopped is None and len(ran) == len(model.layers):
        index = {r.node: int(r.artifact[1:]) for r in rows}
        got = ArtifactValues({node: ran[i] for node, i in index.items() if i < len(ran)},
                             None, "")
    else:
        got = evaluate(model, rows, inputs[0], stopped, reason)
    return build_profile("msnhnet", source, graph, rows, reference, got, tolerance,
                         info.get("decomposed") or [])


__all__ = ["build_prefix", "evaluate", "layer_name", "layer_profile", "mapped_layers"]
