"""The one pipeline: reparameterize -> decompose -> write each format -> verify -> manifest.

The Lightning callback, the command line and the Python API all call :func:`export`. It
works on a CPU float32 eval copy, so the caller's (training) model is never touched, and it
builds the artifact directory beside its destination and renames it into place only when
every file, the reference data and the manifest are written: a failed export leaves no
partial directory behind.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.errors import (
    DeployError,
    ExportFailedError,
    InputShapeError,
    OutputDirectoryError,
    VerificationError,
)
from deployplug.exporters import get_exporter
from deployplug.exporters.base import FormatRecord
from deployplug.manifest import Manifest, describe_files
from deployplug.profiles import TargetProfile, get_target
from deployplug.verification import (
    DEFAULT_TOLERANCE,
    REFERENCE_FILE,
    VerifyReport,
    compare_format,
    locate_divergence,
    save_reference,
    torch_outputs,
)

Inputs = torch.Tensor | Sequence[torch.Tensor]


def deploy_copy(model: nn.Module) -> nn.Module:
    """A CPU, float32, eval-mode deep copy; the original keeps its device, dtype and mode."""
    clone = copy.deepcopy(model)
    return clone.cpu().float().eval()


def as_input_tuple(example_input: Inputs) -> tuple[torch.Tensor, ...]:
    items = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise InputShapeError("example_input must be a tensor or a sequence of tensors")
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
    try:
        return torch_outputs(model, [t.numpy() for t in inputs])
    except Exception as exc:  # the model decides what a wrong shape raises
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise InputShapeError(
            f"{type(model).__name__} cannot run on input of shape {shapes}: "
            f"{type(exc).__name__}: {exc}. {hint + ' ' if hint else ''}The input shape includes "
            "the batch dimension, e.g. (1, channels, height, width)."
        ) from exc


def verification_samples(
    inputs: tuple[torch.Tensor, ...], extra_inputs: Sequence[Inputs] | None, seed: int = 0
) -> list[list[np.ndarray]]:
    """The example input, a seeded random sample of the same shape, and any real batches."""
    gen = torch.Generator().manual_seed(seed)
    samples = [[t.numpy() for t in inputs]]
    samples.append([torch.randn(t.shape, generator=gen).numpy() for t in inputs])
    for extra in extra_inputs or ():
        batch = as_input_tuple(extra)
        if [tuple(t.shape) for t in batch] != [tuple(t.shape) for t in inputs]:
            raise InputShapeError(
                f"extra verification input of shape {[list(t.shape) for t in batch]} does not "
                f"match the export shape {[list(t.shape) for t in inputs]}"
            )
        samples.append([t.numpy() for t in batch])
    return samples


def _legal_model(model: nn.Module, profile: TargetProfile, inputs: tuple[torch.Tensor, ...],
                 decompose: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The target-legal model and the rewrites that made it so (for the manifest)."""
    if not decompose or profile.accepts_everything:
        return model, []
    from deployplug.decompositions.apply import run_decompose
    from deployplug.errors import UnsupportedOpError

    result = run_decompose(model, profile, inputs)
    if result.offenders:
        raise UnsupportedOpError(result.offenders)
    rewrites = [{"op": a.op, "module_path": a.module_path, "rule": a.rule}
                for a in result.applied]
    return result.module, rewrites


def _staging_dir(out_dir: Path) -> Path:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise OutputDirectoryError(
            f"cannot create the artifact directory {out_dir}: {exc}. Pass a writable directory "
            "(DeployCallback(dirpath=...) or --out)."
        ) from exc


def _move_into_place(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(
    model: nn.Module,
    example_input: Inputs,
    out_dir: str | Path,
    formats: Sequence[str] = ("onnx",),
    target: str | None = None,
    reparameterize: bool = True,
    decompose: bool = True,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    onnx_options: dict[str, Any] | None = None,
    extra_inputs: Sequence[Inputs] | None = None,
    strict: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Manifest:
    """Export ``model`` to every format in ``formats`` under ``out_dir`` and verify the files.

    ``target`` selects a target profile for the formats that accept it (``"om"`` for Caffe);
    other formats use their own profile. The reference outputs come from the model as given
    (before fusion), so a fusion or decomposition error shows up as a verification failure.
    With ``strict=True`` a failed verification raises :class:`VerificationError` after the
    directory (and its manifest, marked failed) is in place.
    """
    formats = list(dict.fromkeys(formats))
    if not formats:
        raise ValueError("formats is empty: name at least one of onnx, caffe, msnhnet")
    out_dir = Path(out_dir)
    inputs = as_input_tuple(example_input)
    original = deploy_copy(model)
    check_runs(original, inputs)
    samples = verification_samples(inputs, extra_inputs)
    references = [torch_outputs(original, s) for s in samples]

    deploy_model = original
    if reparameterize:
        from deployplug.reparam import reparameterize as fuse

        deploy_model = fuse(copy.deepcopy(original), inplace=True)

    profiles = {fmt: resolve_target(fmt, target) for fmt in formats}
    staging = _staging_dir(out_dir)
    try:
        records: dict[str, FormatRecord] = {}
        legal_models: dict[str, nn.Module] = {}
        for fmt, profile in profiles.items():
            legal, rewrites = _legal_model(deploy_model, profile, inputs, decompose)
            legal_models[fmt] = legal
            options = (onnx_options or {}) if fmt == "onnx" else {}
            try:
                records[fmt] = get_exporter(fmt).write(legal, inputs, staging, profile, **options)
            except DeployError:
                raise
            except Exception as exc:
                raise ExportFailedError(fmt, f"{type(exc).__name__}: {exc}") from exc
            records[fmt].info["decomposed"] = rewrites

        save_reference(staging / REFERENCE_FILE, samples, references)
        report = None
        if verify:
            report = VerifyReport(tolerance=tolerance)
            for record in records.values():
                compare_format(staging, record, samples, references, tolerance, "recorded",
                               report)
                if not report.format_passed(record.format):
                    locate_divergence(staging, record, legal_models[record.format], samples[0],
                                      tolerance, report)

        files = [f for r in records.values() for f in r.files] + [REFERENCE_FILE]
        manifest = Manifest(
            dir=staging,
            formats={fmt: r.to_dict() for fmt, r in records.items()},
            inputs=[{"name": n, "shape": list(t.shape), "dtype": str(t.dtype)}
                    for n, t in zip(_input_names(records, len(inputs)), inputs, strict=True)],
            outputs=[{"index": j, "shape": list(o.shape), "dtype": str(o.dtype)}
                     for j, o in enumerate(references[0])],
            stages={"reparameterize": reparameterize, "decompose": decompose, "verify": verify},
            tolerance=tolerance,
            verification=report,
            files=describe_files(staging, files),
            extra=dict(metadata or {}),
        )
        manifest.write()
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.dir = out_dir
    if strict and report is not None and not report.passed:
        raise VerificationError(report)
    return manifest


def _input_names(records: dict[str, FormatRecord], count: int) -> list[str]:
    onnx_record = records.get("onnx")
    if onnx_record and "input_names" in onnx_record.info:
        return list(onnx_record.info["input_names"])
    return ["input"] if count == 1 else [f"input{i}" for i in range(count)]
