"""Validation parity: every exported format run over the validation set, next to PyTorch.

Verification proves each artifact on a handful of inputs; parity measures it on the data the
model is for. For every format the runtime that verified it (onnxruntime, OpenCV's Caffe
importer, the MsnhNet reference runtime) runs the validation batches, and the outputs are
compared with the trained forward (the reference) on the same batches:

* ``val_max_error``: the worst normalized error (max|a-b| / max|ref|, per batch and output)
  over the set, for any kind of output;
* when the first output is ``(batch, classes)`` scores: ``val_agreement``, the share of
  samples whose top-1 class equals PyTorch's, and, when the batches carry integer labels,
  ``val_acc`` (the reference's accuracy is ``torch/val_acc``), computed with torchmetrics.

Formats written for a fixed batch (Caffe, MsnhNet, ONNX without a dynamic batch) are fed in
chunks of that batch, the last one zero-padded and its padding dropped. Batches are gathered
into groups of bounded size so each runtime loads its files once per group, not per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deployplug.errors import ParityError
from deployplug.examples import split_batch
from deployplug.io_spec import flatten_outputs
from deployplug.numerics import normalized_error

#: Input bytes gathered before the runtimes are called (each loads its files once a group).
GROUP_BYTES = 64 << 20
#: Runs a list of samples (each a list of numpy inputs) and returns their outputs.
Runner = Callable[[list[list[np.ndarray]]], list[list[np.ndarray]]]


@dataclass
class FormatParity:
    """One format's numbers over the validation set."""

    format: str
    samples: int = 0
    batches: int = 0
    max_error: float = 0.0
    agreement: float | None = None
    accuracy: float | None = None

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/{self.format}/val_max_error": float(self.max_error)}
        if self.agreement is not None:
            out[f"{prefix}/{self.format}/val_agreement"] = float(self.agreement)
        if self.accuracy is not None:
            out[f"{prefix}/{self.format}/val_acc"] = float(self.accuracy)
        return out


@dataclass
class ParityResult:
    """Every format's :class:`FormatParity`, and the reference's own accuracy."""

    formats: dict[str, FormatParity] = field(default_factory=dict)
    reference_accuracy: float | None = None
    samples: int = 0

    def metrics(self, prefix: str = "deploy") -> dict[str, float]:
        out: dict[str, float] = {}
        for result in self.formats.values():
            out.update(result.metrics(prefix))
        if self.reference_accuracy is not None:
            out[f"{prefix}/torch/val_acc"] = float(self.reference_accuracy)
        return out

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Per format (and ``pytorch``): samples, agreement, accuracy, max error."""
        out: dict[str, dict[str, Any]] = {
            fmt: {"samples": r.samples, "agreement": r.agreement, "accuracy": r.accuracy,
                  "max_error": float(r.max_error)}
            for fmt, r in self.formats.items()}
        if self.reference_accuracy is not None:
            out["pytorch"] = {"samples": self.samples, "accuracy": self.reference_accuracy}
        return out

    def __str__(self) -> str:
        lines = [f"validation parity over {self.samples} samples"]
        for fmt, r in self.formats.items():
            agree = "-" if r.agreement is None else f"{100 * r.agreement:.2f} %"
            acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.2f} %"
            lines.append(f"  {fmt:<9} agreement {agree:>9}  accuracy {acc:>9}  "
                         f"max normalized error {r.max_error:.3e}")
        if self.reference_accuracy is not None:
            lines.append(f"  {'pytorch':<9} {'':19}  accuracy "
                         f"{100 * self.reference_accuracy:>7.2f} %")
        return "\n".join(lines)


def record_parity(manifest: Any, result: ParityResult) -> None:
    """Keep the numbers with the artifacts: ``extra.parity``, ``report.md`` and the manifest.

    Parity runs after the export landed, so the directory's report and manifest are
    rewritten in place (each replaced whole, the report first; the manifest, written last,
    vouches for the new report). Nothing else in the directory changes.
    """
    from deployplug.manifest import describe_files
    from deployplug.outdir import replace_file
    from deployplug.report_md import REPORT_FILE, render

    manifest.extra["parity"] = result.to_dict()
    directory = Path(manifest.dir)
    replace_file(directory / REPORT_FILE, render(manifest).encode("utf-8"))
    manifest.files = [f for f in manifest.files if f.get("name") != REPORT_FILE]
    manifest.files += describe_files(directory, [REPORT_FILE])
    manifest.write()


@dataclass
class _Format:
    name: str
    run: Runner
    batch: int | None  # None: any batch size runs at once
    result: FormatParity
    agree: Any = None
    acc: Any = None


def format_runner(directory: str | Path, record: dict[str, Any], fmt: str) -> Runner:
    """Run ``fmt``'s files in ``directory`` (the manifest's ``formats[fmt]`` record)."""
    from deployplug.exporters import FormatRecord
    from deployplug.runtimes import get_runner

    runner = get_runner(fmt)
    parsed = FormatRecord.from_dict(record)
    return lambda samples: runner.run_samples(Path(directory), parsed, samples)


def fixed_batch(manifest: Any, fmt: str) -> int | None:
    """The batch ``fmt``'s files take, or ``None`` when any batch size runs."""
    info = (manifest.formats.get(fmt) or {}).get("info") or {}
    if info.get("dynamic_batch") is True:
        return None
    return int(manifest.inputs[0]["shape"][0])


def validation_parity(manifest: Any, reference: nn.Module, loader: Iterable[Any],
                      formats: Sequence[str] | None = None, max_batches: int | None = None
                      ) -> ParityResult:
    """Run every format of ``manifest`` (or those named) over ``loader``; see the module doc.

    ``reference`` is the trained forward (a CPU eval module). A batch whose per-sample shape
    differs from the export's, an artifact that fails to run, or outputs that do not line up
    with the reference's raise :class:`ParityError` naming the format and the batch.
    """
    names = list(manifest.formats) if formats is None else list(formats)
    missing = [f for f in names if f not in manifest.formats]
    if missing:
        raise ParityError(f"no {missing} artifact in {manifest.dir}; it holds "
                          f"{list(manifest.formats)}")
    runs = [_Format(f, format_runner(manifest.dir, manifest.formats[f], f),
                    fixed_batch(manifest, f), FormatParity(f)) for f in names]
    shapes = [tuple(int(d) for d in i["shape"]) for i in manifest.inputs]
    return _measure(runs, reference, loader, shapes, max_batches)


def onnx_parity(onnx_path: str | Path, network: nn.Module, loader: Iterable[Any],
                prefix: str = "deploy", max_batches: int | None = None) -> dict[str, float]:
    """Parity of one ONNX file (no manifest needed), as logger metrics.

    The batch the file takes is read from its first input; the per-sample shape from the
    first batch of ``loader``.
    """
    from deployplug.runtimes.onnxruntime import make_session

    session = make_session(Path(onnx_path))
    feeds = session.get_inputs()
    names = [i.name for i in feeds]
    first = feeds[0].shape[0]
    batch = first if isinstance(first, int) and first > 0 else None

    def run(samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        return [list(session.run(None, dict(zip(names, s, strict=True)))) for s in samples]

    result = _measure([_Format("onnx", run, batch, FormatParity("onnx"))], network, loader,
                      None, max_batches, count=len(names))
    return result.metrics(prefix)


# --------------------------------------------------------------------------- measurement

@dataclass
class _Pending:
    inputs: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    labels: list[torch.Tensor | None] = field(default_factory=list)
    bytes: int = 0


def _measure(runs: list[_Format], reference: nn.Module, loader: Iterable[Any],
             shapes: Sequence[tuple[int, ...]] | None, max_batches: int | None,
             count: int | None = None) -> ParityResult:
    if loader is None:
        raise ParityError("validation parity needs a validation dataloader; there is none")
    count = len(shapes) if shapes is not None else (count or 1)
    result = ParityResult(formats={r.name: r.result for r in runs})
    reference_acc: Any = None
    pending = _Pending()
    state = {"classes": None, "labelled": True}

    def flush() -> None:
        nonlocal reference_acc
        if not pending.inputs:
            return
        refs = [_reference_outputs(reference, x) for x in pending.inputs]
        for run in runs:
            outs = _run_format(run, pending.inputs)
            for index, (got, want, labels) in enumerate(zip(outs, refs, pending.labels)):
                _score(run, got, want, labels, state, result.samples + index)
        for want, labels in zip(refs, pending.labels):
            classes = state["classes"]
            if classes and labels is not None and state["labelled"]:
                if reference_acc is None:
                    reference_acc = _accuracy(classes)
                reference_acc.update(want[0], labels)
        result.samples += sum(x[0].shape[0] for x in pending.inputs)
        pending.inputs.clear()
        pending.labels.clear()
        pending.bytes = 0

    seen = 0
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        try:
            inputs, labels = split_batch(batch, count)
        except ValueError as exc:
            raise ParityError(f"validation batch {index}: {exc}") from None
        arrays = tuple(t.detach().to("cpu", torch.float32).numpy() for t in inputs)
        if shapes is not None:
            _check_shapes(arrays, shapes, index)
        pending.inputs.append(arrays)
        pending.labels.append(None if labels is None else labels.detach().cpu().long())
        pending.bytes += sum(a.nbytes for a in arrays)
        seen += 1
        if pending.bytes >= GROUP_BYTES:
            flush()
    flush()
    if seen == 0:
        raise ParityError("the validation dataloader is empty")
    for run in runs:
        run.result.batches = seen
        run.result.samples = result.samples
        if run.agree is not None:
            run.result.agreement = float(run.agree.compute())
        if run.acc is not None and state["labelled"]:
            run.result.accuracy = float(run.acc.compute())
    if reference_acc is not None and state["labelled"]:
        result.reference_accuracy = float(reference_acc.compute())
    return result


def _check_shapes(arrays: tuple[np.ndarray, ...], shapes: Sequence[tuple[int, ...]],
                  index: int) -> None:
    got = [tuple(a.shape[1:]) for a in arrays]
    want = [s[1:] for s in shapes]
    sizes = {a.shape[0] for a in arrays}
    if got != want or len(sizes) != 1:
        raise ParityError(
            f"validation batch {index} has per-sample input shape(s) {got}, the export takes "
            f"{want}: the artifacts are written for one input size, so parity can only run on "
            "validation data of that size")


def _reference_outputs(reference: nn.Module, inputs: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = reference(*(torch.from_numpy(a) for a in inputs))
    return [t.detach().cpu() for t in flatten_outputs(out)]


def _chunks(inputs: tuple[np.ndarray, ...], batch: int | None) -> list[list[np.ndarray]]:
    """``inputs`` cut into runnable pieces: whole, or ``batch`` rows with zero padding."""
    if batch is None:
        return [list(inputs)]
    rows = inputs[0].shape[0]
    pieces = []
    for start in range(0, rows, batch):
        piece = []
        for a in inputs:
            part = a[start:start + batch]
            if part.shape[0] < batch:
                pad = np.zeros((batch - part.shape[0], *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, pad])
            piece.append(np.ascontiguousarray(part))
        pieces.append(piece)
    return pieces


def _run_format(run: _Format, groups: list[tuple[np.ndarray, ...]]) -> list[list[np.ndarray]]:
    """The format's outputs for every batch of ``groups``, chunks joined and padding cut."""
    plans = [_chunks(x, run.batch) for x in groups]
    flat = [piece for plan in plans for piece in plan]
    try:
        outputs = run.run(flat)
    except Exception as exc:
        raise ParityError(f"running the {run.name} artifact over the validation set failed "
                          f"with {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    joined, at = [], 0
    for x, plan in zip(groups, plans):
        rows = x[0].shape[0]
        parts = outputs[at:at + len(plan)]
        at += len(plan)
        if run.batch is None or run.batch == rows:  # run as it is: nothing to join or cut
            joined.append([np.asarray(o) for o in parts[0]])
            continue
        per_output = []
        for j in range(len(parts[0])):
            if any(np.ndim(p[j]) == 0 or np.shape(p[j])[0] != run.batch for p in parts):
                raise ParityError(
                    f"{run.name} output {j} has no leading batch dimension of {run.batch}, so "
                    "chunks of the validation batch cannot be joined; use validation batches "
                    f"of exactly {run.batch} sample(s)")
            per_output.append(np.concatenate([p[j] for p in parts])[:rows])
        joined.append(per_output)
    return joined


def _score(run: _Format, got: list[np.ndarray], want: list[torch.Tensor],
           labels: torch.Tensor | None, state: dict[str, Any], first_sample: int) -> None:
    if len(got) != len(want):
        raise ParityError(f"the {run.name} artifact returns {len(got)} output(s), the trained "
                          f"forward {len(want)}")
    for j, (a, r) in enumerate(zip(got, want)):
        if tuple(np.shape(a)) != tuple(r.shape):
            raise ParityError(
                f"{run.name} output {j} has shape {list(np.shape(a))} on the validation batch "
                f"starting at sample {first_sample}, the trained forward {list(r.shape)}")
        run.result.max_error = max(run.result.max_error, normalized_error(a, r.numpy()))
    scores = want[0]
    if scores.ndim != 2 or scores.shape[1] < 2 or not scores.is_floating_point():
        state["classes"] = None
        return
    classes = int(scores.shape[1])
    state["classes"] = classes
    if run.agree is None:
        run.agree = _accuracy(classes)
    got_scores = torch.from_numpy(np.ascontiguousarray(got[0])).float()
    run.agree.update(got_scores, scores.argmax(1))
    if labels is None or labels.numel() == 0 or int(labels.min()) < 0 \
            or int(labels.max()) >= classes:
        state["labelled"] = False
        return
    if run.acc is None:
        run.acc = _accuracy(classes)
    run.acc.update(got_scores, labels)


def _accuracy(classes: int) -> Any:
    """Top-1 accuracy accumulated over batches; never synced (it runs on one rank)."""
    from torchmetrics.classification import MulticlassAccuracy

    return MulticlassAccuracy(num_classes=classes, average="micro", sync_on_compute=False)
