"""``onnx_int8``: a static QDQ int8 ONNX file, repaired if asked, judged statistically.

``write`` needs real input batches (``calibration=``): it exports the fused model to an fp32
ONNX graph with a free batch dimension in a scratch directory, quantizes it with onnxruntime's
quantization tools (:mod:`deployplug.quant.ort_quant`), applies the requested repair
(``int8_repair``: none, equalize, keep_float, equalize+keep_float, auto) and writes
``model_int8.onnx`` and the readiness report ``int8_report.json``. ``auto`` judges each
candidate by running it, so it needs the runner passed in (``int8_runner=``, the ``onnx_int8``
runner of :mod:`deployplug.runtimes`); the writer itself imports no runtime.

An int8 file is never within 1e-5 of fp32, so its verdict comes from
:meth:`OnnxInt8Exporter.judge` (top-1 agreement, accuracy drop with labels) on many real
inputs, not from the normalized tolerance the exact formats use; ``statistical = True`` tells
verification so.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from deployplug.errors import ConfigError, InputShapeError
from deployplug.exporters import register_exporter
from deployplug.exporters.base import Exporter, FormatRecord
from deployplug.profiles import TargetProfile

INT8_FILE = "model_int8.onnx"
REPORT_FILE = "int8_report.json"


class OnnxInt8Exporter(Exporter):
    format = "onnx_int8"
    default_target = "onnx"
    accepted_targets = ("onnx",)
    #: verified by :meth:`judge` on real inputs, not by a normalized tolerance
    statistical: ClassVar[bool] = True

    def write(
        self,
        model: nn.Module,
        example_inputs: Sequence[torch.Tensor],
        out_dir: Path,
        target: TargetProfile,
        *,
        calibration: torch.Tensor | Iterable[Any] | None = None,
        calibration_samples: int | None = 256,
        int8_weights: str = "per_channel",
        int8_repair: str = "none",
        int8_float_layers: int | Sequence[str] | None = None,
        int8_max_float: int = 8,
        max_drop: float = 0.01,
        int8_eval: torch.Tensor | Iterable[Any] | None = None,
        int8_eval_labels: Any = None,
        int8_eval_samples: int | None = 1024,
        int8_runner: Any = None,
        source_model: nn.Module | None = None,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        report_top_k: int = 5,
        sensitivity_samples: int | None = 128,
        **_: Any,
    ) -> FormatRecord:
        """Write ``model_int8.onnx`` and ``int8_report.json``; see the module docstring.

        ``int8_eval`` (+ ``int8_eval_labels``) are the batches ``auto`` judges candidates on,
        with ``int8_runner``; without them the calibration batches are used, which the record
        says (``judged_on``). ``source_model`` is the training form, for branch attribution.
        """
        from deployplug.quant.build import Builder, BuildSettings, build_info, build_int8
        from deployplug.quant.calibration import collect_batches, collect_labels
        from deployplug.quant.repair import plans
        from deployplug.quant.report import check_granularity
        from deployplug.quant.simulate import quantizable_layers

        if calibration is None:
            raise ConfigError("onnx_int8 needs calibration=: real input batches (a tensor or "
                              "a list of batches) to set the int8 ranges from")
        weights = check_granularity(int8_weights)
        batches = collect_batches(calibration, calibration_samples)
        _check_example(example_inputs, batches.sample_shapes())
        if int8_eval is not None:
            evaluation = collect_batches(int8_eval, int8_eval_samples, "int8_eval")
            judged_on = "int8_eval"
        else:
            if int8_eval_labels is not None:
                raise ConfigError("int8_eval_labels without int8_eval: pass the batches the "
                                  "labels belong to")
            evaluation, judged_on = batches, "calibration"
        labels = collect_labels(int8_eval_labels, evaluation)
        work = copy.deepcopy(model).cpu().float().eval()
        candidates = plans(int8_repair, int8_float_layers, int8_max_float,
                           len(quantizable_layers(work)))
        if len(candidates) > 1 and int8_runner is None:
            raise ConfigError("int8_repair='auto' picks a repair by running each candidate: "
                              "pass int8_runner=deployplug.runtimes.get_runner('onnx_int8') "
                              "(dp.export does), or name the repair")
        settings = BuildSettings(weights, max_drop, report_top_k, sensitivity_samples,
                                 list(input_names) if input_names else None,
                                 list(output_names) if output_names else None)
        source = None if source_model is None else copy.deepcopy(source_model).cpu().float()
        with tempfile.TemporaryDirectory(prefix="deployplug-int8-") as scratch:
            builder = Builder(work, batches, evaluation, labels, settings, Path(scratch),
                              source.eval() if source is not None else None, int8_runner)
            build = build_int8(builder, candidates, Path(out_dir) / INT8_FILE)
        info = build_info(build, int8_repair, batches, judged_on, max_drop)
        (Path(out_dir) / REPORT_FILE).write_text(json.dumps(
            {"reports": build.report_dict(), "repair": {k: info[k] for k in (
                "repair_requested", "repair", "float_layers", "equalization", "tried")}},
            indent=2) + "\n")
        from deployplug.quant.ort_quant import node_counts

        info["output_names"] = list(output_names) if output_names else None
        info["nodes"] = node_counts(Path(out_dir) / INT8_FILE)
        return FormatRecord(format=self.format, target=target.name,
                            files=[INT8_FILE, REPORT_FILE], info=info)

    def judge(self, outputs: Sequence[Sequence[np.ndarray]],
              references: Sequence[Sequence[np.ndarray]], labels: Any = None,
              max_drop: float = 0.01) -> tuple[bool, dict[str, Any]]:
        """PASSED when the accuracy drop (labels) or the changed-decision share is within
        ``max_drop``; the metrics name agreement, accuracies and the worst normalized error."""
        from deployplug.quant.verdict import judge

        verdict = judge(outputs, references, labels, max_drop)
        return verdict.passed, verdict.to_dict()


def _check_example(example_inputs: Sequence[torch.Tensor],
                   shapes: list[tuple[int, ...]]) -> None:
    given = [tuple(t.shape[1:]) for t in example_inputs]
    if given and given != shapes:
        raise InputShapeError(f"calibration batches have per-sample shapes {shapes}, the "
                              f"export's example input {given}: calibrate on inputs of the "
                              "exported shape")


register_exporter(OnnxInt8Exporter())
