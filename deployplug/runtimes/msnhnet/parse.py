"""Line-by-line reader for ``.msnhnet`` graph files.

Why not a YAML library: the file is one mapping whose top-level keys repeat (``conv:``,
``act:``, ``conv:`` ...). The C++ runtime walks the duplicates in file order; PyYAML and
friends keep only the last one. The subset the format uses is small (top-level keys, one
level of ``field: value`` pairs, ``#`` comments), so it is parsed by hand here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deployplug.errors import ArtifactFormatError
from deployplug.limits import INT32_MAX

#: far more layers than any real network; bounds the bookkeeping a hostile file can demand
MAX_LAYERS = 20_000
#: every layer keyword takes fewer than 30 fields
MAX_FIELDS = 256
#: the largest finite float32: MsnhNet reads every float field as one
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class RawLayer:
    """One top-level entry: its keyword, its fields in file order, and where it was."""

    kind: str
    line: int
    items: list[tuple[str, str]] = field(default_factory=list)
    is_null: bool = True

    @property
    def fields(self) -> dict[str, str]:
        """Fields as a mapping; a key repeated inside one layer keeps its last value."""
        return dict(self.items)


def _strip_comment(text: str) -> str:
    """Drop a YAML comment: ``#`` at the start or after whitespace, outside quotes."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i]
    return text


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_text(text: str, source: str = "<msnhnet>") -> list[RawLayer]:
    """Split ``text`` into top-level entries (``config`` included, first)."""
    entries: list[RawLayer] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise ArtifactFormatError(f"{where}: tab indentation is not valid YAML")
        indented = line[0] == " "
        body = line.strip()
        if body.startswith("- "):
            raise ArtifactFormatError(f"{where}: a YAML list is not a valid layer value")
        if ":" not in body:
            raise ArtifactFormatError(f"{where}: expected 'key: value', got {body!r}")
        key, _, value = body.partition(":")
        key, value = key.strip(), value.strip()
        if not indented:
            if value:
                raise ArtifactFormatError(
                    f"{where}: layer '{key}' must be a map of fields, got the scalar {value!r}"
                )
            if len(entries) > MAX_LAYERS:
                raise ArtifactFormatError(f"{where}: more than {MAX_LAYERS} layers")
            entries.append(RawLayer(kind=key, line=lineno))
            continue
        if not entries:
            raise ArtifactFormatError(f"{where}: indented field before any layer keyword")
        if value.startswith(("[", "{")):
            raise ArtifactFormatError(
                f"{where}: field '{key}' uses a YAML flow collection; MsnhNet expects a "
                "comma-separated string"
            )
        if not value:
            raise ArtifactFormatError(f"{where}: field '{key}' has no value (nesting is not "
                                      "supported)")
        if len(entries[-1].items) >= MAX_FIELDS:
            raise ArtifactFormatError(f"{where}: more than {MAX_FIELDS} fields in one layer")
        entries[-1].items.append((key, _unquote(value)))
        entries[-1].is_null = False
    if not entries or entries[0].kind != "config":
        raise ArtifactFormatError(f"{source}: the first node must be [config]")
    return entries


def as_int(value: str, key: str, where: str) -> int:
    """An int field; ``3.0`` is accepted (the runtime truncates it), ``3.5`` is not.

    The C++ runtime keeps these in 32-bit ints, so anything outside that range (or not
    finite) is refused rather than wrapped.
    """
    try:
        number = float(value)
    except ValueError:
        raise ArtifactFormatError(
            f"{where}: field '{key}' must be an integer, got {value!r}"
        ) from None
    if not math.isfinite(number) or number != int(number):
        raise ArtifactFormatError(f"{where}: field '{key}' must be an integer, got {value!r}")
    if not -INT32_MAX - 1 <= number <= INT32_MAX:
        raise ArtifactFormatError(f"{where}: field '{key}' = {value} does not fit the 32-bit "
                                  "integer MsnhNet stores it in")
    return int(number)


def as_float(value: str, key: str, where: str) -> float:
    """A float field, which must be a finite float32 (inf and nan are refused)."""
    try:
        number = float(value)
    except ValueError:
        raise ArtifactFormatError(
            f"{where}: field '{key}' must be a number, got {value!r}"
        ) from None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise ArtifactFormatError(f"{where}: field '{key}' must be a finite float32, got "
                                  f"{value!r}")
    return number


def as_int_list(value: str, key: str, where: str) -> list[int]:
    """Comma-separated integers such as ``"3, -1"``."""
    parts = [p.strip() for p in value.split(",")]
    if not parts or any(not p for p in parts):
        raise ArtifactFormatError(f"{where}: field '{key}' must list integers, got {value!r}")
    return [as_int(p, key, where) for p in parts]
