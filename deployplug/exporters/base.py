"""The contract every artifact format implements: write files and say what was written.

Exporters only write. Running the files back is the job of a runner in
:mod:`deployplug.runtimes`, keyed by the same format name, so the writers never import a
runtime and a runtime reads only what the :class:`FormatRecord` and the files say.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
    #: the captured graph that was lowered, kept in memory only (never in the manifest), so a
    #: layer-by-layer comparison right after writing does not depend on the model it is handed
    graph: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "target": self.target, "files": list(self.files),
                "info": copy.deepcopy(self.info)}

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
    #: judged by its decisions on real inputs (int8), not by a normalized tolerance
    statistical: ClassVar[bool] = False

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
