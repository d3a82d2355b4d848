"""What an export needs for its ``onnx_int8`` format, gathered and checked before any work.

:func:`deployplug.export` builds one :class:`Int8Job` when ``onnx_int8`` is among the formats:
the calibration and evaluation batches (checked, cut to their counts), the labels, the
trained forward's outputs on the evaluation batches (taken before fusion, so the verdict is
against what was trained) and the training form for branch attribution. Bad calibration data
is refused here, before the destination sees any file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.errors import ConfigError, InputShapeError
from deployplug.quant.calibration import Batches, collect_batches, collect_labels
from deployplug.quant.options import Int8Options

FORMAT = "onnx_int8"


@dataclass
class Int8Job:
    """Checked inputs of one ``onnx_int8`` export."""

    options: Int8Options
    calibration: Batches
    evaluation: Batches
    judged_on: str  # "eval_inputs" or "calibration"
    labels: np.ndarray | None
    references: list[list[np.ndarray]]  # the trained forward on ``evaluation``
    source: nn.Module | None  # the training form (CPU eval copy) for branch attribution

    def writer_options(self, runner: Any, input_names: Sequence[str],
                       output_names: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments of the ``onnx_int8`` writer."""
        o = self.options
        return {"calibration": self.calibration, "calibration_samples": None,
                "int8_weights": o.weights, "int8_repair": o.repair,
                "int8_float_layers": o.float_layers, "int8_max_float": o.max_float,
                "max_drop": o.max_drop, "int8_eval": self.evaluation,
                "int8_eval_labels": self.labels, "int8_eval_samples": None,
                "int8_runner": runner, "source_model": self.source,
                "input_names": list(input_names), "output_names": list(output_names),
                "report_top_k": o.report_top_k,
                "sensitivity_samples": o.sensitivity_samples}


def prepare(calibration: Any, options: Int8Options, example: tuple[torch.Tensor, ...],
            forward: Callable[[tuple[torch.Tensor, ...]], list[np.ndarray]],
            source: nn.Module | None) -> Int8Job:
    """Check the batches against the export's example and take the fp32 references.

    ``forward`` runs the trained forward (numpy outputs, one list per batch).
    """
    if calibration is None:
        raise ConfigError(f"{FORMAT} needs calibration=: real input batches (a tensor or an "
                          "iterable of batches) to set the int8 ranges from; the callback "
                          "takes them from the training dataloader")
    batches = collect_batches(calibration, options.calibration_samples)
    _same_shape(batches, example, "calibration")
    if options.eval_inputs is not None:
        evaluation = collect_batches(options.eval_inputs, options.eval_samples, "eval_inputs")
        _same_shape(evaluation, example, "eval_inputs")
        judged_on = "eval_inputs"
    else:
        if options.eval_labels is not None:
            raise ConfigError("int8 eval_labels without eval_inputs: pass the batches the "
                              "labels belong to")
        evaluation, judged_on = batches, "calibration"
    labels = collect_labels(options.eval_labels, evaluation)
    with torch.no_grad():
        references = [forward(batch) for batch in evaluation]
    return Int8Job(options, batches, evaluation, judged_on, labels, references, source)


def _same_shape(batches: Batches, example: tuple[torch.Tensor, ...], name: str) -> None:
    given = [tuple(t.shape[1:]) for t in example]
    if batches.sample_shapes() != given:
        raise InputShapeError(f"{name} batches have per-sample shapes "
                              f"{batches.sample_shapes()}, the export's example input {given}: "
                              "calibrate and judge on inputs of the exported shape")


__all__ = ["FORMAT", "Int8Job", "prepare"]
