"""``manifest.json``: what was exported, from what, with which tools, and whether it verified.

The manifest is written last, so its presence means the directory is complete. It records
each file's sha256 so a copied or tampered artifact can be told from the verified one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from deployplug.errors import ArtifactFormatError
from deployplug.verify_report import VerifyReport, describe_judgement

MANIFEST_FILE = "manifest.json"
_TRACKED_PACKAGES = ("deployplug", "torch", "pytorch-lightning", "onnx", "onnxruntime",
                     "onnxscript", "opencv-python-headless", "protobuf", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> list[dict[str, Any]]:
    return [
        {"name": n, "bytes": (directory / n).stat().st_size, "sha256": sha256(directory / n)}
        for n in names
    ]


@dataclass
class Manifest:
    """The record of one artifact directory (see :func:`deployplug.pipeline.export`)."""

    dir: Path
    formats: dict[str, dict[str, Any]]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    stages: dict[str, bool]
    tolerance: float
    verification: VerifyReport | None
    files: list[dict[str, Any]] = field(default_factory=list)
    #: formats requested but not landed here, with the reason (their files are in ``.failed``)
    failed_formats: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True only when verification ran and every artifact matched PyTorch."""
        return self.verification is not None and self.verification.passed

    def artifact(self, fmt: str) -> Path:
        """The main file of a format (``model.onnx``, ``model.prototxt``, ``model.msnhnet``)."""
        try:
            return self.dir / self.formats[fmt]["files"][0]
        except KeyError:
            raise KeyError(f"no {fmt!r} artifact in {self.dir}; formats: {list(self.formats)}"
                           ) from None

    def metrics(self, prefix: str = "deploy") -> dict[str, float]:
        """Flat numbers for loggers: ``deploy/<fmt>/max_error`` and ``deploy/<fmt>/passed``."""
        out: dict[str, float] = {}
        for fmt in self.formats:
            if self.verification is None:
                continue
            out[f"{prefix}/{fmt}/max_error"] = self.verification.max_error(fmt)
            out[f"{prefix}/{fmt}/passed"] = float(self.verification.format_passed(fmt))
            judged = self.verification.judgements.get(fmt)
            if judged is not None:  # int8: decisions on the evaluation batches
                for key, name in (("agreement", "val_agreement"), ("int8_accuracy", "val_acc"),
                                  ("fp32_accuracy", "fp32_val_acc"), ("drop", "drop")):
                    if isinstance(judged.get(key), (int, float)):
                        out[f"{prefix}/{fmt}/{name}"] = float(judged[key])
        counts = (self.extra.get("reparameterize") or {}).get("op_counts") or {}
        for phase, ops in counts.items():  # conv / batch_norm / add before and after fusion
            for op, n in (ops or {}).items():
                if isinstance(n, (int, float)):
                    out[f"{prefix}/reparam/{phase}/{op}"] = float(n)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "created": self.created,
            "stages": self.stages,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "formats": self.formats,
            "files": self.files,
            "tolerance": self.tolerance,
            "verification": None if self.verification is None else self.verification.to_dict(),
            "failed_formats": dict(self.failed_formats),
            "versions": self.versions,
            **({"extra": self.extra} if self.extra else {}),
        }

    def write(self) -> Path:
        """Write ``manifest.json``, replacing any previous one whole (never half-written)."""
        from deployplug.outdir import replace_file

        path = self.dir / MANIFEST_FILE
        replace_file(path, (json.dumps(self.to_dict(), indent=2, default=str) + "\n").encode())
        return path

    def __str__(self) -> str:
        lines = [f"deployplug artifacts in {self.dir}"]
        lines.append(f"{'format':<10}{'target':<10}{'verified':<10}{'max error':>12}  files")
        for fmt, rec in self.formats.items():
            ok = "-" if self.verification is None else (
                "yes" if self.verification.format_passed(fmt) else "NO")
            err = "" if self.verification is None else f"{self.verification.max_error(fmt):.3e}"
            lines.append(f"{fmt:<10}{rec['target']:<10}{ok:<10}{err:>12}  "
                         + ", ".join(rec["files"]))
        if self.verification is not None:
            for fmt, judged in self.verification.judgements.items():
                lines.append(f"{fmt}: {describe_judgement(judged)}")
                info = (self.formats.get(fmt) or {}).get("info") or {}
                if isinstance(info.get("repair"), str):
                    lines.append(f"{fmt}: repair {info['repair']}, weights "
                                 f"{info.get('weights')}")
                if isinstance(info.get("readiness"), str):
                    lines.append(f"{fmt}: {info['readiness']}")
        stages = ", ".join(k for k, v in self.stages.items() if v) or "none"
        lines.append(f"stages: {stages}; tolerance {self.tolerance:g}; "
                     f"result: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def load_manifest(directory: Path) -> Manifest:
    """Read ``directory/manifest.json`` as untrusted input.

    The file is size-capped, must be UTF-8 JSON of the documented shape
    (:mod:`deployplug.manifest_schema`), and is never followed through a symlink; anything else
    is an :class:`ArtifactFormatError` naming the field. Nothing in it is trusted beyond its
    type: :func:`deployplug.verify` checks the files it lists before reading them.
    """
    from deployplug.manifest_schema import read_manifest_json

    path = Path(directory) / MANIFEST_FILE
    if not os.path.lexists(path):
        raise ArtifactFormatError(
            f"{path} not found: not a deployplug artifact directory (or an export did not finish)"
        )
    data = read_manifest_json(path)
    verification = data.get("verification")
    try:
        report = None if verification is None else VerifyReport.from_dict(verification)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactFormatError(f"{MANIFEST_FILE}: field 'verification' is malformed: "
                                  f"{type(exc).__name__}: {exc}") from None
    return Manifest(
        dir=Path(directory),
        formats=data["formats"],
        inputs=data["inputs"],
        outputs=data["outputs"],
        stages=data["stages"],
        tolerance=float(data["tolerance"]),
        verification=report,
        files=data.get("files", []),
        failed_formats=dict(data.get("failed_formats", {})),
        versions=data.get("versions", {}),
        created=data.get("created", ""),
        extra=data.get("extra", {}),
    )
