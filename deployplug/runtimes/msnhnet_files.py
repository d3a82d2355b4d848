"""Run MsnhNet files (``model.msnhnet`` + ``model.msnhbin``) in the numpy reference runtime.

The runtime itself (:mod:`deployplug.runtimes.msnhnet`) knows nothing about the writer; this
module is the runner the verification uses: it loads both files through the bounded loader
once for all samples and loops over the batch the files were written for; the layer-by-layer
comparison is :mod:`deployplug.runtimes.msnhnet_layers`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deployplug.capture import Graph
from deployplug.errors import ArtifactFormatError
from deployplug.exporters.base import FormatRecord
from deployplug.exporters.msnhnet import GRAPH_FILE, WEIGHTS_FILE
from deployplug.layer_profile import LayerProfile
from deployplug.runtimes import Runner, register_runner
from deployplug.runtimes import msnhnet as runtime


def run_files(out_dir: Path, info: dict[str, Any], x: np.ndarray,
              model: runtime.MsnhNetModel | None = None,
              layers: list[np.ndarray] | None = None) -> np.ndarray:
    """Run the written files on ``x``, splitting it into batches of the configured size.

    Both files are read through the bounded reference-runtime loader; a sample or a recorded
    output shape that does not fit the graph is an :class:`ArtifactFormatError`, not a
    reshape error. A ``layers`` list receives every layer's output (the runtime computes
    them anyway), for the per-layer profile.
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
    chunks = [model.run(x[i:i + model.batch], keep_all=True)
              for i in range(0, x.shape[0], model.batch)]
    per_layer = [np.concatenate([c[j] for c in chunks]) for j in range(len(model.layers))]
    if layers is not None:
        layers[:] = per_layer
    y = per_layer[-1]
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

    def __init__(self) -> None:
        # The per-layer outputs of the last run's first sample, keyed by the files and the
        # input: verification runs the example first, and the profile that follows it needs
        # exactly those values, so the numpy runtime does not run the network twice.
        self._memo: tuple[tuple[Any, ...], list[np.ndarray]] | None = None

    def run(self, out_dir: Path, record: FormatRecord,
            inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.run_samples(out_dir, record, [inputs])[0]

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        if any(len(inputs) != 1 for inputs in samples):
            raise ArtifactFormatError("MsnhNet networks take one input, got "
                                      f"{max(len(inputs) for inputs in samples)}")
        model = runtime.load(Path(out_dir) / GRAPH_FILE, Path(out_dir) / WEIGHTS_FILE)
        self._memo = None
        results = []
        for k, inputs in enumerate(samples):
            layers: list[np.ndarray] = []
            results.append([run_files(Path(out_dir), record.info, inputs[0], model,
                                      layers if k == 0 else None)])
            if k == 0:
                self._memo = (_memo_key(Path(out_dir), inputs[0]), layers)
        return results

    def layer_profile(self, out_dir: Path, record: FormatRecord, graph: Graph,
                      inputs: Sequence[np.ndarray], tolerance: float, source: str = "verify",
                      reference: dict[str, Any] | None = None) -> LayerProfile | None:
        """Per-layer errors of every layer holding a node (see :mod:`.msnhnet_layers`)."""
        from deployplug.runtimes import msnhnet_layers

        memo, self._memo = self._memo, None
        ran = None
        if memo is not None and len(inputs) == 1 and memo[0] == _memo_key(Path(out_dir),
                                                                           inputs[0]):
            ran = memo[1]
        return msnhnet_layers.layer_profile(Path(out_dir) / GRAPH_FILE,
                                            Path(out_dir) / WEIGHTS_FILE, record.info, graph,
                                            inputs, tolerance, source, reference, ran)


def _memo_key(out_dir: Path, x: np.ndarray) -> tuple[Any, ...]:
    """Which files (inode, size, mtime) ran on which input (shape, dtype, sha256)."""
    stats = [os.stat(out_dir / name) for name in (GRAPH_FILE, WEIGHTS_FILE)]
    x = np.ascontiguousarray(x)
    return (str(out_dir.resolve()), tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats),
            x.shape, str(x.dtype), hashlib.sha256(x.tobytes()).hexdigest())


register_runner(MsnhNetRunner())

__all__ = ["MsnhNetRunner", "run_files"]
