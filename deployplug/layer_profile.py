"""The per-layer error profile of one artifact, as data: rows, the culprit, text and Markdown.

A profile says, for every graph node whose output the artifact holds in a value of its own
(an ONNX value, a Caffe blob, a MsnhNet layer), how far that value is from PyTorch's on one
input, in graph order. It is computed at export time on the example input (and stored in the
manifest with the verification report) and again by ``dp.verify(dir, model=...)``.

The **culprit** is the first row, in graph order, whose output disagrees with PyTorch (error
above the tolerance, a different shape, or a layer the runtime refused) while every row it
reads agrees: the first place the artifact computes something else from the same inputs.
Everything after it inherits the difference and is not blamed.

This module is plain data below the verification report, so the report, the manifest and the
report writer all read the same thing; a profile read back from a manifest is untrusted input
and is refused (``TypeError`` / ``ValueError``) unless it has the documented shape and sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: how a row compares with PyTorch
OK, ABOVE, SHAPE, FAILED, MISSING = "ok", "above", "shape", "failed", "missing"
STATUSES = (OK, ABOVE, SHAPE, FAILED, MISSING)
#: read-back bounds: more rows than any real network has, names no real module path reaches
MAX_ROWS = 200_000
MAX_TEXT = 4096
MAX_ITEMS = 4096
MAX_RANK = 32


@dataclass
class LayerRow:
    """One graph node and the artifact value that holds its output."""

    node: str  # normalized graph node name
    op: str  # ATen op (conv2d, cat, getitem ...)
    module: str  # PyTorch module path; "" for the model's own forward
    artifact: str  # the ONNX value / Caffe blob / MsnhNet layer holding the output
    layers: list[str]  # artifact layers (ONNX nodes, Caffe layers, MsnhNet "#i") computing it
    kinds: list[str]  # their types, in the same order
    shape: list[int]  # PyTorch's output shape
    status: str = MISSING
    error: float | None = None  # normalized error; None when not comparable
    artifact_shape: list[int] | None = None  # when it differs from ``shape``
    rule: str = ""  # decomposition rule(s) whose replacement produced the node
    inputs: list[str] = field(default_factory=list)  # nearest mapped rows it reads
    note: str = ""

    @property
    def agrees(self) -> bool:
        return self.status == OK

    @property
    def lowering(self) -> str:
        """``Pooling+Slice``: the artifact layer types that compute the node."""
        return "+".join(dict.fromkeys(self.kinds))

    @property
    def produced_by(self) -> str:
        """The decomposition rule and the lowering, for tables and messages."""
        parts = [f"rule {self.rule}"] if self.rule else []
        if self.lowering:
            parts.append(self.lowering)
        return "; ".join(parts)

    def error_text(self) -> str:
        if self.status == SHAPE:
            return f"shape {self.artifact_shape} vs PyTorch {self.shape}"
        if self.status == FAILED:
            return f"the runtime refused it: {self.note}" if self.note else "runtime failure"
        if self.status == ABOVE and self.error is None:
            return "non-finite values"
        if self.status == MISSING or self.error is None:
            return "not evaluated" + (f" ({self.note})" if self.note else "")
        return f"{self.error:.3g}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, clipped to what :meth:`from_dict` accepts back."""
        data: dict[str, Any] = {
            "node": _fit(self.node), "op": _fit(self.op), "module": _fit(self.module),
            "artifact": _fit(self.artifact), "layers": _fits(self.layers),
            "kinds": _fits(self.kinds), "shape": list(self.shape),
            "status": self.status, "error": _finite_or_none(self.error),
        }
        if self.artifact_shape is not None:
            data["artifact_shape"] = list(self.artifact_shape)
        for key in ("rule", "note"):
            if getattr(self, key):
                data[key] = _fit(getattr(self, key))
        if self.inputs:
            data["inputs"] = _fits(self.inputs)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerRow:
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be an object")
        status = _text(data.get("status"), f"{where}.status")
        if status not in STATUSES:
            raise ValueError(f"{where}.status must be one of {', '.join(STATUSES)}")
        error = data.get("error")
        if error is not None:
            error = _number(error, f"{where}.error")
        shape = data.get("artifact_shape")
        return cls(
            node=_text(data.get("node"), f"{where}.node"),
            op=_text(data.get("op"), f"{where}.op"),
            module=_text(data.get("module"), f"{where}.module"),
            artifact=_text(data.get("artifact"), f"{where}.artifact"),
            layers=_texts(data.get("layers"), f"{where}.layers"),
            kinds=_texts(data.get("kinds"), f"{where}.kinds"),
            shape=_shape(data.get("shape"), f"{where}.shape"),
            status=status,
            error=error,
            artifact_shape=None if shape is None else _shape(shape, f"{where}.artifact_shape"),
            rule=_text(data.get("rule", ""), f"{where}.rule"),
            inputs=_texts(data.get("inputs", []), f"{where}.inputs"),
            note=_text(data.get("note", ""), f"{where}.note"),
        )


@dataclass
class LayerProfile:
    """Every mapped layer of one format, in graph order, and which one is to blame."""

    format: str
    source: str  # "export" (example input, at export time) or "verify" (dp.verify with a model)
    tolerance: float
    rows: list[LayerRow] = field(default_factory=list)
    culprit: str | None = None  # node name of the culprit row
    #: graph nodes with no artifact value of their own (aliases, folded pads, split parents)
    unmapped: int = 0
    note: str = ""  # why rows are missing or empty (a graph that does not match, a runtime stop)

    @property
    def culprit_row(self) -> LayerRow | None:
        return next((r for r in self.rows if r.node == self.culprit), None)

    @property
    def max_error(self) -> float | None:
        errors = [r.error for r in self.rows if r.error is not None]
        return max(errors) if errors else None

    def describe_culprit(self) -> str | None:
        """The culprit as one line: artifact layer, module path, op, error, rule / lowering."""
        row = self.culprit_row
        if row is None:
            return None
        names = ", ".join(f"'{n}'" for n in row.layers) or f"'{row.artifact}'"
        text = (f"layer '{row.artifact}' ({row.op} at '{row.module or '<top-level forward>'}'; "
                f"artifact layers {names}): ")
        if row.status in (ABOVE, OK) and row.error is not None:
            text += f"normalized error {row.error:.3g} > {self.tolerance:g}"
        else:
            text += row.error_text()
        text += " while its inputs agree"
        if row.produced_by:
            text += f"; produced by {row.produced_by}"
        return text

    def to_dict(self) -> dict[str, Any]:
        rows = [r.to_dict() for r in self.rows[:MAX_ROWS]]
        culprit = None if self.culprit is None else _fit(self.culprit)
        culprit = culprit if any(r["node"] == culprit for r in rows) else None
        data: dict[str, Any] = {"format": self.format, "source": self.source,
                                "tolerance": self.tolerance, "culprit": culprit,
                                "unmapped": self.unmapped, "rows": rows}
        if self.note:
            data["note"] = _fit(self.note)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "layers") -> LayerProfile:
        """A stored profile, type- and size-checked; anything else is TypeError/ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be an object")
        rows = data.get("rows")
        if not isinstance(rows, list):
            raise TypeError(f"{where}.rows must be a list")
        if len(rows) > MAX_ROWS:
            raise ValueError(f"{where}.rows has {len(rows)} entries, more than {MAX_ROWS}")
        culprit = data.get("culprit")
        if culprit is not None:
            culprit = _text(culprit, f"{where}.culprit")
        unmapped = data.get("unmapped", 0)
        if isinstance(unmapped, bool) or not isinstance(unmapped, int) or unmapped < 0:
            raise TypeError(f"{where}.unmapped must be a whole number >= 0")
        profile = cls(
            format=_text(data.get("format"), f"{where}.format"),
            source=_text(data.get("source"), f"{where}.source"),
            tolerance=_number(data.get("tolerance"), f"{where}.tolerance"),
            rows=[LayerRow.from_dict(r, f"{where}.rows[{i}]") for i, r in enumerate(rows)],
            culprit=culprit,
            unmapped=unmapped,
            note=_text(data.get("note", ""), f"{where}.note"),
        )
        if culprit is not None and profile.culprit_row is None:
            raise ValueError(f"{where}.culprit names {culprit!r}, which has no row")
        return profile

    # ------------------------------------------------------------------------- rendering
    def table(self) -> str:
        """A fixed-width text table (what ``deployplug verify --layers`` prints)."""
        title = (f"{self.format}: per-layer normalized error ({_source_text(self.source)}; "
                 f"tolerance {self.tolerance:g}; {len(self.rows)} mapped layers, "
                 f"{self.unmapped} graph nodes without a value of their own)")
        lines = [title]
        if self.note:
            lines.append(f"  note: {self.note}")
        if not self.rows:
            return "\n".join(lines)
        head = ("   #  " + f"{'module path':<28}{'op':<20}{'artifact layer':<30}"
                f"{'shape':<18}{'error':>11}  produced by")
        lines.append(head)
        for i, row in enumerate(self.rows):
            mark = ">>" if row.node == self.culprit else "  "
            err = (f"{row.error:>11.3e}" if row.error is not None and row.status in (OK, ABOVE)
                   else f"{row.status.upper():>11}")
            lines.append(f"{mark}{i:>3}  {_clip(row.module or '-', 27):<28}"
                         f"{_clip(row.op, 19):<20}{_clip(row.artifact, 29):<30}"
                         f"{_clip(str(row.shape), 17):<18}{err}  {row.produced_by}")
        culprit = self.describe_culprit()
        if culprit:
            lines.append(f"  culprit: {culprit}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """A Markdown table (``report.md``); the culprit row is in bold."""
        lines = [f"**{self.format}** ({_source_text(self.source)}; tolerance "
                 f"{self.tolerance:g}): {len(self.rows)} mapped layers, {self.unmapped} graph "
                 "nodes without a value of their own.", ""]
        if self.note:
            lines += [f"> {md_escape(self.note)}", ""]
        culprit = self.describe_culprit()
        if culprit:
            lines += [f"**Culprit:** {md_escape(culprit)}", ""]
        if not self.rows:
            return "\n".join(lines)
        lines.append("| # | module path | op | artifact layer | shape | normalized error | "
                     "produced by |")
        lines.append("|---:|---|---|---|---|---:|---|")
        for i, row in enumerate(self.rows):
            err = (f"{row.error:.2e}" if row.error is not None and row.status in (OK, ABOVE)
                   else row.error_text())
            if row.status == ABOVE:
                err += " ✗"
            cells = [str(i), _code(row.module or "(forward)"), _code(row.op),
                     _code(row.artifact), md_escape(str(row.shape)), md_escape(err),
                     md_escape(row.produced_by)]
            if row.node == self.culprit:
                cells = [f"**{c}**" if c else c for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def md_escape(text: str) -> str:
    """Text safe inside a Markdown table cell (pipes, newlines, HTML brackets)."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
            .replace("<", "&lt;").replace(">", "&gt;"))


def _code(text: str) -> str:
    # a backtick inside would end the code span; such names are rare enough to show plainly
    return md_escape(text) if "`" in text else f"`{text.replace('|', '¦')}`"


def _source_text(source: str) -> str:
    return {"export": "example input, at export", "verify": "recorded example, re-verified "
            "against the model"}.get(source, source)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _fit(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def _fits(items: list[str]) -> list[str]:
    return [_fit(t) for t in items[:MAX_ITEMS]]


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a string")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{where} is longer than {MAX_TEXT} characters")
    return value


def _texts(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise TypeError(f"{where} must be a list")
    if len(value) > MAX_ITEMS:
        raise ValueError(f"{where} has more than {MAX_ITEMS} entries")
    return [_text(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite")
    return float(value)


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list):
        raise TypeError(f"{where} must be a list")
    if len(value) > MAX_RANK:
        raise ValueError(f"{where} has rank {len(value)}, more than {MAX_RANK}")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise TypeError(f"{where} must hold whole numbers >= 0")
    return list(value)


def profiles_from_dict(data: Any, where: str = "layers") -> dict[str, LayerProfile]:
    """``{format: profile}`` as stored in a report; checked like :meth:`LayerProfile.from_dict`."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be an object")
    if len(data) > 64:
        raise ValueError(f"{where} has more than 64 formats")
    return {_text(k, f"{where} key"): LayerProfile.from_dict(v, f"{where}.{k}")
            for k, v in data.items()}


__all__ = ["ABOVE", "FAILED", "MISSING", "OK", "SHAPE", "STATUSES", "LayerProfile", "LayerRow",
           "md_escape", "profiles_from_dict"]
