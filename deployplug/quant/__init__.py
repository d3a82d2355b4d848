"""INT8 that survives reparameterization: readiness report, verified INT8 ONNX, repairs.

* the readiness report (:mod:`.report`; :func:`deployplug.int8_report` is its entry point):
  every fused layer's int8 risk, measured, ranked, and traced back to the training-time branch
  behind an outlier (:mod:`.branches`);
* the ``onnx_int8`` file (:mod:`.build`, written by ``deployplug.exporters.onnx_int8`` for
  :func:`deployplug.export`), judged statistically (:mod:`.verdict`) with the settings of
  :class:`Int8Options` (:mod:`.options`);
* :func:`equalize` (:mod:`.equalization`): exact cross-layer equalization of conv -> ReLU ->
  conv; the repairs and the order ``int8_repair="auto"`` tries them in (:mod:`.repair`).

This package sits beside the writers (it writes the fp32 file it quantizes with the ONNX
writer) and never imports the pipeline, verification or runtimes: whoever runs files passes a
runner in. Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Int8Options": "deployplug.quant.options",
    "Int8Report": "deployplug.quant.report",
    "LayerRisk": "deployplug.quant.report",
    "equalize": "deployplug.quant.equalization",
    "EqualizationRecord": "deployplug.quant.equalization",
    "judge": "deployplug.quant.verdict",
    "Int8Judgement": "deployplug.quant.verdict",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'deployplug.quant' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
