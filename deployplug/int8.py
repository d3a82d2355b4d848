"""``int8_report``: the readiness report of a training-form model, the way a user asks for it.

The int8 file itself is a format of :func:`deployplug.export` (``formats="onnx_int8"``,
``calibration=``, ``int8=``); this module is the stand-alone report. It is the entry point
above the pipeline: it makes the same CPU float32 eval copy an export
makes (:func:`deployplug.pipeline.deploy_copy`), fuses it, and hands the fused copy and the
training form to :func:`deployplug.quant.report.build_report`, which the ``onnx_int8`` writer
also calls on the model it is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from deployplug.errors import ConfigError
from deployplug.pipeline import deploy_copy
from deployplug.quant.branches import collect_branches
from deployplug.quant.calibration import DEFAULT_CALIBRATION_SAMPLES, collect_batches
from deployplug.quant.report import (
    DEFAULT_SENSITIVITY_SAMPLES,
    Int8Report,
    build_report,
    check_granularity,
)
from deployplug.reparam import reparameterize


def int8_report(model: nn.Module, calibration: torch.Tensor | Iterable[Any], *,
                weights: str = "per_tensor",
                calibration_samples: int | None = DEFAULT_CALIBRATION_SAMPLES,
                top_k: int = 5, fuse: bool = True,
                source_model: nn.Module | None = None,
                sensitivity_samples: int | None = DEFAULT_SENSITIVITY_SAMPLES) -> Int8Report:
    """How ready ``model`` is for int8, layer by layer, measured on ``calibration`` batches.

    ``model`` is normally the training form: it is copied (CPU, float32, eval; the caller's
    model is never touched), fused with :func:`deployplug.reparameterize`, and every fused
    RepVGG block is split back into its branches to say which one produced an outlier.
    ``fuse=False`` takes ``model`` as the deploy form already; pass its training form as
    ``source_model`` to keep the branch attribution (kept only where the branches add up to
    the fused weights). ``weights`` is the granularity the
    ranking measures (``"per_tensor"``, the strict case, or ``"per_channel"``); both SQNRs are
    reported either way. ``calibration`` is a tensor or an iterable of input batches, cut to
    ``calibration_samples``; the ``top_k`` riskiest layers are marked. Each layer is measured
    once (the int8 model with that layer's weights in float) on the first
    ``sensitivity_samples`` samples, so the cost is about ``layers x sensitivity_samples``
    forward samples plus three passes over the calibration set.
    """
    started = time.perf_counter()
    mode = check_granularity(weights, "weights")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")
    if sensitivity_samples is not None and sensitivity_samples < 1:
        raise ConfigError(f"sensitivity_samples must be >= 1, got {sensitivity_samples}")
    batches = collect_batches(calibration, calibration_samples)
    source: nn.Module | None
    if fuse:
        source = deploy_copy(model)
        fused = reparameterize(source, inplace=False, example_input=batches.first_sample())
    else:
        source = None if source_model is None else deploy_copy(source_model)
        fused = deploy_copy(model)
    branches, unattributed = ({}, {}) if source is None else collect_branches(source, fused)
    return build_report(fused, batches, mode, top_k, branches, unattributed, started,
                        sensitivity_samples)
