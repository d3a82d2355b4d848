"""Build one int8 ONNX file: fp32 graph, report, repair candidates, the one that is kept.

Every candidate is a real file quantized by onnxruntime's quantization tools. When the caller
hands over a runner (an object with ``run_samples(dir, record, samples)``, such as
``deployplug.runtimes.get_runner("onnx_int8")``), each candidate is run on the evaluation
batches and judged against the fp32 model (:mod:`.verdict`); that is how ``auto`` picks one.
The writer never imports a runtime itself: whoever may run files passes the runner in. The
simulation (:mod:`.report`) only decides which layers a ``keep_float`` candidate keeps. Work
happens in a scratch directory the caller owns; only the chosen file is copied out.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from deployplug.exporters.base import FormatRecord
from deployplug.onnx_model import load_checked
from deployplug.quant.calibration import Batches
from deployplug.quant.equalization import EqualizationRecord, equalize
from deployplug.quant.ort_quant import SETTINGS, float_weight_nodes, nodes_for, quantize
from deployplug.quant.repair import Plan
from deployplug.quant.report import Granularity, Int8Report, build_report, layers_by_path
from deployplug.quant.verdict import Int8Judgement, judge


class Runner(Protocol):
    """What runs a candidate file: the ``onnx_int8`` runner of :mod:`deployplug.runtimes`."""

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]: ...


@dataclass
class Variant:
    """The fp32 model a group of candidates quantizes (plain or equalized)."""

    model: nn.Module
    onnx_path: Path
    input_names: list[str]
    report: Int8Report
    cache: Path
    equalization: EqualizationRecord | None = None
    #: layers picked greedily by measuring real int8 files (see ``Builder.measured_ranking``)
    measured: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Candidate:
    """One quantized file and its verdict on the evaluation batches (None: not run)."""

    plan: Plan
    float_layers: list[str]
    float_nodes: list[str]
    judgement: Int8Judgement | None
    path: Path

    def summary(self) -> dict[str, Any]:
        j = self.judgement
        row: dict[str, Any] = {"repair": self.plan.name, "float_layers": list(self.float_layers)}
        if j is not None:
            row.update(passed=j.passed, agreement=j.agreement, drop=j.drop,
                       int8_accuracy=j.int8_accuracy)
        return row


@dataclass
class Int8Build:
    """The chosen candidate, every candidate tried, and the reports behind the choice."""

    chosen: Candidate
    tried: list[Candidate]
    variants: dict[str, Variant] = field(default_factory=dict)

    def report_dict(self) -> dict[str, Any]:
        out = {}
        for name, v in self.variants.items():
            out[name] = v.report.to_dict()
            if v.measured:
                out[name]["measured_float_ranking"] = [dict(r) for r in v.measured]
        return out


@dataclass
class BuildSettings:
    """What the caller asked for."""

    weights: Granularity
    max_drop: float
    top_k: int
    sensitivity_samples: int | None
    input_names: list[str] | None = None
    output_names: list[str] | None = None


class Builder:
    """Creates variants on demand and judges candidates against the fp32 outputs."""

    def __init__(self, model: nn.Module, calibration: Batches, evaluation: Batches,
                 labels: np.ndarray | None, settings: BuildSettings, scratch: Path,
                 source_model: nn.Module | None = None, runner: Runner | None = None):
        self.model, self.calibration, self.evaluation = model, calibration, evaluation
        self.labels, self.settings, self.scratch = labels, settings, scratch
        self.source_model, self.runner = source_model, runner
        self.variants: dict[str, Variant] = {}
        self.references = ([_torch_outputs(model, b) for b in evaluation]
                           if runner is not None else [])

    def variant(self, equalized: bool) -> Variant:
        key = "equalized" if equalized else "plain"
        if key not in self.variants:
            self.variants[key] = self._make_variant(key, equalized)
        return self.variants[key]

    def _make_variant(self, key: str, equalized: bool) -> Variant:
        from deployplug.quant.branches import collect_branches

        started = time.perf_counter()
        record = None
        model = self.model
        if equalized:
            model, record = equalize(self.model, list(self.calibration.head(64)))
        # Equalized weights are no longer the branches' sum, so only the plain variant is
        # attributed to training-time branches.
        branches, skipped = ({}, {}) if self.source_model is None or equalized else (
            collect_branches(self.source_model, model))
        report = build_report(model, self.calibration, self.settings.weights,
                              self.settings.top_k, branches, skipped, started,
                              self.settings.sensitivity_samples)
        directory = self.scratch / key
        directory.mkdir()
        path, names = _export_fp32(model, self.calibration.first_sample(), directory,
                                   self.settings.input_names, self.settings.output_names)
        return Variant(model, path, names, report, directory / "calibration.json", record)

    def measured_ranking(self, variant: Variant, count: int) -> list[str]:
        """The ``count`` layers whose float weights bring the real int8 file closest to fp32.

        Picked greedily, each together with the ones already picked, by quantizing the file
        with onnxruntime (calibration ranges cached) and measuring the KL divergence of its
        class scores from the fp32 model's on all calibration batches (a run of a file is
        cheap next to the simulation, and fewer samples made the picks noisy). The simulated
        ranking of the report is a cheap estimate; this measures the file that will ship,
        which matters when the damage is spread over many similar layers (on the digits
        recipe the measured picks recovered 62-74 % of the per-tensor drop where the
        simulated ones recovered 46-67 %). Without a runner, or for outputs without a class
        axis, the report's ranking is used. Costs about ``count x layers`` quantize-and-run
        passes; the picks are kept, so a larger count extends a smaller one.
        """
        ranking = variant.report.ranking()
        if self.runner is None or len(variant.measured) >= count:
            return ([str(r["path"]) for r in variant.measured[:count]]
                    if variant.measured else ranking[:count])
        samples = self.calibration
        with torch.no_grad():
            references = [_torch_outputs(variant.model, b) for b in samples]
        if references[0][0].ndim != 2 or references[0][0].shape[1] < 2:
            return ranking[:count]
        proto = load_checked(variant.onnx_path)[0]
        picked = [str(r["path"]) for r in variant.measured]
        while len(picked) < count:
            scores = {path: self._divergence(variant, proto, [*picked, path], samples,
                                             references)
                      for path in ranking if path not in picked}
            best = min(scores, key=lambda path: (scores[path], ranking.index(path)))
            picked.append(best)
            variant.measured.append({"path": best, "kl": scores[best]})
        return picked

    def _divergence(self, variant: Variant, proto: Any, keep: list[str], samples: Batches,
                    references: list[list[np.ndarray]]) -> float:
        path = self.scratch / "measure.onnx"
        quantize(variant.onnx_path, path, self.calibration, variant.input_names,
                 per_channel=self.settings.weights == "per_channel",
                 exclude_nodes=nodes_for(proto, keep), cache_path=variant.cache)
        assert self.runner is not None
        record = FormatRecord("onnx_int8", "onnx", [path.name])
        outputs = self.runner.run_samples(self.scratch, record, samples.numpy())
        return float(np.mean([_kl(o[0], r[0]) for o, r in zip(outputs, references,
                                                               strict=True)]))

    def candidate(self, plan: Plan, index: int) -> Candidate:
        variant = self.variant(plan.equalize)
        if plan.float_paths:
            layers = layers_by_path(variant.report, plan.float_paths)
        else:
            layers = self.measured_ranking(variant, plan.float_count)
        nodes = nodes_for(load_checked(variant.onnx_path)[0], layers) if layers else []
        path = self.scratch / f"candidate{index}.onnx"
        quantize(variant.onnx_path, path, self.calibration, variant.input_names,
                 per_channel=self.settings.weights == "per_channel", exclude_nodes=nodes,
                 cache_path=variant.cache)
        _check_float_nodes(path, nodes)
        verdict = None
        if self.runner is not None:
            record = FormatRecord("onnx_int8", "onnx", [path.name])
            outputs = self.runner.run_samples(self.scratch, record, self.evaluation.numpy())
            verdict = judge(outputs, self.references, self.labels, self.settings.max_drop)
        return Candidate(plan, layers, nodes, verdict, path)


def _check_float_nodes(path: Path, expected: list[str]) -> None:
    """The quantizer must keep exactly the requested layers in float, no more, no fewer."""
    from deployplug.errors import ExportFailedError

    got = sorted(float_weight_nodes(path))
    if got != sorted(expected):
        raise ExportFailedError("onnx_int8", f"the quantized file keeps {got or 'no'} layer(s) "
                                f"with float weights where {sorted(expected) or 'none'} were "
                                "asked for; refusing a file whose precision is not the one "
                                "recorded")


def _kl(scores: np.ndarray, reference: np.ndarray) -> float:
    """Mean KL divergence of softmax(``scores``) from softmax(``reference``), per sample."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lo, lr = log_softmax(scores), log_softmax(reference)
    return float((np.exp(lr) * (lr - lo)).sum(axis=1).mean())


@torch.no_grad()
def _torch_outputs(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    from deployplug.io_spec import flatten_outputs

    return [t.detach().cpu().numpy() for t in flatten_outputs(model(*batch))]


def _export_fp32(model: nn.Module, example: tuple[torch.Tensor, ...], directory: Path,
                 input_names: list[str] | None, output_names: list[str] | None
                 ) -> tuple[Path, list[str]]:
    """The fp32 ONNX file quantization starts from, batch dimension left free."""
    from deployplug.exporters import get_exporter
    from deployplug.profiles import get_target

    record = get_exporter("onnx").write(model, example, directory, get_target("onnx"),
                                        dynamic_batch=True, input_names=input_names,
                                        output_names=output_names)
    return directory / record.files[0], list(record.info["input_names"])


def build_int8(builder: Builder, candidates: list[Plan], out_path: Path) -> Int8Build:
    """Try ``candidates`` in order, stop at the first that passes, copy it to ``out_path``.

    When none passes, the one with the smallest drop is written (the caller's verdict will
    fail it, and its files are kept for debugging with the record of every attempt). Without
    a runner only a single candidate can be built: there is nothing to choose by.
    """
    if builder.runner is None and len(candidates) != 1:
        raise ValueError("choosing among int8 candidates needs a runner to judge them")
    tried: list[Candidate] = []
    for index, plan in enumerate(candidates):
        candidate = builder.candidate(plan, index)
        tried.append(candidate)
        if candidate.judgement is None or candidate.judgement.passed:
            break
    chosen = next((c for c in tried if c.judgement is None or c.judgement.passed), None)
    if chosen is None:
        chosen = min(tried, key=lambda c: (_drop(c), len(c.float_layers)))
    shutil.copyfile(chosen.path, out_path)
    return Int8Build(chosen, tried, dict(builder.variants))


def _drop(candidate: Candidate) -> float:
    return candidate.judgement.drop if candidate.judgement is not None else float("inf")


def build_info(build: Int8Build, requested: str, calibration: Batches, judged_on: str,
               max_drop: float) -> dict[str, Any]:
    """What the manifest records about the file: settings, repair, and every attempt."""
    import onnxruntime

    chosen = build.chosen
    variant = build.variants["equalized" if chosen.plan.equalize else "plain"]
    equalization = variant.equalization.to_dict() if variant.equalization else None
    return {
        "weights": variant.report.weights,
        "repair_requested": requested,
        "repair": chosen.plan.name,
        "float_layers": list(chosen.float_layers),
        "float_ranking": ("named" if chosen.plan.float_paths else
                          "measured (onnxruntime, greedy)" if variant.measured else
                          "report (simulated)" if chosen.float_layers else None),
        "float_nodes": list(chosen.float_nodes),
        "equalization": equalization,
        "calibration_samples": calibration.samples,
        "judged_on": judged_on,
        "max_drop": max_drop,
        "selection": None if chosen.judgement is None else chosen.judgement.to_dict(),
        "tried": [c.summary() for c in build.tried],
        "quantization": dict(SETTINGS, onnxruntime=onnxruntime.__version__),
        "input_names": list(variant.input_names),
        "dynamic_batch": True,
        "readiness": build.variants["plain"].report.headline()
        if "plain" in build.variants else variant.report.headline(),
    }
