"""Caffe blobs against PyTorch, node by node, in OpenCV.

The writer names every blob and the layer producing it after the graph node it holds, and
records both maps (``info["value_blobs"]``: node -> blob; ``info["node_of_layer"]``: layer ->
node, helper layers included), so a node's row names the blob, the layers that compute it (a
floor-mode pooling is ``Pooling`` + ``Slice``; a split's outputs are the tops of one ``Slice``)
and their types. Nodes that share their input's blob (a reshape that changes nothing, a pad
folded into the convolution reading it) have no row.

OpenCV keeps a blob it is asked for unfused, so a convolution's output is read before the
ReLU it would otherwise absorb. A net OpenCV cannot load or run as a whole (an Eltwise seeing
two shapes after a changed padding) is cut after the longest prefix of layers that runs, so
every blob before the failing layer is still compared and that layer is named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deployplug.capture import Graph
from deployplug.errors import ArtifactFormatError
from deployplug.layer_profile import LayerProfile
from deployplug.limits import current
from deployplug.runtimes.layer_compare import (
    ArtifactValues,
    MappedLayer,
    bisect_prefix,
    build_profile,
    first_input_alias,
    reference_values,
)
from deployplug.runtimes.opencv_caffe import forward, prepare_parsed, read_checked


def _str_map(value: Any, field: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise ArtifactFormatError(f"caffe record: info.{field} must map names to names")
    return value


def _input_names(info: Mapping[str, Any]) -> list[str]:
    entries = info.get("inputs")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise ArtifactFormatError("caffe record: info.inputs must list objects with a 'name'")
    return [e["name"] for e in entries]


def mapped_layers(net: Any, graph: Graph, info: Mapping[str, Any]) -> list[MappedLayer]:
    """A row for every node held in a blob of its own, with the layers that compute it."""
    blob_of = _str_map(info.get("value_blobs"), "value_blobs")
    node_of = _str_map(info.get("node_of_layer", {}), "node_of_layer")
    inputs = set(_input_names(info))
    kind = {layer.name: layer.type for layer in net.layer}
    order = [layer.name for layer in net.layer]
    producer: dict[str, str] = {}
    for layer in net.layer:
        for top in layer.top:
            producer[top] = layer.name
    owned: dict[str, list[str]] = {}
    for name in order:
        if name in node_of:
            owned.setdefault(node_of[name], []).append(name)
    rows = []
    for node in graph.nodes:
        blob = blob_of.get(node.name)
        if blob is None or blob in inputs or blob not in producer:
            continue
        if first_input_alias(node, blob_of):
            continue
        names = set(owned.get(node.name, [])) | {producer[blob]}
        layers = [n for n in order if n in names]
        rows.append(MappedLayer(node.name, blob, layers, [kind[n] for n in layers]))
    return rows


def _copy(message: Any) -> Any:
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


def evaluate(net: Any, weights: Any, weight_bytes: int, source: str, info: Mapping[str, Any],
             inputs: Sequence[np.ndarray], rows: Sequence[MappedLayer]) -> ArtifactValues:
    """The rows' blobs from OpenCV, from the longest prefix of layers that runs."""
    names = _input_names(info)
    upsample = info.get("upsample_channels")
    position = {}
    for i, layer in enumerate(net.layer):
        for top in layer.top:
            position[top] = i
    results: dict[int, dict[str, np.ndarray]] = {}
    errors: dict[int, str] = {}
    pristine = _copy(net)
    # only om Upsample layers add to the weights (see prepare_parsed); others leave them be
    changes_weights = any(layer.type == "Upsample" for layer in net.layer)

    def runs(keep: int) -> bool:
        wanted = [r for r in rows if position.get(r.artifact, len(net.layer)) < keep]
        if not wanted:
            results[keep] = {}
            return True
        cut = _copy(pristine)
        del cut.layer[keep:]
        blobs = list(dict.fromkeys(r.artifact for r in wanted))
        given = _copy(weights) if changes_weights else weights
        try:
            prepared = prepare_parsed(cut, given, weight_bytes, source, upsample, blobs)
            values = dict(zip(blobs, forward(prepared, names, inputs, blobs)))
        except Exception as exc:  # OpenCV's own errors are not typed; cut the net shorter
            errors[keep] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            return False
        results[keep] = {r.node: values[r.artifact] for r in wanted}
        return True

    total = len(net.layer)
    if runs(total):
        return ArtifactValues(results[total])
    keep = bisect_prefix(total, runs)
    if keep not in results:
        runs(keep)
    stopped = net.layer[keep].name if keep < total else None
    return ArtifactValues(results.get(keep, {}), stopped,
                          errors.get(keep + 1) or errors.get(total, ""))


def layer_profile(prototxt: Path, caffemodel: Path, info: Mapping[str, Any], graph: Graph,
                  inputs: Sequence[np.ndarray], tolerance: float, source: str = "verify",
                  reference: dict[str, Any] | None = None) -> LayerProfile:
    dialect = info.get("dialect", "bvlc")
    if dialect not in ("bvlc", "om"):
        raise ArtifactFormatError(f"caffe record: unknown dialect {dialect!r}")
    net, weights, weight_bytes = read_checked(prototxt, caffemodel, dialect)
    rows = mapped_layers(net, graph, info)
    sizes = {n.name: n.shape for n in graph.nodes}
    current().check_total(sum(4 * int(np.prod(sizes.get(r.node) or (1,), dtype=np.int64))
                              for r in rows), "the per-layer comparison (OpenCV blobs)")
    if reference is None:
        reference = reference_values(graph, inputs)
    got = evaluate(net, weights, weight_bytes, f"{prototxt.name} + {caffemodel.name}", info,
                   inputs, rows)
    return build_profile("caffe", source, graph, rows, reference, got, tolerance,
                         info.get("decomposed") or [])


__all__ = ["evaluate", "layer_profile", "mapped_layers"]
