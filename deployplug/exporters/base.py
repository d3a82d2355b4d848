"""The contract every artifact format implements: write files, and run them back.

Keeping ``write`` and ``run`` side by side means a format cannot be added without a way to
check it: the pipeline writes, then verification calls ``run`` on the files it just wrote
(and later on the same directory, without the model).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from deployplug.profiles import TargetProfile


@dataclass
class FormatRecord:
    """What one exporter wrote: file names relative to the artifact directory, and facts.

    ``info`` is format specific (opset and exporter for ONNX, layer counts for Caffe...) and
    must be JSON-serializable: it is stored in the manifest and handed back to ``run``.
    """

    format: str
    target: str
    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FormatRecord:
        return cls(
            format=data["format"],
            target=data["target"],
            files=list(data["files"]),
            info=dict(data.get("info", {})),
        )


class Exporter(abc.ABC):
    """One artifact format. Subclasses are registered in :mod:`deployplug.exporters`."""

    format: ClassVar[str]
    #: the target profile used when the caller names none
    default_target: ClassVar[str]
    #: targets whose legal models this format can lower
    accepted_targets: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    def write(
        self,
        model: nn.Module,
        example_inputs: Sequence[torch.Tensor],
        out_dir: Path,
        target: TargetProfile,
        **options: Any,
    ) -> FormatRecord:
        """Write this format's files for ``model`` (eval mode, CPU, already target-legal).

        ``options["graph"]``, when given, is ``model`` already captured on
        ``example_inputs`` (:class:`~deployplug.capture.Graph`); writers that lower a graph use
        it instead of capturing the model again.
        """

    @abc.abstractmethod
    def run(
        self, out_dir: Path, record: FormatRecord, inputs: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """Execute the written files in this format's runtime and return every output."""

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        """Run every sample; formats override this to load their files once for all of them."""
        return [self.run(out_dir, record, inputs) for inputs in samples]

    def first_divergence(
        self,
        out_dir: Path,
        record: FormatRecord,
        model: nn.Module,
        inputs: Sequence[np.ndarray],
        tolerance: float,
    ) -> str | None:
        """Name the first layer whose output departs from PyTorch, when the format can tell."""
        return None
