"""Statistical verification of int8 outputs: agreement, accuracy drop, and enough evidence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deployplug.errors import ConfigError
from deployplug.quant import judge


def scores(decisions: list[int], classes: int = 4) -> np.ndarray:
    out = np.zeros((len(decisions), classes), dtype=np.float32)
    out[np.arange(len(decisions)), decisions] = 1.0
    return out


def test_agreement_decides_without_labels():
    ref = [[scores([0] * 100)], [scores([1] * 100)]]
    out = [[scores([0] * 100)], [scores([1] * 99 + [2])]]
    verdict = judge(out, ref, max_drop=0.01)
    assert verdict.samples == 200 and verdict.agreement == pytest.approx(0.995)
    assert verdict.passed and verdict.decided_by == "agreement"
    assert verdict.drop == pytest.approx(0.005)
    assert not judge(out, ref, max_drop=0.004).passed


def test_accuracy_drop_decides_with_labels_and_can_pass_below_agreement():
    labels = np.array([0] * 100 + [1] * 100)
    ref = [[scores([0] * 90 + [3] * 10)], [scores([1] * 100)]]      # fp32 95 %
    out = [[scores([0] * 88 + [3] * 10 + [0, 0])], [scores([1] * 100)]]  # int8 still 95 %
    verdict = judge(out, ref, labels, max_drop=0.01)
    assert verdict.decided_by == "accuracy" and verdict.passed
    assert verdict.fp32_accuracy == pytest.approx(0.95) and verdict.int8_accuracy == \
        pytest.approx(0.95)
    # four decisions moved (two right -> wrong, two wrong -> right): 98 % agreement, which
    # alone would fail a 1-point limit, but the accuracy did not drop
    assert verdict.agreement == pytest.approx(0.98)
    assert not judge(out, ref, max_drop=0.01).passed
    worse = [[scores([1] * 100)], [scores([1] * 100)]]
    failed = judge(worse, ref, labels, max_drop=0.01)
    assert not failed.passed and failed.accuracy_drop == pytest.approx(0.45)
    assert "above the limit" in failed.reason
    metrics = failed.metrics("deploy")
    assert metrics["deploy/onnx_int8/val_acc"] == pytest.approx(0.5)
    assert metrics["deploy/onnx_int8/val_agreement"] == pytest.approx(failed.agreement)
    assert metrics["deploy/onnx_int8/passed"] == 0.0


def test_too_few_samples_cannot_pass():
    ref = [[scores([0] * 50)]]
    verdict = judge(ref, ref, max_drop=0.01)
    assert not verdict.passed and "at least 100" in verdict.reason
    assert judge(ref, ref, max_drop=0.05).passed


def test_worst_normalized_error_is_reported_and_non_finite_output_fails():
    ref = [[scores([0, 1] * 60)]]
    out = [[ref[0][0] + 0.25]]
    verdict = judge(out, ref)
    assert verdict.passed and verdict.max_error == pytest.approx(0.25)
    bad = ref[0][0].copy()
    bad[0, 0] = np.nan
    nan_verdict = judge([[bad]], ref)
    assert not nan_verdict.passed and math.isinf(nan_verdict.max_error)
    assert nan_verdict.to_dict()["max_error"] is None  # JSON-safe


def test_outputs_without_a_class_axis_and_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="no class axis"):
        judge([[np.zeros(5)]], [[np.zeros(5)]])
    with pytest.raises(ConfigError, match="labels"):
        judge([[scores([0] * 200)]], [[scores([0] * 200)]], labels=np.zeros(3, dtype=int))
    with pytest.raises(ConfigError, match="max_drop"):
        judge([[scores([0])]], [[scores([0])]], max_drop=1.5)
