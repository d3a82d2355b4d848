"""Runners: execute written artifacts in their runtime, one runner per format name.

The writers in :mod:`deployplug.exporters` never import this package; a runner reads only
the files and the :class:`~deployplug.exporters.base.FormatRecord` the writer returned (or
the manifest stored), so the same code checks a fresh export and a directory re-verified
later without the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from deployplug.exporters.base import FormatRecord


class Runner:
    """Runs one format's files; subclasses override :meth:`run_samples`."""

    format: str = ""

    def run(self, out_dir: Path, record: FormatRecord,
            inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Every output of the files for one sample."""
        return self.run_samples(out_dir, record, [inputs])[0]

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        """Every output for every sample; runners load their files once for all of them."""
        raise NotImplementedError(f"the {self.format!r} runner does not implement run_samples")

    def first_divergence(self, out_dir: Path, record: FormatRecord, model: nn.Module,
                         inputs: Sequence[np.ndarray], tolerance: float) -> str | None:
        """Name the first layer whose output departs from PyTorch, when the format can tell."""
        return None


_RUNNERS: dict[str, Runner] = {}
_BUILTIN = {"onnx": "deployplug.runtimes.onnxruntime",
            "onnx_int8": "deployplug.runtimes.onnxruntime",
            "caffe": "deployplug.runtimes.opencv_caffe",
            "msnhnet": "deployplug.runtimes.msnhnet_files"}


def register_runner(runner: Runner) -> Runner:
    """Make ``runner`` the one :func:`get_runner` returns for ``runner.format``."""
    _RUNNERS[runner.format] = runner
    return runner


def get_runner(fmt: str) -> Runner:
    """The runner for format ``fmt`` (its runtime is imported on first use)."""
    if fmt not in _RUNNERS and fmt in _BUILTIN:
        importlib.import_module(_BUILTIN[fmt])
    try:
        return _RUNNERS[fmt]
    except KeyError:
        raise ValueError(f"no runner for format {fmt!r}; runners exist for "
                         f"{', '.join(_BUILTIN)}") from None


__all__ = ["Runner", "get_runner", "register_runner"]
