"""Artifact formats by name; each module registers one :class:`~.base.Exporter`."""

from __future__ import annotations

import importlib

from deployplug.exporters.base import Exporter, FormatRecord

_EXPORTERS: dict[str, Exporter] = {}
_BUILTIN = {"onnx": "deployplug.exporters.onnx", "caffe": "deployplug.exporters.caffe",
            "msnhnet": "deployplug.exporters.msnhnet",
            "onnx_int8": "deployplug.exporters.onnx_int8"}


def register_exporter(exporter: Exporter) -> Exporter:
    _EXPORTERS[exporter.format] = exporter
    return exporter


def get_exporter(fmt: str) -> Exporter:
    if fmt not in _EXPORTERS and fmt in _BUILTIN:
        importlib.import_module(_BUILTIN[fmt])
    try:
        return _EXPORTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(_BUILTIN)}") from None


def formats() -> list[str]:
    return list(_BUILTIN)


__all__ = ["Exporter", "FormatRecord", "formats", "get_exporter", "register_exporter"]
