"""The bounded ONNX reader, under the name callers outside the writers know it by.

The reader lives in :mod:`deployplug.onnx_model` so the ONNX writer (which re-reads the file
it wrote) and the onnxruntime runner share it without the writer importing a runtime.
"""

from deployplug.onnx_model import check_model, load_checked, parse_model

__all__ = ["check_model", "load_checked", "parse_model"]
