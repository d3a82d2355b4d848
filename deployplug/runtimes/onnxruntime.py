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
import torch
from torch import nn

from deployplug.errors import ArtifactFormatError
from deployplug.exporters.base import FormatRecord
from deployplug.exporters.onnx import module_scope_outputs
from deployplug.numerics import normalized_error
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


def leaf_module_outputs(model: nn.Module, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every leaf module's (single tensor) output, in call order, by module path."""
    outputs: dict[str, np.ndarray] = {}
    handles = []
    for path, module in model.named_modules():
        if path and not any(True for _ in module.children()):
            def hook(_m: nn.Module, _args: Any, out: Any, path: str = path) -> None:
                if isinstance(out, torch.Tensor):
                    outputs.setdefault(path, out.detach().cpu().numpy())
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
    finally:
        for handle in handles:
            handle.remove()
    return outputs


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

    def first_divergence(self, out_dir: Path, record: FormatRecord, model: nn.Module,
                         inputs: Sequence[np.ndarray], tolerance: float) -> str | None:
        """Compare every leaf module's output with the ONNX value its scope produced.

        The TorchScript exporter names nodes after the module scope they came from
        (``/stage1/stage1.0/conv/Conv``), which maps ONNX values back to module paths. The
        dynamo exporter names nodes differently, so its files are not compared layer by layer.
        """
        if self.format != "onnx" or record.info.get("exporter") != "torchscript":
            return None
        proto = load_checked(Path(out_dir) / record.files[0])[0]
        scope_values = module_scope_outputs(proto)
        expected = leaf_module_outputs(model, inputs)
        wanted = [path for path in expected if path in scope_values]
        if not wanted:
            return None
        known = {o.name for o in proto.graph.output}
        for path in wanted:
            if scope_values[path] not in known:
                proto.graph.output.append(onnx.ValueInfoProto(name=scope_values[path]))
                known.add(scope_values[path])
        session = make_session_from_bytes(proto.SerializeToString())
        names = [i.name for i in session.get_inputs()]
        values = [scope_values[p] for p in wanted]
        got = session.run(values, dict(zip(names, inputs, strict=True)))
        for path, value, actual in zip(wanted, values, got, strict=True):
            ref = expected[path]
            if actual.shape != ref.shape or (err := normalized_error(actual, ref)) > tolerance:
                detail = ("shape " + str(list(actual.shape)) + " vs " + str(list(ref.shape))
                          if actual.shape != ref.shape else f"normalized error {err:.3g}")
                return f"layer '{path}' (ONNX value {value}): {detail} > {tolerance:g}"
        return None


register_runner(OnnxRunner("onnx"))
register_runner(OnnxRunner("onnx_int8"))

__all__ = ["OnnxRunner", "leaf_module_outputs", "make_session", "make_session_from_bytes"]
