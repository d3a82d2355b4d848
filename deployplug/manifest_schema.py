"""Reading ``manifest.json`` as untrusted input: bounded, decoded strictly, and type-checked.

A manifest is the first file verification reads, and it decides which other files are read,
how many reference arrays exist and which shapes they have. So it is refused with a typed
error naming the field (``manifest.json: field 'tolerance' must be a number, got str``) unless
it is a JSON object of the documented shape. Nothing here trusts a value for more than its
type: sizes, names and shapes are checked again by whoever uses them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from deployplug.errors import ArtifactFormatError
from deployplug.exporters import formats as known_formats
from deployplug.limits import MAX_MANIFEST_BYTES, read_bounded

MAX_RANK = 32
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    names: dict[type, str] = {dict: "object", list: "list"}
    return names.get(type(value), type(value).__name__)


class _Fields:
    """Typed access to one JSON object; every failure names the dotted field path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, expected: str, value: Any) -> NoReturn:
        raise ArtifactFormatError(
            f"{self.source}: field '{where}' must be {expected}, got {_type_name(value)}"
        )

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, "an object", value)
        return value

    def lst(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(where, "a list", value)
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            self.fail(where, "a string", value)
        return value

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, "true or false", value)
        return value

    def count(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, "a whole number", value)
        if value < 0:
            raise ArtifactFormatError(f"{self.source}: field '{where}' must be >= 0, "
                                      f"got {value}")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, "a number", value)
        if not math.isfinite(value):
            raise ArtifactFormatError(f"{self.source}: field '{where}' must be finite, "
                                      f"got {value}")
        return float(value)

    def str_map(self, value: Any, where: str, item: Callable[[Any, str], Any]) -> dict[str, Any]:
        return {k: item(v, f"{where}.{k}") for k, v in self.obj(value, where).items()}


def _tensor_specs(f: _Fields, value: Any, where: str) -> list[dict[str, Any]]:
    specs = f.lst(value, where)
    for i, spec in enumerate(specs):
        here = f"{where}[{i}]"
        spec = f.obj(spec, here)
        shape = f.lst(spec.get("shape"), f"{here}.shape")
        if len(shape) > MAX_RANK:
            raise ArtifactFormatError(f"{f.source}: field '{here}.shape' has rank "
                                      f"{len(shape)}, more than {MAX_RANK}")
        for j, dim in enumerate(shape):
            f.count(dim, f"{here}.shape[{j}]")
        f.string(spec.get("dtype"), f"{here}.dtype")
        if "name" in spec:
            f.string(spec["name"], f"{here}.name")
    return specs


def _format_records(f: _Fields, value: Any) -> dict[str, dict[str, Any]]:
    records = f.obj(value, "formats")
    for key, record in records.items():
        here = f"formats.{key}"
        record = f.obj(record, here)
        fmt = f.string(record.get("format"), f"{here}.format")
        if fmt not in known_formats():
            raise ArtifactFormatError(f"{f.source}: field '{here}.format' names the unknown "
                                      f"format {fmt!r}; known: {', '.join(known_formats())}")
        if fmt != key:
            raise ArtifactFormatError(f"{f.source}: field '{here}.format' is {fmt!r}, but the "
                                      f"record is stored under {key!r}")
        f.string(record.get("target"), f"{here}.target")
        files = f.lst(record.get("files"), f"{here}.files")
        if not files:
            raise ArtifactFormatError(f"{f.source}: field '{here}.files' is empty")
        for i, name in enumerate(files):
            f.string(name, f"{here}.files[{i}]")
        if "info" in record:
            f.obj(record["info"], f"{here}.info")
    return records


def _file_entries(f: _Fields, value: Any) -> list[dict[str, Any]]:
    entries = f.lst(value, "files")
    for i, entry in enumerate(entries):
        here = f"files[{i}]"
        entry = f.obj(entry, here)
        f.string(entry.get("name"), f"{here}.name")
        f.count(entry.get("bytes"), f"{here}.bytes")
        digest = f.string(entry.get("sha256"), f"{here}.sha256")
        if not _SHA256.fullmatch(digest):
            raise ArtifactFormatError(f"{f.source}: field '{here}.sha256' must be 64 lowercase "
                                      "hex digits")
    return entries


def _layer_profiles(f: _Fields, value: Any) -> None:
    """The per-layer profiles: typed and bounded (:mod:`deployplug.layer_profile`)."""
    from deployplug.layer_profile import profiles_from_dict

    try:
        profiles_from_dict(value, "verification.layers")
    except (TypeError, ValueError) as exc:
        raise ArtifactFormatError(f"{f.source}: field {exc}") from None


def validate(data: Any, source: str = "manifest.json") -> dict[str, Any]:
    """``data`` when it is a manifest of the documented shape; else a typed error."""
    f = _Fields(source)
    if not isinstance(data, dict):
        raise ArtifactFormatError(f"{source}: must be a JSON object, got {_type_name(data)}")
    for key in ("formats", "inputs", "outputs", "stages", "tolerance"):
        if key not in data:
            raise ArtifactFormatError(f"{source}: required field '{key}' is missing")
    _format_records(f, data["formats"])
    _tensor_specs(f, data["inputs"], "inputs")
    _tensor_specs(f, data["outputs"], "outputs")
    f.str_map(data["stages"], "stages", f.boolean)
    tolerance = f.number(data["tolerance"], "tolerance")
    if tolerance < 0:
        raise ArtifactFormatError(f"{source}: field 'tolerance' must be >= 0, got {tolerance}")
    _file_entries(f, data.get("files", []))
    if data.get("verification") is not None:
        verification = f.obj(data["verification"], "verification")
        if "layers" in verification:
            _layer_profiles(f, verification["layers"])
    f.str_map(data.get("versions", {}), "versions", f.string)
    f.str_map(data.get("failed_formats", {}), "failed_formats", f.string)
    f.string(data.get("created", ""), "created")
    f.obj(data.get("extra", {}), "extra")
    if "passed" in data:
        f.boolean(data["passed"], "passed")
    return data


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def read_manifest_json(path: Path, max_bytes: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    """Read, decode and validate one ``manifest.json`` (at most ``max_bytes``)."""
    name = Path(path).name
    raw = read_bounded(Path(path), name, max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactFormatError(f"{name}: not UTF-8 text (byte {exc.start}); the file is "
                                  "damaged or not a deployplug manifest") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ArtifactFormatError(f"{name}: JSON nested too deeply; not a deployplug "
                                  "manifest") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integer literals
        raise ArtifactFormatError(f"{name}: not valid JSON: {exc}") from None
    return validate(data, name)


__all__ = ["read_manifest_json", "validate"]
