"""Statistical verification of int8 artifacts: judged by decisions on real inputs, re-checkable.

An int8 file never matches fp32 to a normalized tolerance, so its verdict is top-1 agreement
and accuracy drop on real evaluation batches (:mod:`deployplug.quant.verdict`). To keep a
directory re-verifiable without the training data, the export stores (a bounded number of)
those batches, the trained forward's outputs on them and the labels in ``int8_eval.npz``,
listed in the manifest like every other file; :func:`judge_directory` reads it back as
untrusted input (:mod:`deployplug.reference_file`) and judges the file again.

The drop limit is the caller's, like the tolerance of the exact formats: the manifest's value
is only reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.errors import ArtifactFormatError
from deployplug.exporters.base import FormatRecord
from deployplug.quant.calibration import Batches
from deployplug.quant.verdict import DEFAULT_MAX_DROP, Int8Judgement, judge
from deployplug.reference_file import read_reference, write_reference
from deployplug.runtimes import get_runner
from deployplug.verify_report import VerifyReport

EVAL_FILE = "int8_eval.npz"


def keep_samples(evaluation: Batches, references: Sequence[Sequence[np.ndarray]],
                 labels: np.ndarray | None, max_samples: int
                 ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """The first ``max_samples`` evaluation samples, their references and labels.

    Labels travel as one more output array per batch, so the file needs no member kind of its
    own; the format record says whether they are there (``eval_labels``).
    """
    samples: list[list[np.ndarray]] = []
    outputs: list[list[np.ndarray]] = []
    taken = 0
    for batch, refs in zip(evaluation.numpy(), references, strict=True):
        room = max_samples - taken
        if room <= 0:
            break
        n = min(room, int(batch[0].shape[0]))
        samples.append([a[:n] for a in batch])
        row = [np.asarray(r)[:n] for r in refs]
        if labels is not None:
            row.append(np.asarray(labels[taken:taken + n], dtype=np.int64))
        outputs.append(row)
        taken += n
    return samples, outputs


def write_eval_file(directory: Path, evaluation: Batches,
                    references: Sequence[Sequence[np.ndarray]], labels: np.ndarray | None,
                    max_samples: int) -> dict[str, Any]:
    """Write ``int8_eval.npz``; returns what the format record keeps about it."""
    samples, outputs = keep_samples(evaluation, references, labels, max_samples)
    if not samples:
        return {"eval_file": None}
    write_reference(Path(directory) / EVAL_FILE, samples, outputs)
    return {"eval_file": EVAL_FILE, "eval_labels": labels is not None,
            "eval_samples": int(sum(int(s[0].shape[0]) for s in samples))}


def judge_files(directory: Path, record: FormatRecord, samples: Sequence[Sequence[np.ndarray]],
                references: Sequence[Sequence[np.ndarray]], labels: np.ndarray | None,
                max_drop: float) -> Int8Judgement:
    """Run the int8 file on every batch and judge its decisions against ``references``."""
    outputs = get_runner(record.format).run_samples(Path(directory), record, samples)
    return judge(outputs, references, labels, max_drop)


def read_eval_file(directory: Path, record: FormatRecord, inputs: Sequence[Mapping[str, Any]],
                   outputs: Sequence[Mapping[str, Any]]
                   ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]], np.ndarray | None]:
    """``(samples, references, labels)`` from ``int8_eval.npz``, checked against the manifest.

    Batch sizes are free; everything else (array counts, per-sample shapes, dtypes, label
    count) must be what the manifest's inputs and outputs say.
    """
    name = record.info.get("eval_file")
    if name != EVAL_FILE or EVAL_FILE not in record.files:
        raise ArtifactFormatError(f"{record.format}: the record names no {EVAL_FILE} to judge "
                                  "the int8 file on; re-export it")
    with_labels = record.info.get("eval_labels") is True
    samples, stored = read_reference(Path(directory) / EVAL_FILE)
    n_out = len(outputs) + (1 if with_labels else 0)
    references: list[list[np.ndarray]] = []
    labels: list[np.ndarray] = []
    for k, (ins, outs) in enumerate(zip(samples, stored, strict=True)):
        where = f"{EVAL_FILE} batch {k}"
        if len(ins) != len(inputs) or len(outs) != n_out:
            raise ArtifactFormatError(f"{where}: {len(ins)} inputs and {len(outs)} outputs, "
                                      f"the manifest needs {len(inputs)} and {n_out}")
        batch = int(ins[0].shape[0]) if ins[0].ndim else -1
        for kind, arrays, specs in (("input", ins, inputs), ("output", outs, outputs)):
            for i, spec in enumerate(specs):
                want = tuple(int(d) for d in spec["shape"][1:])
                got = arrays[i]
                if got.ndim < 1 or got.shape[0] != batch or tuple(got.shape[1:]) != want \
                        or got.dtype.kind != "f":
                    raise ArtifactFormatError(
                        f"{where}: {kind} {i} is {got.dtype} {list(got.shape)}, expected "
                        f"float [{batch}, {', '.join(map(str, want))}]")
        if with_labels:
            y = outs[-1]
            if y.dtype.kind not in "iu" or y.shape != (batch,):
                raise ArtifactFormatError(f"{where}: labels are {y.dtype} {list(y.shape)}, "
                                          f"expected {batch} integers")
            labels.append(y)
        references.append(list(outs[:len(outputs)]))
    return samples, references, (np.concatenate(labels) if with_labels else None)


def judge_directory(directory: Path, record: FormatRecord, inputs: Sequence[Mapping[str, Any]],
                    outputs: Sequence[Mapping[str, Any]], model: nn.Module | None,
                    max_drop: float | None, report: VerifyReport) -> None:
    """Judge one int8 format of an artifact directory into ``report.judgements``.

    Against the stored fp32 outputs, and with ``model`` also against fresh outputs of it on
    the same batches; the verdict kept is the failing one when they differ (a file that
    agrees with a stale reference but not with the model is not what was trained).
    """
    limit = DEFAULT_MAX_DROP if max_drop is None else float(max_drop)
    if not math.isfinite(limit) or not 0.0 <= limit < 1.0:
        raise ValueError(f"int8_max_drop must be a fraction in [0, 1), got {max_drop!r}")
    try:
        samples, references, labels = read_eval_file(directory, record, inputs, outputs)
        verdicts = [("recorded", judge_files(directory, record, samples, references, labels,
                                             limit))]
        if model is not None:
            fresh = [_forward(model, s) for s in samples]
            verdicts.append(("model", judge_files(directory, record, samples, fresh, labels,
                                                  limit)))
    except Exception as exc:  # a file that cannot be read or run is a failed check
        report.failures[record.format] = f"{type(exc).__name__}: {exc}"
        return
    source, verdict = next(((s, v) for s, v in verdicts if not v.passed), verdicts[-1])
    report.judgements[record.format] = {**verdict.to_dict(), "source": source}


@torch.no_grad()
def _forward(model: nn.Module, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    from deployplug.io_spec import flatten_outputs

    out = model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)]


__all__ = ["EVAL_FILE", "judge_directory", "judge_files", "read_eval_file", "write_eval_file"]
