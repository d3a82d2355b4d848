"""Run ONNX files in onnxruntime (CPU), after the bounded reader has checked them.

Every session deployplug creates comes from :func:`make_session` or
:func:`make_session_from_bytes`, so no file reaches onnxruntime unchecked and no session starts
with telemetry on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deployplug.capture import Graph
from deployplug.errors import ArtifactFormatError
from deployplug.exporters.base import FormatRecord
from deployplug.layer_profile import LayerProfile
from deployplug.onnx_model import check_model, load_checked, parse_model
from deployplug.runtimes import Runner, register_runner


def _onnxruntime() -> Any:
    """onnxruntime, imported lazily (it is heavy), with its telemetry switched off.

    Called before every session deployplug creates, so no session ever starts with telemetry
    on, whatever the process did in between.
    """
    import onnxruntime as ort

    ort.disable_telemetry_events()
    return ort


def _session(ort: Any, model: bytes | str, source: str, threads: int = 0) -> Any:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types are not part of its API
        raise ArtifactFormatError(f"{source}: onnxruntime cannot load the model: "
                                  f"{' '.join(str(exc).split())}") from None


def make_session_from_bytes(model_bytes: bytes, source: str = "<in-memory ONNX model>") -> Any:
    """A CPU session on a serialized model, checked first (external data is refused)."""
    check_model(parse_model(model_bytes, source), None, source)
    return _session(_onnxruntime(), model_bytes, source)


def make_session(path: Path, threads: int = 0) -> Any:
    """A CPU onnxruntime session on the file at ``path``, read as untrusted input.

    The file is read once (size-capped, no symlinks), its declared tensor sizes and external
    data are checked (:mod:`deployplug.onnx_model`), and the session is built from the checked
    bytes; only a model with (checked) external data is opened by path.
    """
    path = Path(path)
    _, data, external = load_checked(path)
    model: bytes | str = str(path) if external else data
    return _session(_onnxruntime(), model, path.name, threads)


class OnnxRunner(Runner):
    """The file named first in the record, in one onnxruntime session for all samples."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        session = make_session(Path(out_dir) / record.files[0])
        names = [i.name for i in session.get_inputs()]
        return [list(session.run(None, dict(zip(names, inputs, strict=True))))
                for inputs in samples]

    def layer_profile(self, out_dir: Path, record: FormatRecord, graph: Graph,
                      inputs: Sequence[np.ndarray], tolerance: float, source: str = "verify",
                      reference: dict[str, Any] | None = None) -> LayerProfile | None:
        """Per-layer errors through the value mapping of :mod:`.onnx_layers`.

        Without a mapping stored in the record (``info["layer_values"]``), one is made from
        the file and stored there, so the manifest of a fresh export carries it.
        """
        from deployplug.runtimes import layer_compare, onnx_layers

        if self.format != "onnx":
            return None
        proto, _, external = load_checked(Path(out_dir) / record.files[0])
        if external:
            return LayerProfile(self.format, source, tolerance, note="a model with external "
                                "data is not compared layer by layer")
        if reference is None:
            reference = layer_compare.reference_values(graph, inputs)
        mapping = _stored_mapping(record.info.get("layer_values"), proto)
        known: dict[str, np.ndarray] = {}
        note = ""
        if mapping is None:
            candidates = onnx_layers.candidate_values(proto, graph)
            nbytes = sum(4 * int(np.prod(n.shape or (1,), dtype=np.int64)) for n in graph.nodes)
            known, stopped, error = onnx_layers.run_values(proto, inputs, candidates, nbytes)
            mapping = onnx_layers.map_values(proto, graph, known, reference)
            record.info["layer_values"] = mapping
            record.info["graph_ops"] = layer_compare.graph_ops(graph)
            if source != "export":
                note = ("no mapping was recorded at export; this one was made from the file "
                        "as it is now")
        got = onnx_layers.evaluate_mapping(proto, graph, inputs, mapping, known)
        rows = onnx_layers.mapped_layers(proto, graph, mapping)
        return layer_compare.build_profile(
            self.format, source, graph, rows, reference, got, tolerance,
            record.info.get("decomposed") or [], strict_shapes=True, note=note)


def _stored_mapping(value: Any, proto: onnx.ModelProto) -> dict[str, str] | None:
    """The recorded node -> value mapping, keeping only values the file still has."""
    if not isinstance(value, dict) or not value:
        return None
    names = {out for n in proto.graph.node for out in n.output} | {
        i.name for i in proto.graph.input}
    return {k: v for k, v in value.items()
            if isinstance(k, str) and isinstance(v, str) and v in names}


register_runner(OnnxRunner("onnx"))
register_runner(OnnxRunner("onnx_int8"))

__all__ = ["OnnxRunner", "make_session", "make_session_from_bytes"]
