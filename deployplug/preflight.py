"""Pre-flight compatibility check: what would happen to each op on a target, without files.

``check`` runs the very decomposition pass ``decompose`` runs (on a copy), so the report and
the real export can never disagree: an op reported "decomposed" is one a rule actually
replaced, and an op reported "unsupported" is one ``decompose`` would refuse.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployplug.errors import DeployError, OffendingOp, UnsupportedOpError
from deployplug.profiles import TargetProfile, get_target

NATIVE, DECOMPOSED, UNSUPPORTED = "native", "decomposed", "unsupported"


@dataclass(frozen=True)
class CompatRow:
    """One op: where it is, what happens to it on the target, and why."""

    op: str
    module_path: str
    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"op": self.op, "module_path": self.module_path, "status": self.status,
                "detail": self.detail}


@dataclass
class CompatReport:
    """Per-op verdicts for one model on one target."""

    target: str
    rows: list[CompatRow] = field(default_factory=list)
    offenders: list[OffendingOp] = field(default_factory=list)
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and not self.offenders

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    def raise_if_failed(self) -> None:
        """Raise :class:`UnsupportedOpError` listing every problem, if there is any."""
        if self.passed:
            return
        offenders = list(self.offenders)
        if self.error:
            offenders.insert(0, OffendingOp("<capture>", "", self.target, self.error))
        raise UnsupportedOpError(offenders)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "passed": self.passed,
            "error": self.error,
            "counts": {s: self.count(s) for s in (NATIVE, DECOMPOSED, UNSUPPORTED)},
            "rows": [r.to_dict() for r in self.rows],
            "offenders": [
                {"op": o.op, "module_path": o.module_path, "target": o.target,
                 "reason": o.reason, "suggestions": list(o.suggestions)}
                for o in self.offenders
            ],
        }

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        head = (f"check for target {self.target}: {verdict} ({self.count(NATIVE)} native, "
                f"{self.count(DECOMPOSED)} decomposed, {self.count(UNSUPPORTED)} unsupported)")
        lines = [head]
        if self.error:
            lines.append(f"  capture failed: {self.error}")
        if self.rows:
            table = [("op", "module", "status", "detail")] + [
                (r.op, r.module_path or "<top-level>", r.status, r.detail) for r in self.rows]
            widths = [max(len(row[i]) for row in table) for i in range(3)]
            for row in table:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths))
                             + "  " + row[3])
        return "\n".join(lines)


def check(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    target: str | TargetProfile,
    reparameterize: bool = True,
    onnx_options: dict[str, Any] | None = None,
) -> CompatReport:
    """Which ops of ``model`` run natively on ``target``, which a rule rewrites, which fail.

    Runs every step :func:`deployplug.export` runs before verification, on copies and in a
    temporary directory: the input check, fusion (with its self-check), the decomposition
    pass and the format's writer itself (the ONNX exporter with ``onnx_options``, the Caffe
    lowering and its om checks, the MsnhNet writer with its input/output limits). So ``check``
    passes exactly when ``export`` would write the files.
    """
    from deployplug.capture import CaptureCache
    from deployplug.decompositions.apply import run_decompose
    from deployplug.decompositions.registry import why_not
    from deployplug.io_spec import input_names, unwrap_compiled

    profile = get_target(target)
    report = CompatReport(target=profile.name)
    try:
        work, inputs, spec = _deploy_form(model, example_input, reparameterize)
        cache = CaptureCache(inputs)  # work is a private copy: decompose and write share it
        result = run_decompose(work, profile, inputs, cache=cache)
        graph = result.original or cache.graph(work)
    except DeployError as exc:
        report.error = str(exc)
        return report

    first_round = {a.node: a for a in result.applied if a.round == 0}
    for node in graph:
        reason = profile.refusal(node, graph)
        if reason is None:
            report.rows.append(CompatRow(node.op, node.module_path, NATIVE))
        elif node.name in first_round:
            applied = first_round[node.name]
            report.rows.append(CompatRow(node.op, node.module_path, DECOMPOSED,
                                         f"rule {applied.rule} ({reason})"))
        else:
            notes = "; ".join(why_not(node, graph, profile)) or "no rule exists"
            report.rows.append(CompatRow(node.op, node.module_path, UNSUPPORTED,
                                         f"{reason}; {notes}"))
    for applied in result.applied:
        if applied.round > 0:
            report.rows.append(CompatRow(applied.op, applied.module_path, DECOMPOSED,
                                         f"rule {applied.rule} (inside an earlier rewrite)"))
    listed = {(r.op, r.module_path) for r in report.rows if r.status == UNSUPPORTED}
    for off in result.offenders:
        if (off.op, off.module_path) not in listed:
            report.rows.append(CompatRow(off.op, off.module_path, UNSUPPORTED,
                                         f"{off.reason}; " + "; ".join(off.suggestions)))
    report.offenders = list(result.offenders)
    if report.passed:
        report.error = _trial_write(result.module, inputs, profile, spec,
                                    input_names(unwrap_compiled(model), len(inputs)),
                                    onnx_options, cache)
    return report


def _deploy_form(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
                 reparameterize: bool) -> tuple[nn.Module, tuple[torch.Tensor, ...], Any]:
    """The model exactly as :func:`deployplug.export` hands it to the decomposition pass."""
    from deployplug.io_spec import FlatOutputs, output_spec
    from deployplug.pipeline import as_input_tuple, check_runs, deploy_copy

    inputs = as_input_tuple(example_input)
    work = deploy_copy(model)
    check_runs(work, inputs)
    with torch.no_grad():
        spec = output_spec(work(*inputs))
    if reparameterize:
        from deployplug.reparam import reparameterize as fuse

        work = fuse(work, inplace=True, example_input=inputs)
    if not spec.flat:
        work = FlatOutputs(work)
    return work, inputs, spec


def format_for_target(profile: TargetProfile) -> str:
    """The artifact format whose files a target profile describes."""
    from deployplug.exporters import formats, get_exporter

    for fmt in formats():
        if profile.name in get_exporter(fmt).accepted_targets:
            return fmt
    raise ValueError(f"no format writes files for target {profile.name!r}")


def _trial_write(legal: nn.Module, inputs: tuple[torch.Tensor, ...], profile: TargetProfile,
                 spec: Any, in_names: list[str], onnx_options: dict[str, Any] | None,
                 cache: Any) -> str:
    """Run the format's writer into a throw-away directory; the refusal text, or ``""``."""
    from deployplug.pipeline import write_format

    with tempfile.TemporaryDirectory(prefix="deployplug-check-") as tmp:
        outcome = write_format(format_for_target(profile), profile, legal, inputs, Path(tmp),
                               False, spec.names, not spec.flat, in_names, onnx_options,
                               cache)
    return f"the {outcome.fmt} writer refuses the model: {outcome.failure}" \
        if outcome.failure else ""
