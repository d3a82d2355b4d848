"""check(): the pre-flight report agrees with decompose and names every problem."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deployplug.decompositions import run_decompose
from deployplug.errors import UnsupportedOpError
from deployplug.preflight import DECOMPOSED, NATIVE, UNSUPPORTED, CompatReport, check


class Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x).abs()


class WithFFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.spectral = Spectral()

    def forward(self, x):
        return self.spectral(torch.relu(self.conv(x)))


def test_fft_fails_naming_op_and_module_path():
    report = check(WithFFT(), torch.randn(1, 2, 8, 8), "caffe")
    assert isinstance(report, CompatReport) and not report.passed
    assert ("fft_rfft2", "spectral") in {(o.op, o.module_path) for o in report.offenders}
    assert ("conv2d", "conv", NATIVE) in {(r.op, r.module_path, r.status) for r in report.rows}
    text = str(report)
    assert "FAILED" in text and "fft_rfft2" in text and "spectral" in text
    with pytest.raises(UnsupportedOpError) as info:
        report.raise_if_failed()
    assert any(o.op == "fft_rfft2" and o.module_path == "spectral"
               for o in info.value.offenders)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["counts"][UNSUPPORTED] >= 1


class Decomposable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(1, 2, (2, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1))
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.inorm(self.c3(x).flatten(1, 2))
        return F.gelu(self.conv(F.pad(y, (0, 1, 1, 0))))


def test_report_names_exactly_the_ops_decompose_replaces():
    x = torch.randn(1, 1, 4, 7, 7)
    report = check(Decomposable(), x, "om")
    assert report.passed, str(report)
    report.raise_if_failed()
    decomposed = {(r.op, r.module_path) for r in report.rows if r.status == DECOMPOSED}
    assert {("conv3d", "c3"), ("instance_norm", "inorm"), ("pad", ""),
            ("gelu", "")} <= decomposed
    applied = run_decompose(Decomposable(), "om", x).applied
    assert decomposed == {(a.op, a.module_path) for a in applied}
    assert all(r.status == NATIVE for r in report.rows if r.op == "conv2d")
    assert "conv3d_as_conv2d" in str(report)


def test_om_report_lists_nested_rewrites():
    x = torch.randn(1, 3, 64, 64)
    report = check(nn.InstanceNorm2d(3), x, "om")
    assert report.passed
    nested = [r for r in report.rows if r.status == DECOMPOSED and "earlier" in r.detail]
    assert nested and all(r.module_path.startswith("instance_norm_decomposed") or
                          r.module_path.startswith("adaptive") for r in nested)


def test_capture_failure_fails_the_report_with_the_message():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    report = check(DataDependent(), torch.randn(1, 1, 2, 2), "caffe")
    assert not report.passed and "torch.export" in report.error
    assert "capture failed" in str(report)
    with pytest.raises(UnsupportedOpError, match="torch.export"):
        report.raise_if_failed()


def test_onnx_target_runs_the_onnx_exporter_itself():
    # Every op is native to the onnx profile, but the ONNX exporter has no FFT: the check
    # must fail as the export would, not pass and leave the failure for after training.
    report = check(WithFFT(), torch.randn(1, 2, 8, 8), "onnx")
    assert report.rows and all(r.status == NATIVE for r in report.rows)
    assert not report.passed and "fft_rfft2" in report.error


def test_fft_with_the_shipped_caffe_profile():
    report = check(WithFFT(), torch.randn(1, 2, 8, 8), "caffe")
    assert not report.passed
    assert any(o.op == "fft_rfft2" and o.module_path == "spectral" and o.target == "caffe"
               for o in report.offenders)
