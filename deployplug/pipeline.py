"""The one pipeline: reparameterize -> decompose -> write each format -> verify -> land.

The Lightning callback, the command line and the Python API all call :func:`export`. What it
promises:

* **Nothing lost.** The destination is checked before any work starts (deployplug writes only
  into a new path, an empty directory or one of its own exports; see :mod:`.outdir`), and the
  caller's (training) model is never touched: the pipeline works on a CPU float32 eval copy.
* **What was trained.** Reference outputs come from ``reference_model`` (the trained forward)
  when it is given, never from the thing being exported, and every artifact is compared with
  them on the example input, two seeded random samples and any real batches passed in.
* **Only PASSED artifacts land.** Each format is written into a staging directory and verified
  there. Formats that pass are moved to ``out_dir`` together (atomically, with the manifest
  written last); formats that fail to write or to verify go to ``<out_dir>.failed/`` with a
  manifest of their own, and the error is raised after the passing formats have landed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.capture import CaptureCache
from deployplug.deploy_graph import deploy_copy, legal_model
from deployplug.errors import (
    DeployError,
    ExportFailedError,
    InputShapeError,
    ModuleMismatchError,
    VerificationError,
)
from deployplug.exporters import get_exporter, statistical_formats
from deployplug.exporters.base import FormatRecord
from deployplug.io_spec import (
    FlatOutputs,
    OutputSpec,
    flatten_outputs,
    input_names,
    output_spec,
    unwrap_compiled,
)
from deployplug.layer_profile import LayerProfile
from deployplug.manifest import Manifest, describe_files
from deployplug.numerics import normalized_error
from deployplug.outdir import ArtifactWriter, check_output_dir
from deployplug.profiles import TargetProfile, get_target
from deployplug.report_md import write_report
from deployplug.verification import (
    DEFAULT_TOLERANCE,
    REFERENCE_FILE,
    VerifyReport,
    compare_format,
    profile_format,
    save_reference,
    torch_outputs,
)

Inputs = torch.Tensor | Sequence[torch.Tensor]
FAILED_SUFFIX = ".failed"
#: seeds of the random verification samples; distinct from any seed an example is drawn with
_SAMPLE_SEEDS = (0x5EED1, 0x5EED2)


def normalize_formats(formats: str | Sequence[str]) -> list[str]:
    """``"onnx"`` or ``["onnx", "caffe"]`` -> a list without duplicates, every name known."""
    names = [formats] if isinstance(formats, str) else list(formats)
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError("formats is empty: name at least one of onnx, caffe, msnhnet")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"a format is a name such as 'onnx', got {name!r}")
        get_exporter(name)  # raises for an unknown name
    return names


def failed_path(out_dir: Path) -> Path:
    """Where the files of formats that failed go: a sibling, never inside ``out_dir``."""
    return out_dir.with_name(out_dir.name + FAILED_SUFFIX)


def as_input_tuple(example_input: Inputs) -> tuple[torch.Tensor, ...]:
    items = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise InputShapeError("example_input must be a tensor or a sequence of tensors")
    for t in items:
        if not t.is_floating_point():
            raise InputShapeError(
                f"example input of dtype {t.dtype}: deployment formats here take float32 "
                "inputs; pass a floating-point example (integer inputs are not exported)")
    return tuple(t.detach().cpu().float() for t in items)


def resolve_target(fmt: str, target: str | TargetProfile | None) -> TargetProfile:
    """The profile a format is written for: the requested target when the format takes it."""
    exporter = get_exporter(fmt)
    if target is not None:
        profile = get_target(target)
        if profile.name in exporter.accepted_targets:
            return profile
    return get_target(exporter.default_target)


def check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...],
               hint: str = "") -> list[np.ndarray]:
    """Run the model once; a failure here is almost always a wrong input shape."""
    return run_once(model, inputs, hint)[0]


def run_once(model: nn.Module, inputs: tuple[torch.Tensor, ...],
             hint: str = "") -> tuple[list[np.ndarray], OutputSpec]:
    """The model's output leaves on ``inputs`` and their names, from one forward pass."""
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:  # the model decides what a wrong shape raises
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise InputShapeError(
            f"{type(model).__name__} cannot run on input of shape {shapes}: "
            f"{type(exc).__name__}: {exc}. {hint + ' ' if hint else ''}The input shape includes "
            "the batch dimension, e.g. (1, channels, height, width)."
        ) from exc
    spec = output_spec(out)  # an unsupported structure is a clear error, not a shape error
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)], spec


def verification_samples(
    inputs: tuple[torch.Tensor, ...], extra_inputs: Sequence[Inputs] | None
) -> list[list[np.ndarray]]:
    """The example input, two seeded random samples of its shape, and any real batches.

    The random samples are redrawn should one equal the example (an example made with the same
    generator and seed): a second sample identical to the first checks nothing.
    """
    samples = [[t.numpy() for t in inputs]]
    seed = _SAMPLE_SEEDS[0]
    while len(samples) < 1 + len(_SAMPLE_SEEDS):
        gen = torch.Generator().manual_seed(seed)
        draw = [torch.randn(t.shape, generator=gen).numpy() for t in inputs]
        if not any(all(np.array_equal(a, b) for a, b in zip(draw, s)) for s in samples):
            samples.append(draw)
        seed += 1
    for extra in extra_inputs or ():
        batch = as_input_tuple(extra)
        if [tuple(t.shape) for t in batch] != [tuple(t.shape) for t in inputs]:
            raise InputShapeError(
                f"extra verification input of shape {[list(t.shape) for t in batch]} does not "
                f"match the export shape {[list(t.shape) for t in inputs]}"
            )
        samples.append([t.numpy() for t in batch])
    return samples


def _check_reference(exported: list[np.ndarray], reference: list[np.ndarray],
                     tolerance: float) -> None:
    """Refuse to start when the exported module is not the trained function.

    Every artifact would fail verification anyway; saying so before any file is written,
    with the shapes and the error, tells the user which module to export instead.
    """
    shapes = [list(a.shape) for a in exported]
    ref_shapes = [list(a.shape) for a in reference]
    if shapes != ref_shapes:
        raise ModuleMismatchError(
            f"the module being exported returns outputs of shapes {shapes}, but the trained "
            f"forward returns {ref_shapes}: export the module whose forward is the trained "
            "function (DeployCallback(module_attr=None) exports the LightningModule's forward)")
    worst = max((normalized_error(a, r) for a, r in zip(exported, reference)), default=0.0)
    if worst > tolerance:
        raise ModuleMismatchError(
            f"the module being exported differs from the trained forward on the example input "
            f"(normalized error {worst:.3e} > {tolerance:g}): export the module whose forward "
            "is the trained function (DeployCallback(module_attr=None) exports the "
            "LightningModule's forward)")


@dataclass
class _Outcome:
    """One format's result: its record (when written), rewrites, and why it failed."""

    fmt: str
    record: FormatRecord | None = None
    legal: nn.Module | None = None
    failure: str = ""
    error: BaseException | None = None
    verify_failed: bool = False
    files: list[str] = field(default_factory=list)


def export(
    model: nn.Module,
    example_input: Inputs,
    out_dir: str | Path,
    formats: str | Sequence[str] = ("onnx",),
    target: str | None = None,
    reparameterize: bool = True,
    decompose: bool = True,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    onnx_options: dict[str, Any] | None = None,
    extra_inputs: Sequence[Inputs] | None = None,
    strict: bool = True,
    metadata: dict[str, Any] | None = None,
    reference_model: nn.Module | None = None,
    calibration: Any = None,
    int8: Any = None,
) -> Manifest:
    """Export ``model`` to every format in ``formats``, verify the files, land what passed.

    ``target`` selects a target profile for the formats that accept it (``"om"`` for Caffe);
    other formats use their own profile. ``reference_model`` is the function the artifacts
    must reproduce (default: ``model`` as given, before fusion); it must agree with ``model``
    on the example input. Verification runs each artifact on the example input, two seeded
    random samples and every batch in ``extra_inputs``.

    Formats are independent: those that pass land at ``out_dir``; those that fail to write or
    to verify go to ``<out_dir>.failed/`` (when they wrote files). With ``strict`` (the
    default) a failure then raises (:class:`VerificationError` when only verification failed,
    else the format's error), and the exception carries ``manifest`` (what landed, or None)
    and ``failed_dir``. With ``strict=False`` the manifest of what landed is returned (or,
    when nothing passed, the failed directory's manifest; when no file was written at all,
    the error is raised) and ``manifest.failed_formats`` says what failed.

    The ``onnx_int8`` format quantizes the fused model with ``calibration`` (a tensor or an
    iterable of input batches) and is judged statistically, not by ``tolerance``: top-1
    agreement with the trained forward and, with labels, the accuracy drop, on the
    evaluation batches of ``int8`` (:class:`deployplug.quant.options.Int8Options`, or a
    mapping of its fields: weights, repair, max_drop, eval_inputs, eval_labels ...).
    """
    names = normalize_formats(formats)
    out_dir = check_output_dir(out_dir)
    failed_dir = failed_path(out_dir)
    check_output_dir(failed_dir)
    inputs = as_input_tuple(example_input)
    original = deploy_copy(model)
    exported_out, spec = run_once(original, inputs)
    reference = original if reference_model is None else deploy_copy(reference_model)
    reference_out = exported_out
    if reference_model is not None:
        reference_out = check_runs(reference, inputs)
        _check_reference(exported_out, reference_out, tolerance)
    samples = verification_samples(inputs, extra_inputs)
    references = [reference_out] + [torch_outputs(reference, s) for s in samples[1:]]
    int8_job = _int8_job(model, names, calibration, int8, inputs, reference)

    deploy_model = original
    metadata = dict(metadata or {})
    if reparameterize:
        from deployplug.reparam import ReparamReport
        from deployplug.reparam import reparameterize as fuse

        fusion = ReparamReport()

        # In place: the references are taken, and the self-check keeps its own record of the
        # unfused outputs, so the one copy made above is all the export needs.
        deploy_model = fuse(original, inplace=True, example_input=inputs, tolerance=tolerance,
                            report=fusion)
        metadata["reparameterize"] = fusion.to_dict()
    if not spec.flat:
        deploy_model = FlatOutputs(deploy_model)
    in_names = input_names(unwrap_compiled(model), len(inputs))

    writer = ArtifactWriter(out_dir)
    try:
        cache = CaptureCache(inputs)
        outcomes = [write_format(fmt, resolve_target(fmt, target), deploy_model, inputs,
                                 writer.staging, decompose, spec.names, not spec.flat, in_names,
                                 onnx_options, cache, int8_job)
                    for fmt in names]
        report = VerifyReport(tolerance=tolerance) if verify else None
        layer_refs: dict[int, Any] = {}  # PyTorch's per-node values, once per lowered graph
        for outcome in outcomes:
            if report is not None and outcome.record is not None:
                if int8_job is not None and get_exporter(outcome.fmt).statistical:
                    _judge_int8(outcome, writer.staging, int8_job, report)
                else:
                    _verify_one(outcome, writer.staging, samples, references, tolerance,
                                report, cache, layer_refs)
        landed = [o for o in outcomes if not o.failure]
        failed = [o for o in outcomes if o.failure]
        context = _ManifestContext(inputs, in_names, spec.names, references[0], reparameterize,
                                   decompose, verify, tolerance, metadata)
        manifest = failed_manifest = None
        # Formats that failed before writing anything leave nothing worth a directory.
        published_failed = failed_dir if any(o.files for o in failed) else None
        if published_failed is not None:
            failed_manifest = _land_failed(failed, writer.staging, failed_dir, samples,
                                           references, report, context)
        for outcome in failed:  # the working sub-directory of a format that wrote nothing
            shutil.rmtree(writer.staging / f".{outcome.fmt}", ignore_errors=True)
        if landed:
            manifest = _land(landed, writer, samples, references, report, context,
                             {o.fmt: o.failure for o in failed}, published_failed)
        else:
            writer.discard()
    except BaseException:
        writer.discard()
        raise
    if failed:
        error = _failure_error(failed, report)
        error.manifest, error.failed_dir = manifest, published_failed
        if strict or (manifest is None and failed_manifest is None):
            raise error
        returned = manifest if manifest is not None else failed_manifest
        assert returned is not None  # both None raised just above
        return returned
    assert manifest is not None
    return manifest


def write_format(fmt: str, profile: TargetProfile, deploy_model: nn.Module,
               inputs: tuple[torch.Tensor, ...], staging: Path, decompose: bool,
               output_names: Sequence[str], keyed: bool, in_names: Sequence[str],
               onnx_options: dict[str, Any] | None,
               cache: CaptureCache | None = None, int8_job: Any = None) -> _Outcome:
    """Decompose for the format's target and write its files into their own sub-directory.

    ONNX inputs and outputs always carry the model's names; Caffe output blobs are renamed
    only for ``keyed`` outputs (dicts, nesting), since otherwise the module path that produced
    a blob is the more useful name. ``cache`` shares captures between formats: a module
    captured by one target's decomposition pass is not captured again by another's, nor by
    the writer.
    """
    outcome = _Outcome(fmt)
    directory = staging / f".{fmt}"
    directory.mkdir()
    try:
        cache = cache if cache is not None else CaptureCache(inputs)
        legal, rewrites, graph = legal_model(deploy_model, profile, inputs, decompose, cache)
        outcome.legal = legal
        options: dict[str, Any] = {}
        if fmt != "onnx":
            options["graph"] = graph if graph is not None else cache.graph(legal)
        if fmt == "onnx":
            options = {**(onnx_options or {}), "output_names": list(output_names),
                       "input_names": list(in_names)}
        elif fmt == "caffe" and keyed:
            options["output_names"] = list(output_names)
        elif get_exporter(fmt).statistical:
            if int8_job is None:
                raise ExportFailedError(fmt, "an int8 format needs calibration batches: "
                                        "pass calibration= to export")
            from deployplug.runtimes import get_runner

            options = int8_job.writer_options(get_runner(fmt), in_names, output_names)
        try:
            record = get_exporter(fmt).write(legal, inputs, directory, profile, **options)
        except DeployError:
            raise
        except Exception as exc:
            raise ExportFailedError(fmt, f"{type(exc).__name__}: {exc}") from exc
        record.info["decomposed"] = rewrites
        outcome.record = record
        outcome.files = list(record.files)
    except DeployError as exc:
        outcome.failure = f"{type(exc).__name__}: {exc}"
        outcome.error = exc
    return outcome


def _int8_job(model: nn.Module, names: list[str], calibration: Any, int8: Any,
              inputs: tuple[torch.Tensor, ...], reference: nn.Module) -> Any:
    """The checked int8 inputs when an int8 format is asked for (else ``None``).

    Taken before fusion: the evaluation references are the trained forward's outputs, and the
    training form is kept (one more CPU copy) to trace outliers back to their branches.
    """
    from deployplug.quant.options import Int8Options

    if not statistical_formats(names):
        if calibration is not None or int8 is not None:
            raise ValueError("calibration= and int8= configure the int8 formats (onnx_int8), "
                             f"none of which is among the formats {names}")
        return None
    from deployplug.quant.job import prepare

    return prepare(calibration, Int8Options.coerce(int8), inputs,
                   lambda batch: torch_outputs(reference, [t.numpy() for t in batch]),
                   deploy_copy(model))


def _judge_int8(outcome: _Outcome, staging: Path, job: Any, report: VerifyReport) -> None:
    """Judge the int8 file on the evaluation batches and store them for re-verification."""
    from deployplug.int8_verify import judge_files, write_eval_file

    assert outcome.record is not None
    directory = staging / f".{outcome.fmt}"
    record = outcome.record
    record.info["judged_on"] = job.judged_on
    try:
        stored = write_eval_file(directory, job.evaluation, job.references, job.labels,
                                 job.options.stored_samples)
        record.info.update(stored)
        if stored["eval_file"]:
            record.files.append(stored["eval_file"])
            outcome.files.append(stored["eval_file"])
        verdict = judge_files(directory, record, job.evaluation.numpy(), job.references,
                              job.labels, job.options.max_drop)
    except Exception as exc:  # a file that cannot be run is a failed check
        report.failures[outcome.fmt] = f"{type(exc).__name__}: {exc}"
        outcome.failure = f"verification failed: {report.failures[outcome.fmt]}"
        outcome.verify_failed = True
        return
    report.judgements[outcome.fmt] = {**verdict.to_dict(), "source": "export"}
    if not verdict.passed:
        outcome.failure = f"verification failed: {verdict}"
        outcome.verify_failed = True


def _verify_one(outcome: _Outcome, staging: Path, samples: list[list[np.ndarray]],
                references: list[list[np.ndarray]], tolerance: float,
                report: VerifyReport, cache: CaptureCache | None = None,
                layer_refs: dict[int, Any] | None = None) -> None:
    """Compare the format's files with the references, then layer by layer on the example.

    The per-layer profile compares against the graph the files were written from (the
    writer's, or the legal model's from ``cache``), and names the culprit of a failure;
    ``layer_refs`` keeps PyTorch's per-node values of each graph for the next format.
    """
    assert outcome.record is not None and outcome.legal is not None
    directory = staging / f".{outcome.fmt}"
    compare_format(directory, outcome.record, samples, references, tolerance, "recorded", report)
    graph = outcome.record.graph
    try:
        if graph is None:  # ONNX is written from the module: its graph comes from the cache
            graph = (cache or CaptureCache(tuple(torch.from_numpy(a) for a in samples[0]))
                     ).graph(outcome.legal)
    except Exception as exc:  # torch.export refuses a model the ONNX exporter took
        why = f"the model could not be captured ({type(exc).__name__}: {exc})"
        report.layers[outcome.fmt] = LayerProfile(outcome.fmt, "export", tolerance, note=why)
        if not report.format_passed(outcome.fmt):
            report.divergence[outcome.fmt] = f"no layer is blamed: {why}"
    else:
        profile_format(directory, outcome.record, graph, samples[0], tolerance, report,
                       "export", layer_refs)
    if not report.format_passed(outcome.fmt):
        worst = report.max_error(outcome.fmt)
        why = report.failures.get(outcome.fmt) or f"normalized error {worst:.3e} > {tolerance:g}"
        outcome.failure = f"verification failed: {why}"
        outcome.verify_failed = True


@dataclass
class _ManifestContext:
    inputs: tuple[torch.Tensor, ...]
    input_names: Sequence[str]
    output_names: Sequence[str]
    outputs: list[np.ndarray]
    reparameterize: bool
    decompose: bool
    verify: bool
    tolerance: float
    metadata: dict[str, Any]

    def manifest(self, directory: Path, outcomes: list[_Outcome], report: VerifyReport | None,
                 failed_formats: dict[str, str], failed_dir: Path | None) -> Manifest:
        records = {o.fmt: o.record.to_dict() for o in outcomes if o.record is not None}
        files = [f for o in outcomes for f in o.files] + [REFERENCE_FILE]
        extra = dict(self.metadata)
        if failed_dir is not None:
            extra["failed_dir"] = failed_dir.name
        return Manifest(
            dir=directory,
            formats=records,
            inputs=[{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t)}
                    for n, t in zip(self.input_names, self.inputs, strict=True)],
            outputs=[{"index": j, "name": n, "shape": list(o.shape), "dtype": str(o.dtype)}
                     for j, (n, o) in enumerate(zip(self.output_names, self.outputs,
                                                    strict=True))],
            stages={"reparameterize": self.reparameterize, "decompose": self.decompose,
                    "verify": self.verify},
            tolerance=self.tolerance,
            verification=report,
            files=describe_files(directory, files),
            failed_formats=dict(failed_formats),
            extra=extra,
        )


def _dtype_name(t: torch.Tensor) -> str:
    """``float32``: the numpy spelling, the same one the outputs use."""
    return str(t.detach().cpu().numpy().dtype)


def _sub_report(report: VerifyReport | None, formats: set[str]) -> VerifyReport | None:
    """The part of a verification report that concerns ``formats``."""
    if report is None:
        return None
    return VerifyReport(
        tolerance=report.tolerance,
        comparisons=[c for c in report.comparisons if c.format in formats],
        failures={f: w for f, w in report.failures.items() if f in formats},
        divergence={f: w for f, w in report.divergence.items() if f in formats},
        judgements={f: j for f, j in report.judgements.items() if f in formats},
        layers={f: p for f, p in report.layers.items() if f in formats},
    )


def _gather(outcomes: list[_Outcome], staging: Path, destination: Path) -> None:
    """Move each format's files from its sub-directory of ``staging`` into ``destination``."""
    for outcome in outcomes:
        source = staging / f".{outcome.fmt}"
        for name in outcome.files:
            (source / name).rename(destination / name)
        shutil.rmtree(source, ignore_errors=True)


def _land(landed: list[_Outcome], writer: ArtifactWriter, samples: list[list[np.ndarray]],
          references: list[list[np.ndarray]], report: VerifyReport | None,
          context: _ManifestContext, failed_formats: dict[str, str],
          failed_dir: Path | None) -> Manifest:
    staging = writer.staging
    _gather(landed, staging, staging)
    save_reference(staging / REFERENCE_FILE, samples, references)
    manifest = context.manifest(staging, landed, _sub_report(report, {o.fmt for o in landed}),
                                failed_formats, failed_dir)
    write_report(manifest)
    manifest.write()
    manifest.dir = writer.publish()
    return manifest


def _land_failed(failed: list[_Outcome], staging: Path, failed_dir: Path,
                 samples: list[list[np.ndarray]], references: list[list[np.ndarray]],
                 report: VerifyReport | None, context: _ManifestContext) -> Manifest:
    """Publish the failed formats' files, reference data and manifest for debugging."""
    side = ArtifactWriter(failed_dir)
    try:
        _gather(failed, staging, side.staging)
        save_reference(side.staging / REFERENCE_FILE, samples, references)
        manifest = context.manifest(side.staging, failed,
                                    _sub_report(report, {o.fmt for o in failed}),
                                    {o.fmt: o.failure for o in failed}, None)
        write_report(manifest)
        manifest.write()
        manifest.dir = side.publish()
    except BaseException:
        side.discard()
        raise
    return manifest


def _failure_error(failed: list[_Outcome], report: VerifyReport | None) -> DeployError:
    """The exception an export with failed formats raises."""
    if all(o.verify_failed for o in failed) and report is not None:
        return VerificationError(_sub_report(report, {o.fmt for o in failed}))
    if len(failed) == 1 and isinstance(failed[0].error, DeployError):
        return failed[0].error
    lines = "; ".join(f"[{o.fmt}] {o.failure}" for o in failed)
    return ExportFailedError(",".join(o.fmt for o in failed), lines)
