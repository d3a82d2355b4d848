"""Reference runtime for MsnhNet ``.msnhnet`` + ``.msnhbin`` files, in numpy.

Why carry our own interpreter: the real C++ runtime needs an AVX2 build tied to the build
host. This interpreter follows the semantics *measured* on that runtime (X/Y conventions,
pooling size formulas, upsample key order, the ``view`` (W, H, C) slots...) and **rejects**
every construct the real runtime miscomputes or crashes on (asymmetric conv parameters,
``pixshf``, grouped ``deconv``, padded ``maxpool``, ``varop tanh``, routes at layer 0...).
So a file this package accepts computes the same thing in MsnhNet, and a file it rejects
fails with an :class:`~deployplug.errors.ArtifactFormatError` that says why.

Layout: :mod:`.parse` reads the text, :mod:`.layer` holds the layer record and typed field
access, :mod:`.builder` shape-checks (and refuses), :mod:`.executor` runs, :mod:`.ops` has
the numpy kernels. This module ties them together: build, attach weights, load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from deployplug.errors import ArtifactFormatError
from deployplug.limits import current, format_bytes, open_regular, read_bounded
from deployplug.runtimes.msnhnet.builder import Builder
from deployplug.runtimes.msnhnet.executor import MsnhNetModel
from deployplug.runtimes.msnhnet.layer import ACTIVATIONS, Fields, Layer, parse_activation
from deployplug.runtimes.msnhnet.parse import parse_text

#: ``.msnhnet`` files are a few hundred bytes per layer; text costs far more to parse than
#: binary weights to read, so the cap is much lower than for ``.msnhbin``
MAX_GRAPH_TEXT_BYTES = 4 << 20


def parse_network(text: str, source: str = "<msnhnet>"
                  ) -> tuple[int, tuple[int, int, int], list[Any]]:
    """``(batch, (channels, height, width), raw layer entries)`` of a ``.msnhnet`` text."""
    entries = parse_text(text, source)
    config, raw_layers = entries[0], entries[1:]
    f = Fields(config, f"{source}: [config]")
    batch = f.int("batch", 1)
    shape = (f.int("channels", 0), f.int("height", 0), f.int("width", 0))
    f.finish()
    if batch < 1 or min(shape) < 1:
        raise ArtifactFormatError(f"{source}: config needs batch, channels, height, width >= 1, "
                                  f"got batch {batch} and C,H,W {shape}")
    return batch, shape, list(raw_layers)


def build(text: str, source: str = "<msnhnet>") -> MsnhNetModel:
    """Parse and shape-check a ``.msnhnet`` text (weights not loaded).

    Declared sizes are checked against the tensor budget of :mod:`deployplug.limits` before
    anything is allocated, so a hostile file fails here with an ``ArtifactFormatError``.
    """
    batch, shape, raw_layers = parse_network(text, source)
    if not raw_layers:
        raise ArtifactFormatError(f"{source}: the network has no layers")
    try:
        builder = Builder(shape, batch)
    except ArtifactFormatError as exc:
        raise ArtifactFormatError(f"{source}: {exc}") from None
    for raw in raw_layers:
        builder.build(raw)
    return MsnhNetModel(batch, shape, builder.layers)


def read_graph_text(path: Path) -> str:
    """The ``.msnhnet`` text: a regular file under the size cap, in UTF-8."""
    path = Path(path)
    data = read_bounded(path, path.name, MAX_GRAPH_TEXT_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactFormatError(f"{path.name}: not UTF-8 text (byte {exc.start})") from None


def read_weights(path: Path, expected: int | None = None) -> np.ndarray:
    """The flat float32 weights of a ``.msnhbin``.

    The size is checked on the open file before anything is read: against ``expected`` (the
    float count the graph needs) when given, and against the tensor budget always.
    """
    path = Path(path)
    fd = open_regular(path, path.name)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if not size:
        raise ArtifactFormatError(f"{path}: the weight file is empty (MsnhNet rejects a 0-byte "
                                  ".msnhbin even for a weight-free graph)")
    if size % 4:
        raise ArtifactFormatError(f"{path}: size {size} bytes is not a multiple of 4")
    if expected is not None and size // 4 != expected:
        relation = "need > given" if expected > size // 4 else "need != given"
        raise ArtifactFormatError(f"{path.name}: the graph needs {expected} floats but the "
                                  f"weight file holds {size // 4} ({relation})")
    budget = current().max_tensor_bytes
    if 2 * size > budget:  # the bytes, and their float32 copy
        raise ArtifactFormatError(f"{path}: {format_bytes(size)} of weights is over the tensor "
                                  f"budget of {format_bytes(budget)}")
    data = read_bounded(path, path.name, size)
    if len(data) != size:
        raise ArtifactFormatError(f"{path}: changed size while it was read")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def attach_weights(model: MsnhNetModel, weights: np.ndarray, source: str = "<msnhbin>") -> None:
    """Hand out the flat float array in layer order; the count must match exactly."""
    need = sum(layer.num_weights for layer in model.layers)
    if need > weights.size:
        raise ArtifactFormatError(f"{source}: the graph needs {need} floats but the weight "
                                  f"file holds {weights.size} (need > given)")
    if need != weights.size:
        raise ArtifactFormatError(f"{source}: the graph needs {need} floats but the weight "
                                  f"file holds {weights.size} (need != given)")
    offset = 0
    for layer in model.layers:
        layer.blocks = {}
        for name, n in layer.block_sizes:
            layer.blocks[name] = weights[offset:offset + n]
            offset += n


def load(msnhnet_path: str | Path, msnhbin_path: str | Path) -> MsnhNetModel:
    """Load a ``.msnhnet`` graph and its ``.msnhbin`` weights."""
    msnhnet_path, msnhbin_path = Path(msnhnet_path), Path(msnhbin_path)
    model = build(read_graph_text(msnhnet_path), str(msnhnet_path.name))
    need = sum(layer.num_weights for layer in model.layers)
    attach_weights(model, read_weights(msnhbin_path, need), str(msnhbin_path.name))
    return model


__all__ = ["ACTIVATIONS", "MAX_GRAPH_TEXT_BYTES", "Layer", "MsnhNetModel", "attach_weights",
           "build", "load", "parse_activation", "parse_network", "read_graph_text",
           "read_weights"]
