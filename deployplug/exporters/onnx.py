"""ONNX via ``torch.onnx.export``, checked with ``onnx.checker``.

The files are run by :mod:`deployplug.runtimes.onnxruntime`; this module only writes them.

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

import onnx
import torch
from torch import nn

from deployplug.errors import ExportFailedError
from deployplug.exporters import register_exporter
from deployplug.exporters.base import Exporter, FormatRecord
from deployplug.onnx_model import load_checked
from deployplug.profiles import TargetProfile

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


register_exporter(OnnxExporter())
