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

from pathlib import Path

import numpy as np

from deployplug.errors import ArtifactFormatError
from deployplug.runtimes.msnhnet.builder import Builder
from deployplug.runtimes.msnhnet.executor import MsnhNetModel
from deployplug.runtimes.msnhnet.layer import ACTIVATIONS, Fields, Layer, parse_activation
from deployplug.runtimes.msnhnet.parse import parse_text


def build(text: str, source: str = "<msnhnet>") -> MsnhNetModel:
    """Parse and shape-check a ``.msnhnet`` text (weights not loaded)."""
    entries = parse_text(text, source)
    config, raw_layers = entries[0], entries[1:]
    f = Fields(config, f"{source}: [config]")
    batch = f.int("batch", 1)
    shape = (f.int("channels", 0), f.int("height", 0), f.int("width", 0))
    f.finish()
    if batch < 1 or min(shape) < 1:
        raise ArtifactFormatError(f"{source}: config needs batch, channels, height, width >= 1, "
                                  f"got batch {batch} and C,H,W {shape}")
    if not raw_layers:
        raise ArtifactFormatError(f"{source}: the network has no layers")
    builder = Builder(shape)  # type: ignore[arg-type]
    for raw in raw_layers:
        builder.build(raw)
    return MsnhNetModel(batch, shape, builder.layers)  # type: ignore[arg-type]


def read_weights(path: Path) -> np.ndarray:
    data = Path(path).read_bytes()
    if not data:
        raise ArtifactFormatError(f"{path}: the weight file is empty (MsnhNet rejects a 0-byte "
                                  ".msnhbin even for a weight-free graph)")
    if len(data) % 4:
        raise ArtifactFormatError(f"{path}: size {len(data)} bytes is not a multiple of 4")
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
    model = build(msnhnet_path.read_text(), str(msnhnet_path.name))
    attach_weights(model, read_weights(msnhbin_path), str(msnhbin_path.name))
    return model


__all__ = ["ACTIVATIONS", "Layer", "MsnhNetModel", "attach_weights", "build", "load",
           "parse_activation", "read_weights"]
