"""ONNX via ``torch.onnx.export``, checked with ``onnx.checker`` and run in onnxruntime.

Both exporters are offered and the choice is always explicit: the TorchScript-based one
(``dynamo=False``) honours the requested opset and is fast; the dynamo one is the future
default but writes opset >= 18 and needs ``onnxscript``. Dynamo output is made single-file
(``external_data=False``), and the ``value_info`` entries it writes for initializers are
dropped because OpenCV 4.x refuses files that carry them.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from deployplug.errors import ArtifactFormatError, ExportFailedError
from deployplug.exporters import register_exporter
from deployplug.exporters.base import Exporter, FormatRecord
from deployplug.profiles import TargetProfile
from deployplug.runtimes.onnx_model import load_checked

ONNX_FILE = "model.onnx"


def io_names(prefix: str, count: int) -> list[str]:
    """``input`` / ``output`` for one tensor, ``input0``, ``input1``... for several."""
    return [prefix] if count == 1 else [f"{prefix}{i}" for i in range(count)]


def strip_initializer_value_info(model: onnx.ModelProto) -> None:
    """Remove ``value_info`` entries that describe initializers (OpenCV 4.x chokes on them)."""
    initializers = {t.name for t in model.graph.initializer}
    keep = [v for v in model.graph.value_info if v.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _count_outputs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> int:
    from deployplug.io_spec import flatten_outputs

    with torch.no_grad():
        return len(flatten_outputs(model(*example_inputs)))


def _first_line(exc: BaseException) -> str:
    """The exporter's message without the TorchScript graph dump it appends."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


class OnnxExporter(Exporter):
    format = "onnx"
    default_target = "onnx"
    accepted_targets = ("onnx",)

    def write(
        self,
        model: nn.Module,
        example_inputs: Sequence[torch.Tensor],
        out_dir: Path,
        target: TargetProfile,
        *,
        dynamo: bool = False,
        opset: int = 17,
        dynamic_batch: bool = False,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        **_: Any,
    ) -> FormatRecord:
        path = out_dir / ONNX_FILE
        inputs = tuple(example_inputs)
        input_names = list(input_names or io_names("input", len(inputs)))
        output_names = list(output_names or io_names("output", _count_outputs(model, inputs)))
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if dynamo:
                    self._export_dynamo(model, inputs, path, opset, dynamic_batch,
                                        input_names, output_names)
                else:
                    axes = {n: {0: "batch"} for n in input_names + output_names}
                    torch.onnx.export(
                        model, inputs, str(path), dynamo=False, opset_version=opset,
                        input_names=input_names, output_names=output_names,
                        dynamic_axes=axes if dynamic_batch else None, do_constant_folding=True,
                    )
            proto = load_checked(path)[0]
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:
            raise ExportFailedError(
                "onnx",
                f"torch.onnx.export (dynamo={dynamo}, opset {opset}) failed: "
                f"{type(exc).__name__}: {_first_line(exc)}. Try the other exporter "
                f"(dynamo={not dynamo}) or another opset.",
            ) from exc
        written_opset = max(
            (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset
        )
        return FormatRecord(
            format="onnx",
            target=target.name,
            files=[ONNX_FILE],
            info={
                "exporter": "dynamo" if dynamo else "torchscript",
                "opset_requested": opset,
                "opset": int(written_opset),
                "dynamic_batch": dynamic_batch,
                "input_names": input_names,
                "output_names": output_names,
                "nodes": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
            },
        )

    @staticmethod
    def _export_dynamo(model, inputs, path, opset, dynamic_batch, input_names, output_names):
        dynamic_shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1)
            dynamic_shapes = tuple({0: batch} for _ in inputs)
        program = torch.onnx.export(
            model, inputs, None, dynamo=True, external_data=False, opset_version=opset,
            input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
        proto = program.model_proto
        strip_initializer_value_info(proto)
        onnx.save_model(proto, str(path), save_as_external_data=False)

    def run(self, out_dir: Path, record: FormatRecord,
            inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.run_samples(out_dir, record, [inputs])[0]

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
        if record.info.get("exporter") != "torchscript":
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
        from deployplug.testing import normalized_error

        for path, value, actual in zip(wanted, values, got, strict=True):
            ref = expected[path]
            if actual.shape != ref.shape or (err := normalized_error(actual, ref)) > tolerance:
                detail = ("shape " + str(list(actual.shape)) + " vs " + str(list(ref.shape))
                          if actual.shape != ref.shape else f"normalized error {err:.3g}")
                return f"layer '{path}' (ONNX value {value}): {detail} > {tolerance:g}"
        return None


def scope_to_module_path(node_name: str) -> str:
    """``/stage1/stage1.0/conv/Conv`` -> ``stage1.0.conv`` (scopes repeat parent prefixes)."""
    path = ""
    for part in node_name.split("/")[1:-1]:
        path = part if (not path or part.startswith(path + ".")) else f"{path}.{part}"
    return path


def module_scope_outputs(proto: onnx.ModelProto) -> dict[str, str]:
    """Module path -> the output of the last ONNX node exported inside that module's scope."""
    outputs: dict[str, str] = {}
    for node in proto.graph.node:
        path = scope_to_module_path(node.name) if node.name.startswith("/") else ""
        if path and node.output:
            outputs[path] = node.output[0]
    return outputs


def leaf_module_outputs(model: nn.Module, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Every leaf module's (single tensor) output, in call order, by module path."""
    outputs: dict[str, np.ndarray] = {}
    handles = []
    for path, module in model.named_modules():
        if path and not any(True for _ in module.children()):
            def hook(_m, _args, out, path=path):
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


def _onnxruntime():
    """onnxruntime, imported lazily (it is heavy), with its telemetry switched off.

    Called before every session deployplug creates, so no session ever starts with telemetry
    on, whatever the process did in between.
    """
    import onnxruntime as ort

    ort.disable_telemetry_events()
    return ort


def _session(ort, model: bytes | str, source: str, threads: int = 0):
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types are not part of its API
        raise ArtifactFormatError(f"{source}: onnxruntime cannot load the model: "
                                  f"{' '.join(str(exc).split())}") from None


def make_session_from_bytes(model_bytes: bytes, source: str = "<in-memory ONNX model>"):
    """A CPU session on a serialized model, checked first (external data is refused)."""
    from deployplug.runtimes.onnx_model import check_model, parse_model

    check_model(parse_model(model_bytes, source), None, source)
    return _session(_onnxruntime(), model_bytes, source)


def make_session(path: Path, threads: int = 0):
    """A CPU onnxruntime session on the file at ``path``, read as untrusted input.

    The file is read once (size-capped, no symlinks), its declared tensor sizes and external
    data are checked (:mod:`deployplug.runtimes.onnx_model`), and the session is built from
    the checked bytes; only a model with (checked) external data is opened by path.
    """
    from deployplug.runtimes.onnx_model import load_checked

    path = Path(path)
    _, data, external = load_checked(path)
    model: bytes | str = str(path) if external else data
    return _session(_onnxruntime(), model, path.name, threads)


register_exporter(OnnxExporter())
