"""Runners: execute written artifacts in their runtime, one runner per format name.

The writers in :mod:`deployplug.exporters` never import this package; a runner reads only
the files and the :class:`~deployplug.exporters.base.FormatRecord` the writer returned (or
the manifest stored), so the same code checks a fresh export and a directory re-verified
later without the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deployplug.exporters.base import FormatRecord
from deployplug.registry import Registry

if TYPE_CHECKING:
    from deployplug.capture import Graph
    from deployplug.layer_profile import LayerProfile


class Runner:
    """Runs one format's files; subclasses override :meth:`run_samples`."""

    format: str = ""

    def run(self, out_dir: Path, record: FormatRecord,
            inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Every output of the files for one sample."""
        return self.run_samples(out_dir, record, [inputs])[0]

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        """Every output for every sample; runners load their files once for all of them."""
        raise NotImplementedError(f"the {self.format!r} runner does not implement run_samples")

    def layer_profile(self, out_dir: Path, record: FormatRecord, graph: Graph,
                      inputs: Sequence[np.ndarray], tolerance: float, source: str = "verify",
                      reference: dict[str, Any] | None = None) -> LayerProfile | None:
        """Every mapped layer's error against ``graph`` (the graph the files were written from).

        ``inputs`` is one sample; ``reference`` (PyTorch's value of every node of ``graph`` on
        it, from :func:`~deployplug.runtimes.layer_compare.reference_values`) is computed when
        not given. ``None`` when the format has no layer-by-layer comparison.
        """
        return None

    def first_divergence(self, out_dir: Path, record: FormatRecord, model: nn.Module,
                         inputs: Sequence[np.ndarray], tolerance: float) -> str | None:
        """Name the first layer whose output departs from PyTorch, when the format can tell.

        ``model`` must be the module the files were written from (fused, decomposed): its
        captured graph is compared with the one recorded at export, and a different graph
        (say, the model before fusion) gives ``None`` rather than blame on the wrong layer.
        """
        import copy

        from deployplug.capture import capture
        from deployplug.runtimes.layer_compare import graph_mismatch

        graph = record.graph
        if graph is None:
            tensors = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs)
            with torch.no_grad():
                graph = capture(copy.deepcopy(model).cpu().eval(), tensors)
            if graph_mismatch(graph, record.info.get("graph_ops")) is not None:
                return None
        profile = self.layer_profile(out_dir, record, graph, inputs, tolerance)
        return None if profile is None else profile.describe_culprit()


_RUNNERS: Registry[Runner] = Registry(
    {"onnx": "deployplug.runtimes.onnxruntime", "onnx_int8": "deployplug.runtimes.onnxruntime",
     "caffe": "deployplug.runtimes.opencv_caffe", "msnhnet": "deployplug.runtimes.msnhnet_files"},
    "no runner for format {name}; runners exist for {known}")


def register_runner(runner: Runner) -> Runner:
    """Make ``runner`` the one :func:`get_runner` returns for ``runner.format``."""
    return _RUNNERS.register(runner.format, runner)


def get_runner(fmt: str) -> Runner:
    """The runner for format ``fmt`` (its runtime is imported on first use)."""
    return _RUNNERS.get(fmt)


__all__ = ["Runner", "get_runner", "register_runner"]
