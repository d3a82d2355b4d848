"""The pre-flight and export steps the callback and the command line share.

``deployplug export`` promises to write what the callback would have written from the same
checkpoint, and ``deployplug check`` to report what the callback's pre-flight would. Both hold
only if the two call the same code with the same settings, so that code lives here: the
settings a :class:`~deployplug.callback.DeployCallback` carries (:class:`DeploySettings`),
the pre-flight over every format, and the export of a resolved subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from deployplug.examples import Example
from deployplug.export_subject import ExportSubject


@dataclass
class DeploySettings:
    """What is exported and how: the DeployCallback arguments an export depends on."""

    formats: tuple[str, ...] = ("onnx",)
    target: str | None = None
    input_shape: tuple[int, ...] | None = None
    tolerance: float = 1e-5
    opset: int = 17
    onnx_dynamo: bool = False
    dynamic_batch: bool = False
    verify: bool = True
    validation_parity: bool = False
    parity_batches: int | None = None
    module_attr: str | None = None
    accept_submodule_mismatch: bool = False
    reparameterize: bool = True
    validation_samples: int = 2
    #: ``Int8Options`` fields for the ``onnx_int8`` format (its batches come from the run)
    int8: dict[str, Any] | None = None

    @classmethod
    def from_object(cls, source: Any, overrides: Mapping[str, Any] | None = None
                    ) -> DeploySettings:
        """Settings read from ``source`` (a DeployCallback); non-None ``overrides`` win."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = (overrides or {}).get(f.name)
            values[f.name] = value if value is not None else getattr(source, f.name, f.default)
        formats = values["formats"]
        values["formats"] = (formats,) if isinstance(formats, str) else tuple(formats)
        shape = values["input_shape"]
        values["input_shape"] = None if shape is None else tuple(int(d) for d in shape)
        return cls(**values)

    def onnx_options(self) -> dict[str, Any]:
        # A dynamic batch lets onnxruntime take whole validation batches for parity.
        return {"dynamo": self.onnx_dynamo, "opset": self.opset,
                "dynamic_batch": bool(self.dynamic_batch or self.validation_parity)}


def target_for(fmt: str, target: str | None) -> str:
    """The target profile checked for ``fmt``: ``target`` when that format takes it."""
    from deployplug.pipeline import resolve_target

    return resolve_target(fmt, target).name


def preflight_reports(network: nn.Module, example: Example, formats: Sequence[str],
                      target: str | None, reparameterize: bool = True,
                      onnx_options: dict[str, Any] | None = None) -> list[tuple[str, str, Any]]:
    """``(format, target, CompatReport)`` for every requested format, without keeping files.

    :func:`deployplug.check` runs the export's own steps (fusion when ``reparameterize``,
    decomposition, the format's writer) on copies, so a passing report means the export
    would write the files.
    """
    from deployplug.preflight import check

    return [(fmt, target_for(fmt, target),
             check(network, example, target_for(fmt, target), reparameterize=reparameterize,
                   onnx_options=onnx_options if fmt == "onnx" else None))
            for fmt in formats]


def export_subject(subject: ExportSubject, example: Example, real: Sequence[Example],
                   out_dir: Path, settings: DeploySettings, metadata: dict[str, Any],
                   int8_data: Any = None) -> Any:
    """Export and verify ``subject`` with ``settings`` into ``out_dir``; the Manifest.

    ``int8_data`` (:class:`deployplug.int8_data.Int8Data`) holds the run's calibration and
    evaluation batches when ``onnx_int8`` is among the formats.

    Raises like :func:`deployplug.pipeline.export` with ``strict=True``: the error carries
    what landed (``manifest``) and where the failed files are (``failed_dir``).
    """
    from deployplug import pipeline

    int8: dict[str, Any] = {}
    if int8_data is not None:
        int8 = {"calibration": int8_data.calibration,
                "int8": int8_data.options(settings.int8)}
    return pipeline.export(
        subject.model, example, out_dir, formats=settings.formats, target=settings.target,
        reparameterize=settings.reparameterize, verify=settings.verify,
        tolerance=settings.tolerance, onnx_options=settings.onnx_options(),
        extra_inputs=list(real), strict=True, metadata={**metadata, **subject.metadata()},
        reference_model=subject.reference, **int8)
