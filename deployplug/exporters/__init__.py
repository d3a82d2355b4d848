"""Artifact formats by name; each module registers one :class:`~.base.Exporter`."""

from __future__ import annotations

from collections.abc import Iterable

from deployplug.exporters.base import Exporter, FormatRecord
from deployplug.registry import Registry

_EXPORTERS: Registry[Exporter] = Registry(
    {"onnx": "deployplug.exporters.onnx", "caffe": "deployplug.exporters.caffe",
     "msnhnet": "deployplug.exporters.msnhnet", "onnx_int8": "deployplug.exporters.onnx_int8"},
    "unknown format {name}; known formats: {known}")


def register_exporter(exporter: Exporter) -> Exporter:
    return _EXPORTERS.register(exporter.format, exporter)


def get_exporter(fmt: str) -> Exporter:
    return _EXPORTERS.get(fmt)


def formats() -> list[str]:
    return _EXPORTERS.builtin_names()


def statistical_formats(names: Iterable[str]) -> list[str]:
    """The formats among ``names`` judged by decisions on real inputs (int8), not by a
    tolerance: they need calibration and evaluation batches."""
    return [name for name in names if get_exporter(name).statistical]


__all__ = ["Exporter", "FormatRecord", "formats", "get_exporter", "register_exporter",
           "statistical_formats"]
