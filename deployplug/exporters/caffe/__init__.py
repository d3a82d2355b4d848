"""The Caffe format (``model.prototxt`` + ``model.caffemodel``), targets ``caffe`` and ``om``.

``write`` captures the model, checks every node against the target profile (all offenders are
reported at once), lowers the graph to layers, serializes both files in memory -- and for
``om`` checks the prototxt against the Ascend converter's constraints -- and only then touches
the output directory, so a refused model leaves no files behind.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import text_format
from torch import nn

from deployplug.capture import Graph, capture
from deployplug.exporters import register_exporter
from deployplug.exporters.base import Exporter, FormatRecord
from deployplug.exporters.caffe import lower as lowering
from deployplug.exporters.caffe import om_check, writer
from deployplug.exporters.caffe.schema import messages
from deployplug.profiles import TargetProfile, get_target, require_supported

DIALECT_OF_TARGET = {"caffe": "bvlc", "om": "om"}


def _as_tensors(inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(
        x, torch.Tensor) else x for x in inputs)


def capture_for_export(model: nn.Module, example_inputs: Sequence[Any]) -> Graph:
    """Capture a CPU eval-mode copy: the caller's model is never touched."""
    work = copy.deepcopy(model).cpu().eval()
    return capture(work, _as_tensors(example_inputs))


def _blob_shapes(graph: Graph, net: lowering.CaffeNet) -> dict[str, tuple[int, ...]]:
    shapes = {v.name: tuple(v.shape) for v in graph.inputs}
    for node in graph.nodes:
        if node.shape is not None and node.name in net.value_blobs:
            shapes[net.value_blobs[node.name]] = tuple(node.shape)
    return shapes


def _write_atomically(out_dir: Path, files: dict[str, bytes]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".caffe-", dir=out_dir))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        for name in files:
            os.replace(tmp / name, out_dir / name)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()


class CaffeExporter(Exporter):
    format = "caffe"
    default_target = "caffe"
    accepted_targets = ("caffe", "om")

    def write(self, model: nn.Module, example_inputs: Sequence[torch.Tensor], out_dir: Path,
              target: TargetProfile | str, **options: Any) -> FormatRecord:
        target = get_target(target)
        if target.name not in self.accepted_targets:
            raise ValueError(f"the caffe format writes targets {self.accepted_targets}, "
                             f"not {target.name!r}")
        dialect = DIALECT_OF_TARGET[target.name]
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        graph = options.get("graph") or capture_for_export(model, example_inputs)
        require_supported(graph, target)  # every refused node, at once
        net = lowering.lower(graph, dialect, target.name, options.get("name", type(model).__name__))
        if options.get("output_names"):
            net.name_outputs(list(options["output_names"]))
        text = writer.prototxt_text(net)
        if target.name == "om":
            parsed = text_format.Parse(text, messages("om").NetParameter())
            om_check.enforce(parsed, _blob_shapes(graph, net))
        _write_atomically(Path(out_dir), {writer.PROTOTXT: text.encode(),
                                          writer.CAFFEMODEL: writer.caffemodel_bytes(net)})
        return FormatRecord(self.format, target.name, [writer.PROTOTXT, writer.CAFFEMODEL],
                            _info(graph, net), graph=graph)


def _info(graph: Graph, net: lowering.CaffeNet) -> dict[str, Any]:
    out_shapes = {v.name: list(v.shape) for v in graph.output_values}
    info: dict[str, Any] = {
        "dialect": net.dialect,
        "runtime": "opencv-caffe",
        "layers": len(net.layers),
        "layer_types": dict(Counter(layer.type for layer in net.layers)),
        "inputs": [{"name": n, "shape": list(s)} for n, s in net.inputs],
        "outputs": [{"blob": b, "shape": out_shapes.get(o, [])}
                    for o, b in zip(graph.outputs, net.outputs)],
        "value_blobs": net.value_blobs,
        # which graph node each layer computes, and the graph lowered: the per-layer
        # comparison maps blobs back to nodes and refuses a model whose graph differs
        "node_of_layer": {layer.name: layer.node for layer in net.layers if layer.node},
        "graph_ops": [[node.name, node.op] for node in graph.nodes],
        "blobs": sum(len(layer.blobs) for layer in net.layers),
        "parameters": int(sum(b.size for layer in net.layers for b in layer.blobs)),
    }
    if any(layer.type == "ArgMax" for layer in net.layers):
        info["argmax"] = ("OpenCV has no ArgMax: verification runs the net up to ArgMax's input "
                          "and applies np.argmax over the same axis")
    info.update(net.extras)
    return info


register_exporter(CaffeExporter())
