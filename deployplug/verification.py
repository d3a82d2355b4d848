"""Run every artifact in its runtime and compare it with PyTorch on the same inputs.

The artifact directory keeps the verification inputs and PyTorch's outputs
(``reference.npz``), so a directory can be re-checked later without the model. With a model,
the artifacts are also compared against fresh PyTorch outputs, on the recorded inputs and on
new ones (random, or real batches the caller passes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deployplug.capture import Graph
from deployplug.errors import ArtifactFormatError, IntegrityError, VerificationError
from deployplug.exporters.base import FormatRecord
from deployplug.layer_profile import LayerProfile
from deployplug.numerics import normalized_error
from deployplug.reference_file import write_reference as save_reference  # noqa: F401 (API)
from deployplug.runtimes import get_runner
from deployplug.runtimes.layer_compare import reference_values
from deployplug.verify_report import DEFAULT_TOLERANCE, Comparison, VerifyReport

if TYPE_CHECKING:
    from deployplug.manifest import Manifest

REFERENCE_FILE = "reference.npz"


# ----------------------------------------------------------------------------- reference file
def load_reference(path: Path, inputs: Sequence[dict[str, Any]] | None = None,
                   outputs: Sequence[dict[str, Any]] | None = None
                   ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """``(samples, outputs)`` from ``reference.npz``, read as untrusted input.

    ``inputs`` / ``outputs`` are the manifest's tensor records: they fix how many arrays each
    sample has and the shape and dtype of each (see :mod:`deployplug.reference_file`).
    """
    from deployplug.reference_file import read_reference

    if not os.path.lexists(path):
        raise ArtifactFormatError(f"{path} is missing: the directory cannot be re-verified")
    return read_reference(Path(path), inputs, outputs)


def torch_outputs(model: nn.Module, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` (eval, CPU) on numpy inputs; every output leaf, in :mod:`.io_spec` order."""
    from deployplug.io_spec import flatten_outputs

    with torch.no_grad():
        out = model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)]


# ----------------------------------------------------------------------------- comparison
def compare_format(
    out_dir: Path,
    record: FormatRecord,
    samples: Sequence[Sequence[np.ndarray]],
    references: Sequence[Sequence[np.ndarray]],
    tolerance: float,
    source: str,
    report: VerifyReport,
) -> None:
    """Run one format on every sample and append the comparisons (or the failure) to ``report``."""
    runner = get_runner(record.format)
    try:
        all_outs = runner.run_samples(out_dir, record, samples)
        for k, (outs, refs) in enumerate(zip(all_outs, references, strict=True)):
            if len(outs) != len(refs):
                raise ArtifactFormatError(
                    f"{len(outs)} outputs from the runtime, PyTorch has {len(refs)}"
                )
            for j, (got, ref) in enumerate(zip(outs, refs, strict=True)):
                got = np.asarray(got)
                if got.shape != ref.shape and got.size == ref.size:
                    got = got.reshape(ref.shape)  # some runtimes drop unit dims
                if got.shape != ref.shape:
                    raise ArtifactFormatError(
                        f"output {j} has shape {list(got.shape)}, PyTorch {list(ref.shape)}"
                    )
                err = normalized_error(got, ref)
                max_abs = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
                report.comparisons.append(
                    Comparison(record.format, source, k, j, list(ref.shape), max_abs, err,
                               bool(err <= tolerance))
                )
    except Exception as exc:  # a runtime that cannot load or run the file is a failed check
        report.failures[record.format] = f"{type(exc).__name__}: {exc}"


def profile_format(out_dir: Path, record: FormatRecord, graph: Graph,
                   inputs: Sequence[np.ndarray], tolerance: float, report: VerifyReport,
                   source: str = "verify", references: dict[int, Any] | None = None) -> None:
    """Compare ``record``'s files with ``graph`` layer by layer, into ``report``.

    ``graph`` is the graph the files were written from (fused, decomposed, captured) and
    ``inputs`` one sample. The profile goes to ``report.layers[fmt]``; when the format failed
    its comparison, the culprit goes to ``report.divergence[fmt]`` (or why there is none).
    ``references`` (keyed by ``id(graph)``) keeps PyTorch's per-node values for formats
    sharing a graph; the caller keeps the graphs alive while it holds it. Never raises: a
    comparison that cannot run becomes the profile's note.
    """
    fmt = record.format
    try:
        reference = None
        if references is not None:
            if id(graph) not in references:
                references[id(graph)] = reference_values(graph, inputs)
            reference = references[id(graph)]
        profile = get_runner(fmt).layer_profile(out_dir, record, graph, inputs, tolerance,
                                                source, reference)
    except Exception as exc:  # damaged files end in a note; the verdict is already made
        profile = LayerProfile(fmt, source, tolerance, note="the per-layer comparison could "
                               f"not run: {type(exc).__name__}: {exc}")
    if profile is None:
        return
    report.layers[fmt] = profile
    if not report.format_passed(fmt):
        report.divergence[fmt] = profile.describe_culprit() or _no_culprit(profile)


def _no_culprit(profile: LayerProfile) -> str:
    if profile.note and not profile.rows:
        return f"no layer is blamed: {profile.note}"
    last = next((r for r in reversed(profile.rows) if r.agrees), None)
    where = f"after layer '{last.artifact}' ({last.op} at '{last.module}')" if last else ""
    text = ("no mapped layer departs from PyTorch while its inputs agree; the difference "
            f"arises {where or 'outside the mapped layers'}, in a step with no value of its "
            "own (or on inputs other than the recorded example)")
    return text + (f"; {profile.note}" if profile.note else "")


def profile_against_model(out_dir: Path, manifest: Manifest, records: Sequence[FormatRecord],
                          model: nn.Module, sample: Sequence[np.ndarray], tolerance: float,
                          report: VerifyReport) -> None:
    """Rebuild the graphs the files were written from, and profile every format against them."""
    from deployplug.deploy_graph import rebuild_graphs

    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in sample]
    rebuilt = rebuild_graphs(model, records, manifest.stages, manifest.extra, tensors,
                             float(manifest.tolerance))
    references: dict[int, Any] = {}
    for record in records:
        graph = rebuilt.graphs.get(record.format)
        if graph is None:
            why = rebuilt.problems.get(record.format, "no graph")
            report.layers[record.format] = LayerProfile(record.format, "verify", tolerance,
                                                        note=why)
            if not report.format_passed(record.format):
                report.divergence[record.format] = f"no layer is blamed: {why}"
            continue
        profile_format(out_dir, record, graph, sample, tolerance, report, "verify",
                       references)


# ----------------------------------------------------------------------------- public API
def verify(
    out_dir_or_manifest: str | Path | Manifest,
    model: nn.Module | None = None,
    inputs: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | None = None,
    tolerance: float | None = None,
    raise_on_failure: bool = False,
    max_bytes: int | None = None,
    int8_max_drop: float | None = None,
    layers: bool = True,
) -> VerifyReport:
    """Re-check an artifact directory: integrity first, then numbers.

    First the directory is checked against its manifest (plain names, regular files, recorded
    sizes and sha256, every used file listed); any difference fails the report
    (``report.integrity``) and no artifact is run. Then every artifact is compared with the
    recorded PyTorch outputs. With ``model``, also against fresh PyTorch outputs on the
    recorded inputs and on ``inputs`` (one batch, or a list of input tensors for a multi-input
    model); without ``inputs`` one new random sample of the recorded shapes is drawn.

    With ``model`` and ``layers`` (the default), the graph each format was written from is
    rebuilt from ``model`` as the export built it (fused and decomposed as the manifest's
    ``stages`` say, checked against the node names and ops recorded then) and every mapped
    layer is compared on the recorded example: ``report.layers[fmt]`` is the per-layer profile
    and, for a format that failed, ``report.divergence[fmt]`` names the culprit -- the first
    layer whose inputs agree with PyTorch and whose output does not -- with its artifact
    layers, module path, op, error and the rule or lowering that produced it. Without a
    model, ``report.layers`` holds the profiles recorded at export.

    ``tolerance`` is the caller's (default :data:`DEFAULT_TOLERANCE`): the value stored in the
    manifest is only reported, since a file must not decide how strictly it is checked.
    ``max_bytes`` caps the tensor bytes the readers may allocate (default 2 GiB, or
    ``DEPLOYPLUG_MAX_TENSOR_BYTES``; see :mod:`deployplug.limits`). With ``raise_on_failure``
    Int8 formats are judged by their decisions on the evaluation batches stored at export
    (``int8_eval.npz``): top-1 agreement and accuracy drop within ``int8_max_drop`` (default
    one point; the caller's, like ``tolerance``), see :mod:`deployplug.int8_verify`. With
    ``raise_on_failure``
    an integrity failure raises :class:`IntegrityError` and a numeric one
    :class:`VerificationError`. Damaged or hostile files raise :class:`ArtifactFormatError`
    (or are recorded as a format that failed to run), never an untyped exception.
    """
    from deployplug.integrity import check_directory, vouching
    from deployplug.limits import Limits, using
    from deployplug.manifest import Manifest, load_manifest
    from deployplug.manifest_schema import validate

    tol = _caller_tolerance(tolerance)
    with using(Limits.resolve(max_bytes)):
        if isinstance(out_dir_or_manifest, Manifest):
            manifest = out_dir_or_manifest
            validate(manifest.to_dict(), f"manifest of {manifest.dir}")
        else:
            manifest = load_manifest(Path(out_dir_or_manifest))
        out_dir = manifest.dir
        report = VerifyReport(tolerance=tol, recorded_tolerance=float(manifest.tolerance))
        records = [FormatRecord.from_dict(r) for r in manifest.formats.values()]
        used = [name for record in records for name in record.files] + [REFERENCE_FILE]
        report.integrity = check_directory(out_dir, manifest.files, used)
        if report.integrity:
            if raise_on_failure:
                error = IntegrityError(
                    f"{out_dir} does not match its manifest, so nothing was run: "
                    + "; ".join(report.integrity)
                    + ". Re-export, or restore the files the manifest records.")
                error.report = report
                raise error
            return report
        with vouching(entry["name"] for entry in manifest.files):
            _compare_all(out_dir, manifest, records, model, inputs, tol, report,
                         int8_max_drop, layers)
    if raise_on_failure and not report.passed:
        raise VerificationError(report)
    return report


def _caller_tolerance(tolerance: float | None) -> float:
    if tolerance is None:
        return DEFAULT_TOLERANCE
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)):
        raise ValueError(f"tolerance must be a number, got {type(tolerance).__name__}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
    return float(tolerance)


def _compare_all(out_dir: Path, manifest: Manifest, records: list[FormatRecord],
                 model: nn.Module | None, inputs: Any, tol: float,
                 report: VerifyReport, int8_max_drop: float | None = None,
                 layers: bool = True) -> None:
    """The numeric part of :func:`verify`, run only on a directory that passed integrity."""
    from deployplug.exporters import statistical_formats
    from deployplug.int8_verify import judge_directory

    samples, references = load_reference(out_dir / REFERENCE_FILE, manifest.inputs,
                                         manifest.outputs)
    if model is not None:
        model = _cpu_eval_copy(model)
    judged = set(statistical_formats(r.format for r in records))
    statistical = [r for r in records if r.format in judged]
    for record in statistical:
        judge_directory(out_dir, record, manifest.inputs, manifest.outputs, model,
                        int8_max_drop, report)
    records = [r for r in records if r not in statistical]
    for record in records:
        compare_format(out_dir, record, samples, references, tol, "recorded", report)
    if model is not None:
        fresh = [list(s) for s in samples] + [_as_sample(inputs, samples[0])]
        expected = [torch_outputs(model, s) for s in fresh]
        for record in records:
            compare_format(out_dir, record, fresh, expected, tol, "model", report)
        if layers and records:
            profile_against_model(out_dir, manifest, records, model, samples[0], tol, report)
    elif layers and manifest.verification is not None:
        names = {r.format for r in records}
        report.layers.update({f: p for f, p in manifest.verification.layers.items()
                              if f in names})


def _as_sample(inputs: Any, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    if inputs is None:
        rng = np.random.default_rng(1234)
        return [rng.standard_normal(a.shape).astype(a.dtype) for a in like]
    items = [inputs] if isinstance(inputs, (torch.Tensor, np.ndarray)) else list(inputs)
    return [np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t) for t in items]


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().float().eval()
