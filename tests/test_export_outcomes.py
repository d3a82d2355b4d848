"""What lands where: only verified formats reach ``out_dir``, failures go to ``.failed``.

Also the shape of what is exported: any output structure, input names, one dtype spelling,
distinct verification samples, and the trained function as the reference.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import deployplug as dp
from deployplug.errors import (
    ExportFailedError,
    ModuleMismatchError,
    UnsupportedOpError,
    VerificationError,
)
from deployplug.exporters.caffe import writer as caffe_writer
from deployplug.profiles import get_target
from deployplug.testing import randomize_batchnorm


class TinyNet(nn.Module):
    def __init__(self, out_channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class DictNet(nn.Module):
    """Returns a dict with a nested tuple: the structure detection heads use."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet(6)
        self.cls = nn.Conv2d(6, 3, 1)
        self.box = nn.Conv2d(6, 2, 1)

    def forward(self, image):
        feats = self.body(image)
        return {"scores": self.cls(feats), "extra": (self.box(feats), feats.mean((2, 3)))}


class ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return [self.a(x), [self.b(x)]]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image, mask):
        return self.conv(image) * mask


class BrokenWriteNet(nn.Module):
    """A model ONNX can take but MsnhNet cannot (three outputs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.relu(), y * 2


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(TinyNet(), seed).eval()


def _sabotage_onnx_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ONNX runtime answer wrongly, as a mis-converted file would."""
    from deployplug.runtimes import get_runner

    runner = get_runner("onnx")
    real_run = runner.run_samples

    def wrong(out_dir, record, samples):
        return [[o + 1.0 for o in outs] for outs in real_run(out_dir, record, samples)]

    monkeypatch.setattr(runner, "run_samples", wrong)


def test_failed_verification_raises_by_default_and_lands_in_failed_dir(tmp_path, monkeypatch):
    _sabotage_onnx_verification(monkeypatch)
    out = tmp_path / "export"
    with pytest.raises(VerificationError) as info:
        dp.export(_tiny(), torch.randn(1, 3, 8, 8), out, formats="onnx")
    assert not out.exists(), "a failed artifact must never appear at out_dir"
    failed = tmp_path / "export.failed"
    assert info.value.failed_dir == failed and info.value.manifest is None
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["passed"] is False
    assert set(manifest["failed_formats"]) == {"onnx"}
    assert (failed / "model.onnx").is_file() and (failed / "reference.npz").is_file()


def test_failed_verification_does_not_replace_a_previous_good_export(tmp_path, monkeypatch):
    out = tmp_path / "export"
    dp.export(_tiny(), torch.randn(1, 3, 8, 8), out)
    before = (out / "model.onnx").read_bytes()
    _sabotage_onnx_verification(monkeypatch)
    with pytest.raises(VerificationError):
        dp.export(_tiny(seed=1), torch.randn(1, 3, 8, 8), out)
    assert (out / "model.onnx").read_bytes() == before
    monkeypatch.undo()
    assert dp.verify(out).passed


def test_non_strict_returns_the_failed_manifest_without_raising(tmp_path, monkeypatch):
    _sabotage_onnx_verification(monkeypatch)
    manifest = dp.export(_tiny(), torch.randn(1, 3, 8, 8), tmp_path / "e", strict=False)
    assert not manifest.passed
    assert manifest.dir == tmp_path / "e.failed"
    assert set(manifest.failed_formats) == {"onnx"}


def test_formats_are_independent_passing_ones_land(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(UnsupportedOpError) as info:
        dp.export(BrokenWriteNet().eval(), torch.randn(1, 3, 6, 6), out,
                  formats=("onnx", "msnhnet"))
    landed = info.value.manifest
    assert landed is not None and landed.passed
    assert list(landed.formats) == ["onnx"]
    assert set(landed.failed_formats) == {"msnhnet"}
    assert "one output" in landed.failed_formats["msnhnet"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert list(on_disk["formats"]) == ["onnx"] and on_disk["passed"] is True
    assert not (out / "model.msnhnet").exists()
    # the MsnhNet writer refused before writing a file: nothing to keep for debugging
    assert info.value.failed_dir is None and not (tmp_path / "export.failed").exists()
    assert dp.verify(out).passed


def test_two_failing_formats_raise_one_error_naming_both(tmp_path, monkeypatch):
    _sabotage_onnx_verification(monkeypatch)
    with pytest.raises(ExportFailedError) as info:
        dp.export(BrokenWriteNet().eval(), torch.randn(1, 3, 6, 6), tmp_path / "e",
                  formats=("onnx", "msnhnet"))
    assert "[onnx]" in str(info.value) and "[msnhnet]" in str(info.value)
    assert info.value.manifest is None
    assert not (tmp_path / "e").exists()


def test_a_single_format_may_be_given_as_a_string(tmp_path):
    manifest = dp.export(_tiny(), torch.randn(1, 3, 8, 8), tmp_path / "e", formats="onnx")
    assert list(manifest.formats) == ["onnx"]


@pytest.mark.parametrize("net_cls,names", [
    (DictNet, ["scores", "extra.0", "extra.1"]),
    (ListNet, ["output0", "output1.0"]),
])
def test_any_output_structure_is_flattened_with_names(tmp_path, net_cls, names):
    torch.manual_seed(0)
    net = randomize_batchnorm(net_cls()).eval()
    x = torch.randn(1, 3, 8, 6)
    manifest = dp.export(net, x, tmp_path / "e", formats=("onnx", "caffe"))
    assert manifest.passed
    assert [o["name"] for o in manifest.outputs] == names
    proto = onnx.load(str(tmp_path / "e" / "model.onnx"))
    assert [o.name for o in proto.graph.output] == names
    net_proto = caffe_writer.read_prototxt(tmp_path / "e" / "model.prototxt", "bvlc")
    tops = {t for layer in net_proto.layer for t in layer.top}
    if net_cls is DictNet:
        assert set(names) <= tops, "dict keys name the Caffe output blobs"
    assert dp.verify(tmp_path / "e", model=net).passed


def test_inputs_are_named_after_forward_parameters_and_dtypes_spelled_once(tmp_path):
    net = TwoInputs().eval()
    x, mask = torch.randn(1, 3, 5, 7), torch.rand(1, 4, 5, 7)
    manifest = dp.export(net, (x, mask), tmp_path / "e")
    assert [i["name"] for i in manifest.inputs] == ["image", "mask"]
    proto = onnx.load(str(tmp_path / "e" / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["image", "mask"]
    on_disk = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert {i["dtype"] for i in on_disk["inputs"]} == {"float32"}
    assert {o["dtype"] for o in on_disk["outputs"]} == {"float32"}


def test_verification_samples_are_distinct_even_for_a_seed_zero_example(tmp_path):
    shape = (1, 3, 8, 8)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    dp.export(_tiny(), example, tmp_path / "e")
    with np.load(tmp_path / "e" / "reference.npz") as data:
        inputs = [data[k] for k in sorted(data.files) if k.endswith("_in0")]
    assert len(inputs) >= 3
    for i in range(len(inputs)):
        for j in range(i + 1, len(inputs)):
            assert not np.array_equal(inputs[i], inputs[j]), (i, j)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class Classifier(nn.Module):
    """forward = normalise -> backbone -> head: the backbone alone is not the model."""

    def __init__(self):
        super().__init__()
        self.net = Backbone()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.net((x - 0.5) / 0.25))


def test_exporting_a_submodule_that_is_not_the_trained_function_is_refused(tmp_path):
    model = Classifier().eval()
    with pytest.raises(ModuleMismatchError, match=r"\[\[1, 8\]\].*\[\[1, 4\]\]"):
        dp.export(model.net, torch.randn(1, 3, 8, 8), tmp_path / "e", reference_model=model)
    assert not (tmp_path / "e").exists()


def test_reference_outputs_come_from_the_reference_model(tmp_path):
    model = Classifier().eval()
    x = torch.randn(1, 3, 8, 8)
    dp.export(model, x, tmp_path / "e", reference_model=model)
    with np.load(tmp_path / "e" / "reference.npz") as data:
        recorded = data["s0_out0"]
    np.testing.assert_allclose(recorded, model(x).detach().numpy(), rtol=0, atol=0)


def test_compiled_modules_are_unwrapped(tmp_path):
    model = _tiny()
    compiled = torch.compile(model)
    x = torch.randn(1, 3, 8, 8)
    assert dp.check(compiled, x, "caffe").passed
    manifest = dp.export(compiled, x, tmp_path / "e", formats=("onnx", "caffe"))
    assert manifest.passed


class RfftNet(nn.Module):
    """torch.export captures it, the ONNX exporter refuses it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.fft.rfft(self.conv(x)).abs()


class NoBatchStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


PREFLIGHT_CASES = {
    "plain": (lambda: _tiny(), (1, 3, 8, 8)),
    "dict outputs": (lambda: DictNet().eval(), (1, 3, 8, 8)),
    "three outputs": (lambda: BrokenWriteNet().eval(), (1, 3, 6, 6)),
    "two inputs": (lambda: TwoInputs().eval(), ((1, 3, 5, 7), (1, 4, 5, 7))),
    "compiled": (lambda: torch.compile(_tiny()), (1, 3, 8, 8)),
    "onnx-refused op": (lambda: RfftNet().eval(), (1, 3, 4, 8)),
    "bn without stats": (lambda: NoBatchStats().eval(), (1, 3, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT_CASES))
@pytest.mark.parametrize("target", ["onnx", "caffe", "om", "msnhnet"])
def test_check_passes_exactly_when_export_writes_files(tmp_path, case, target):
    from deployplug.preflight import format_for_target

    build, shape = PREFLIGHT_CASES[case]
    gen = torch.Generator().manual_seed(3)
    shapes = shape if isinstance(shape[0], tuple) else (shape,)
    example = tuple(torch.randn(*s, generator=gen) for s in shapes)
    model = build()
    report = dp.check(model, example, target)
    fmt = format_for_target(get_target(target))
    try:
        manifest = dp.export(model, example, tmp_path / "e", formats=fmt, target=target,
                             verify=False)
        wrote = bool(manifest.formats)
    except Exception:
        wrote = False
    assert report.passed == wrote, str(report)


def test_one_export_captures_each_target_legal_model_once(tmp_path, monkeypatch):
    from deployplug import capture as capture_module

    calls = []
    real = capture_module.export_program

    def counting(model, inputs):
        calls.append(type(model).__name__)
        return real(model, inputs)

    monkeypatch.setattr(capture_module, "export_program", counting)
    manifest = dp.export(_tiny(), torch.randn(1, 3, 8, 8), tmp_path / "e",
                         formats=("onnx", "caffe", "msnhnet"), target="om")
    assert manifest.passed
    # caffe (om) and msnhnet need no rewrite of this net: both reuse one capture
    assert len(calls) == 1, calls


def test_manifest_and_metrics_carry_the_fusion_report(tmp_path):
    manifest = dp.export(_tiny(), torch.randn(1, 3, 8, 8), tmp_path / "e")
    on_disk = json.loads((tmp_path / "e" / "manifest.json").read_text())
    counts = on_disk["extra"]["reparameterize"]["op_counts"]
    assert counts["before"]["batch_norm"] == 1 and counts["after"]["batch_norm"] == 0
    metrics = manifest.metrics()
    assert metrics["deploy/reparam/before/conv"] == 1.0
    assert metrics["deploy/reparam/after/batch_norm"] == 0.0
