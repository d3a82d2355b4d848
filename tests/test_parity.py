"""Validation parity for every format: each runtime over a validation set, next to PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deployplug as dp
from deployplug import parity
from deployplug.errors import ParityError
from deployplug.testing import randomize_batchnorm

FORMATS = ("onnx", "caffe", "msnhnet")
CLASSES = 5


class Classifier(nn.Module):
    """conv -> BN -> ReLU -> conv -> global pool -> linear; optionally also the features."""

    def __init__(self, with_features: bool = False):
        super().__init__()
        self.with_features = with_features
        self.body = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                                  nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features.mean(dim=(2, 3)))
        return (logits, features) if self.with_features else logits


def classifier(seed: int = 0, with_features: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(Classifier(with_features), seed).eval()


def shifted(net: nn.Module) -> nn.Module:
    """The same net with a different head bias: some, not all, top-1 classes change."""
    import copy

    other = copy.deepcopy(net)
    with torch.no_grad():
        other.head.bias += torch.linspace(-0.6, 0.6, CLASSES)
    return other


def loader(sizes=(5, 5, 3), seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 7, 7, generator=gen) * 2,
             torch.randint(0, CLASSES, (n,), generator=gen)) for n in sizes]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, int], object]:
    """Each format exported for a fixed batch of 1 and of 2 (ONNX without a dynamic batch)."""
    net = classifier()
    out = {}
    for fmt in FORMATS:
        for batch in (1, 2):
            folder = tmp_path_factory.mktemp(f"{fmt}{batch}") / "x"
            out[fmt, batch] = dp.export(net, torch.randn(batch, 2, 7, 7), folder, formats=[fmt],
                                        onnx_options={"dynamic_batch": False})
    return out


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).double().mean())


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reports_the_agreement_and_accuracy_pytorch_would(exports, fmt, batch):
    net = classifier()
    reference = shifted(net)  # the trained forward differs from the exported file on purpose
    data = loader()
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        exported, truth = net(x), reference(x)
    expected_agreement = top1_agreement(exported, truth)
    assert 0.0 < expected_agreement < 1.0  # the test can tell a right answer from a wrong one

    manifest = exports[fmt, batch]
    assert parity.fixed_batch(manifest, fmt) == batch
    result = parity.validation_parity(manifest, reference, data)
    got = result.formats[fmt]
    assert result.samples == 13 and got.batches == 3  # ragged last batch, padding dropped
    assert got.agreement == pytest.approx(expected_agreement, abs=1e-6)  # one sample: 0.077
    assert got.accuracy == pytest.approx(float((exported.argmax(1) == y).double().mean()))
    assert result.reference_accuracy == pytest.approx(float((truth.argmax(1) == y).double()
                                                            .mean()))
    assert got.max_error > 1e-3  # the shifted head shows up as an error, too

    same = parity.validation_parity(manifest, net, data).formats[fmt]
    assert same.agreement == 1.0 and same.max_error <= 1e-5


def test_metrics_are_named_per_format(exports):
    manifest = exports["caffe", 1]
    metrics = parity.validation_parity(manifest, classifier(), loader()).metrics("deploy")
    assert set(metrics) == {"deploy/caffe/val_max_error", "deploy/caffe/val_agreement",
                            "deploy/caffe/val_acc", "deploy/torch/val_acc"}


def test_max_batches_limits_the_run(exports):
    result = parity.validation_parity(exports["msnhnet", 1], classifier(), loader(),
                                      max_batches=1)
    assert result.samples == 5 and result.formats["msnhnet"].batches == 1


def test_without_labels_there_is_agreement_but_no_accuracy(exports):
    unlabelled = [b[0] for b in loader()]
    result = parity.validation_parity(exports["onnx", 1], classifier(), unlabelled)
    assert result.formats["onnx"].agreement == 1.0
    assert result.formats["onnx"].accuracy is None and result.reference_accuracy is None
    assert set(result.metrics()) == {"deploy/onnx/val_max_error", "deploy/onnx/val_agreement"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_classification_outputs_report_the_worst_error(tmp_path, fmt):
    torch.manual_seed(0)
    net = randomize_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3),
                                            nn.ReLU()), 0).eval()
    manifest = dp.export(net, torch.randn(1, 2, 7, 7), tmp_path / "x", formats=[fmt])
    result = parity.validation_parity(manifest, net, loader())
    got = result.formats[fmt]
    assert got.agreement is None and got.accuracy is None
    assert 0.0 <= got.max_error <= 1e-5
    worse = parity.validation_parity(manifest, nn.Sequential(net, nn.Hardtanh(0, 0.5)),
                                     loader()).formats[fmt]
    assert worse.max_error > 0.1
    assert set(result.metrics()) == {f"deploy/{fmt}/val_max_error"}


@pytest.mark.parametrize("fmt", ["onnx", "caffe"])  # MsnhNet files have one output
def test_models_with_several_outputs_compare_every_output(tmp_path, fmt):
    net = classifier(with_features=True)
    manifest = dp.export(net, torch.randn(1, 2, 7, 7), tmp_path / "x", formats=[fmt])
    result = parity.validation_parity(manifest, net, loader())
    assert result.formats[fmt].agreement == 1.0 and result.formats[fmt].max_error <= 1e-5

    class BadFeatures(nn.Module):  # same logits, wrong second output
        def forward(self, x):
            logits, features = net(x)
            return logits, features * 1.5

    worse = parity.validation_parity(manifest, BadFeatures(), loader()).formats[fmt]
    assert worse.agreement == 1.0 and worse.max_error > 0.1


def test_refusals_name_the_problem(exports, tmp_path):
    manifest = exports["caffe", 1]
    with pytest.raises(ParityError, match=r"per-sample input shape.*\(2, 9, 9\).*\(2, 7, 7\)"):
        parity.validation_parity(manifest, classifier(), [(torch.randn(2, 2, 9, 9),)])
    with pytest.raises(ParityError, match="empty"):
        parity.validation_parity(manifest, classifier(), [])
    with pytest.raises(ParityError, match="tuple"):
        parity.validation_parity(manifest, classifier(), [{"x": torch.randn(1, 2, 7, 7)}])
    with pytest.raises(ParityError, match="no \\['onnx'\\] artifact"):
        parity.validation_parity(manifest, classifier(), loader(), formats=["onnx"])


def test_an_artifact_that_cannot_run_is_a_parity_error_naming_the_format(tmp_path):
    net = classifier()
    manifest = dp.export(net, torch.randn(1, 2, 7, 7), tmp_path / "x", formats=["msnhnet"])
    (manifest.dir / "model.msnhbin").write_bytes(b"\x00" * 7)
    with pytest.raises(ParityError, match="msnhnet artifact"):
        parity.validation_parity(manifest, net, loader())


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), batch=st.integers(1, 4),
       dynamic=st.booleans())
def test_chunking_keeps_every_sample_in_order(sizes, batch, dynamic):
    """Cut into fixed batches (last one padded), run, joined: the same rows in the same order."""
    seen: list[int] = []

    def run(samples):
        seen.extend(s[0].shape[0] for s in samples)
        return [[s[0] * 2.0 + 1.0, s[0].sum(axis=(1, 2, 3))] for s in samples]

    fmt = parity._Format("fake", run, None if dynamic else batch, parity.FormatParity("fake"))
    groups = [(np.random.default_rng(n).standard_normal((n, 1, 2, 2)).astype(np.float32),)
              for n in sizes]
    joined = parity._run_format(fmt, groups)
    for (x,), (doubled, sums) in zip(groups, joined):
        np.testing.assert_array_equal(doubled, x * 2.0 + 1.0)
        np.testing.assert_array_equal(sums, x.sum(axis=(1, 2, 3)))
    assert all(n == batch for n in seen) or dynamic


def test_outputs_without_a_batch_dimension_cannot_be_joined():
    def run(samples):
        return [[np.float32(s[0].sum())] for s in samples]

    fmt = parity._Format("fake", run, 2, parity.FormatParity("fake"))
    with pytest.raises(ParityError, match="no leading batch dimension"):
        parity._run_format(fmt, [(np.ones((3, 1, 2, 2), np.float32),)])
