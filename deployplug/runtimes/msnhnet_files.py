"""Run MsnhNet files (``model.msnhnet`` + ``model.msnhbin``) in the numpy reference runtime.

The runtime itself (:mod:`deployplug.runtimes.msnhnet`) knows nothing about the writer; this
module is the runner the verification uses: it loads both files through the bounded loader
once for all samples, loops over the batch the files were written for, and maps layers back
to graph nodes for the layer-by-layer comparison.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.capture import capture, evaluate
from deployplug.errors import ArtifactFormatError
from deployplug.exporters.base import FormatRecord
from deployplug.exporters.msnhnet import GRAPH_FILE, WEIGHTS_FILE
from deployplug.runtimes import Runner, register_runner
from deployplug.runtimes import msnhnet as runtime


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
    y = np.concatenate(outs)
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


class MsnhNetRunner(Runner):
    """``model.msnhnet`` + ``model.msnhbin`` in the numpy reference runtime."""

    format = "msnhnet"

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
        graph = record.graph
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


register_runner(MsnhNetRunner())

__all__ = ["MsnhNetRunner", "run_files"]
