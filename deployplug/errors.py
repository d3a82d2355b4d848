"""Typed errors that tell the user what went wrong, where, and what to do about it.

Every error raised by a pipeline stage derives from :class:`DeployError`, so callers (the
Lightning callback in particular) can catch deployment failures without also swallowing
programming errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployplug.verify_report import VerifyReport


class DeployError(RuntimeError):
    """Base class of every deployplug failure that concerns the user's model or files.

    An export that fails for some formats still lands the ones that passed; the error then
    carries the manifest of what landed (``manifest``, or None) and the directory holding the
    failed formats' files for debugging (``failed_dir``, or None).
    """

    manifest: Any = None
    failed_dir: Any = None


@dataclass(frozen=True)
class OffendingOp:
    """One op a target cannot run, with enough context to act on it."""

    op: str
    module_path: str
    target: str
    reason: str
    suggestions: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        where = self.module_path or "<top-level forward>"
        text = f"{self.op} at '{where}' (target {self.target}): {self.reason}"
        if self.suggestions:
            text += "; options: " + "; ".join(self.suggestions)
        return text


class UnsupportedOpError(DeployError):
    """Raised with *every* op a target cannot run, not just the first one found.

    Reporting all of them at once saves the edit-export-fail loop that older converters
    force on their users.
    """

    def __init__(self, offenders: list[OffendingOp] | tuple[OffendingOp, ...]):
        self.offenders = tuple(offenders)
        lines = [f"{len(self.offenders)} op(s) cannot be converted:"]
        lines += [f"  - {o.describe()}" for o in self.offenders]
        super().__init__("\n".join(lines))


class OpAttributeError(DeployError, ValueError):
    """An op attribute has a form no normalisation rule covers (a 3-element 2-D padding...).

    Also a :class:`ValueError`, so a target check that meets one reports the node as refused
    with this message instead of guessing a value.
    """


class CaptureError(DeployError):
    """The model could not be turned into a static graph (``torch.export`` failed)."""


class BatchNormStatsError(DeployError):
    """A BatchNorm without running statistics cannot be folded into a convolution."""


class ExportFailedError(DeployError):
    """An exporter (torch.onnx, the Caffe or MsnhNet writer) failed for a given format."""

    def __init__(self, fmt: str, message: str):
        self.format = fmt
        super().__init__(f"[{fmt}] {message}")


class ArtifactFormatError(DeployError):
    """An artifact on disk is malformed or uses a construct its runtime rejects."""


class VerificationError(DeployError):
    """An artifact's outputs disagree with PyTorch beyond the tolerance."""

    def __init__(self, report: VerifyReport | Any):
        self.report = report
        super().__init__(f"verification failed:\n{report}")


class InputShapeError(DeployError):
    """The example input does not fit the model (wrong rank, channels or size)."""


class OutputDirectoryError(DeployError):
    """The artifact directory cannot be created or replaced."""


class IntegrityError(ArtifactFormatError):
    """An artifact directory does not match its manifest (names, file types, sizes, sha256).

    Raised (or recorded in a :class:`~deployplug.verification.VerifyReport`) *before* any
    artifact is run: numbers computed from files nobody can vouch for prove nothing.
    """

    #: the report the check filled in, when :func:`deployplug.verify` raised this
    report: VerifyReport | None = None


class ReparameterizationError(DeployError):
    """Fusion changed what a block computes; names the first block whose output moved."""


class CheckpointLoadError(DeployError):
    """A checkpoint cannot be loaded safely (it needs full unpickling, or it is malformed)."""


class ParityError(DeployError):
    """Running an artifact over the validation set failed (not the export itself)."""


class ModuleMismatchError(DeployError):
    """The module to be exported does not compute what the trained forward computes."""


class ConfigError(DeployError, ValueError):
    """A setting, config file or command-line value cannot be used; names the setting.

    Also a :class:`ValueError`, the error a bad argument has always raised.
    """
