"""Static QDQ quantization of an fp32 ONNX file with onnxruntime's quantization tools.

The settings are spelled out rather than left to the installed version's defaults, because
they are what the file means: int8 activations (asymmetric, ``MinMax`` ranges from the
calibration batches), int8 weights (symmetric, per tensor or per output channel), QDQ format.
Layers kept in float are named by module path and mapped to the ONNX nodes the TorchScript
exporter emitted in that module's scope; a path that maps to no node is an error, never a
layer silently quantized after all.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deployplug.errors import ExportFailedError
from deployplug.quant.calibration import Batches

FORMAT = "onnx_int8"
#: ONNX op types that carry the weights of a Conv / Linear layer
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SETTINGS = {"format": "QDQ", "activations": "int8 asymmetric (MinMax calibration)",
            "weights": "int8 symmetric", "calibration": "MinMax"}


class _DropAdvice(logging.Filter):
    """Hide the quantizer's advice to pre-process the model: the input here is already folded
    and shape-inferred by the exporter, and pre-processing would rename the nodes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quiet_advice() -> Iterator[None]:
    root = logging.getLogger()
    advice = _DropAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _reader(batches: Batches, input_names: Sequence[str]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds the calibration batches once, in order."""

        def __init__(self) -> None:
            self._feeds = iter([dict(zip(input_names, arrays, strict=True))
                                for arrays in batches.numpy()])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return Reader()


def scope_nodes(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """Module path -> names of the weight-carrying nodes exported in that module's scope."""
    from deployplug.exporters.onnx import scope_to_module_path

    found: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in WEIGHT_OPS and node.name.startswith("/"):
            found.setdefault(scope_to_module_path(node.name), []).append(node.name)
    return found


def nodes_for(proto: onnx.ModelProto, paths: Sequence[str]) -> list[str]:
    """The ONNX node names of the layers at ``paths``; every path must have at least one."""
    by_path = scope_nodes(proto)
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise ExportFailedError(FORMAT, f"layers {missing} were asked to stay in float but "
                                "the fp32 ONNX graph has no Conv/Gemm node in their scope; "
                                f"layers found: {', '.join(sorted(by_path)) or 'none'}")
    return [name for p in paths for name in by_path[p]]


def _supports_cache() -> bool:
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize(fp32_path: Path, out_path: Path, batches: Batches, input_names: Sequence[str], *,
             per_channel: bool, exclude_nodes: Sequence[str] = (),
             cache_path: Path | None = None) -> None:
    """Write the QDQ int8 model of ``fp32_path`` to ``out_path``.

    ``cache_path`` (a file in a scratch directory) keeps the calibrated ranges of this fp32
    file, so trying several repairs of one model calibrates it once, where the installed
    onnxruntime supports that.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ort.disable_telemetry_events()
    options: dict[str, Any] = {}
    if cache_path is not None and _supports_cache():
        options["calibration_cache_path"] = str(cache_path)
    try:
        with _quiet_advice():
            quantize_static(
                str(fp32_path), str(out_path), _reader(batches, input_names),
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=False,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude_nodes) or None,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                **options)
    except Exception as exc:  # onnxruntime raises assorted types for a model it cannot take
        raise ExportFailedError(FORMAT, f"onnxruntime static quantization failed: "
                                f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
                                ) from exc


def node_counts(path: Path) -> dict[str, int]:
    """Op types of the written file and how many nodes of each (recorded in the manifest)."""
    from collections import Counter

    from deployplug.onnx_model import load_checked

    proto = load_checked(path)[0]
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


def float_weight_nodes(path: Path) -> list[str]:
    """Weight-carrying nodes of a QDQ file whose weight is not fed by a DequantizeLinear."""
    from deployplug.onnx_model import load_checked

    proto = load_checked(path)[0]
    dequantized = {o for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   for o in n.output}
    return [n.name for n in proto.graph.node
            if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] not in dequantized]
