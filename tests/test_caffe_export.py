"""Caffe export: every lowering checked in OpenCV's Caffe importer against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fn_module import Fn
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from deployplug.errors import CaptureError, UnsupportedOpError
from deployplug.exporters import FormatRecord, get_exporter
from deployplug.exporters.caffe.writer import blob_array, read_caffemodel, read_prototxt
from deployplug.runtimes import get_runner
from deployplug.testing import normalized_error, randomize_batchnorm

TOL = 1e-5
EXPORTER = get_exporter("caffe")
RUNNER = get_runner("caffe")


def roundtrip(model, inputs, out_dir, target="caffe"):
    """Write the files, run them in OpenCV, return (record, caffe outputs, torch outputs)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    record = EXPORTER.write(model, inputs, out_dir, target)
    got = RUNNER.run(out_dir, record, [x.numpy() for x in inputs])
    with torch.no_grad():
        ref = model(*inputs)
    ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    assert len(got) == len(ref)
    return record, got, ref


def assert_close(model, inputs, out_dir, target="caffe", tol=TOL):
    record, got, ref = roundtrip(model, inputs, out_dir, target)
    errors = []
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape), (g.shape, tuple(r.shape))
        errors.append(normalized_error(g, r))
    assert max(errors) <= tol, errors
    return record, errors


# ----------------------------------------------------------------------------- reference nets


def _reference(name, shape):
    import deployplug.models as models

    model = models.build(name, num_classes=10)
    randomize_batchnorm(model, seed=3)
    if name.startswith("repvgg"):
        from deployplug.reparam import reparameterize

        model = reparameterize(model)
    return model.eval(), torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("resnet18_like", (1, 3, 45, 38)),  # odd, non-square: stem max-pool rounding
        ("mobilenetv2_like", (1, 3, 40, 36)),  # depthwise + ReLU6
        ("unet_like", (1, 3, 37, 30)),  # transposed conv, concat, asymmetric pad
        ("repvgg_a0", (1, 3, 32, 32)),  # fused multi-branch blocks
    ],
)
def test_reference_nets_match_pytorch(name, shape, tmp_path):
    model, x = _reference(name, shape)
    record, errors = assert_close(model, x, tmp_path)
    assert record.files == ["model.prototxt", "model.caffemodel"]
    assert record.info["dialect"] == "bvlc"
    if name == "mobilenetv2_like":
        assert "ReLU6" not in record.info["layer_types"]  # composed from BVLC layers
    if name == "repvgg_a0":  # fused: plain convolutions only
        assert "BatchNorm" not in record.info["layer_types"]
        assert record.info["layer_types"]["Convolution"] >= 20


# ----------------------------------------------------------------------------- single ops


class Many(nn.Module):
    """Several ops applied to one input: one export checks all of them (outputs in order)."""

    def __init__(self, fns, **modules):
        super().__init__()
        self.fns = fns
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, x):
        return tuple(fn(self, x) for fn in self.fns)


def _groups() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    g = torch.Generator().manual_seed(1)
    vec = nn.Parameter(torch.randn(1, 6, 1, 1, generator=g))
    return {
        "conv": (Many([
            lambda m, x: m.rect(x),  # rectangular kernel, stride (2, 1), dilation (2, 1)
            lambda m, x: m.grouped(x),
            lambda m, x: m.depthwise(x),
            lambda m, x: m.same(x),
        ], rect=nn.Conv2d(6, 4, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
            grouped=nn.Conv2d(6, 9, 3, padding=1, groups=3, bias=False),
            depthwise=nn.Conv2d(6, 6, 3, stride=2, groups=6),
            same=nn.Conv2d(6, 3, (3, 5), padding="same")), (2, 6, 11, 9)),
        "conv_tiny": (nn.Conv2d(6, 2, 1), (1, 6, 1, 1)),
        "deconv": (Many([
            lambda m, x: m.rect(x), lambda m, x: m.grouped(x),
        ], rect=nn.ConvTranspose2d(6, 4, (3, 2), stride=(2, 3), padding=(1, 0)),
            grouped=nn.ConvTranspose2d(6, 6, 4, stride=2, padding=1, groups=3)), (1, 6, 5, 4)),
        "norm_linear": (Many([
            lambda m, x: m.bn(x),
            lambda m, x: m.fc(x.flatten(1)),
            lambda m, x: m.last(x),  # Linear on the last axis of a 4-D tensor
        ], bn=randomize_batchnorm(nn.BatchNorm2d(6), seed=5), fc=nn.Linear(6 * 3 * 2, 5),
            last=nn.Linear(2, 5, bias=False)), (2, 6, 3, 2)),
        "activations": (Many([
            lambda m, x: F.relu(x), lambda m, x: F.leaky_relu(x, 0.2),
            lambda m, x: m.prelu(x), lambda m, x: m.prelu1(x),
            lambda m, x: torch.sigmoid(x), lambda m, x: torch.tanh(x),
            lambda m, x: F.elu(x, 0.7), lambda m, x: F.relu6(x * 4),
            lambda m, x: F.hardtanh(x, -0.5, 1.5), lambda m, x: torch.clamp(x, -1.0, 0.5),
            lambda m, x: torch.clamp(x, min=0.25), lambda m, x: torch.clamp(x, max=-0.25),
            lambda m, x: F.hardsigmoid(x * 4), lambda m, x: F.hardswish(x * 4),
            lambda m, x: F.silu(x), lambda m, x: torch.exp(-torch.abs(x)),
            lambda m, x: F.softmax(x, dim=1), lambda m, x: F.softmax(x, dim=-1),
        ], prelu=nn.PReLU(6, 0.3), prelu1=nn.PReLU(1, 0.1)), (1, 6, 4, 5)),
        "arithmetic": (Many([
            lambda m, x: ((x + 2) * 3 - 1) / 4,
            lambda m, x: -(1.5 - x),
            lambda m, x: (x * x + 1) ** 1.5 + torch.sqrt(x.abs() + 1),
            lambda m, x: 2.0 / (x.abs() + 1),
            # OpenCV would fuse these Power pairs wrongly without the guard
            lambda m, x: (x.abs() + 0.5) ** 2 * 3 - 1 - torch.sqrt(x.abs()),
            lambda m, x: x * m.v + m.v.flip(1) - m.v / 3,  # constants folded at export
            lambda m, x: x / (m.v.abs() + 1),
            lambda m, x: m.v - x * 2,
            lambda m, x: torch.maximum(x * x, x - x.sigmoid()) + torch.minimum(x, -x),
            lambda m, x: x / (x.abs() + 1),
            lambda m, x: x * torch.sigmoid(F.adaptive_avg_pool2d(x, 1)),  # SE broadcast
        ], v=vec), (2, 6, 5, 3)),
        "power_then_1ch_scale": (Fn(lambda m, x: x.abs() ** 1.5 * m.v, v=nn.Parameter(
            torch.full((1, 1, 1, 1), -2.0))), (1, 1, 4, 4)),
        "pool_reduce": (Many([
            lambda m, x: F.max_pool2d(x, 3, 2, 1),
            lambda m, x: F.avg_pool2d(x, 3, 2, 1),
            lambda m, x: F.adaptive_avg_pool2d(x, (2, 3)),
            lambda m, x: x.mean((2, 3)),
            lambda m, x: x.sum((-1, -2), keepdim=True),
            lambda m, x: x.mean(1) + x.sum(1),
        ]), (1, 6, 12, 9)),
        "shapes": (Many([
            lambda m, x: x.view(1, 3, 2, -1).flatten(2).unsqueeze(-1).squeeze(-1),
            lambda m, x: torch.cat([t * (i + 1) for i, t in enumerate(x.split([1, 3, 2], 1))], 1),
            lambda m, x: x.chunk(2, 1)[1].narrow(2, 1, 2)[:, :, :, 1],
            lambda m, x: x[:, 2:, 1:-1],
        ]), (1, 6, 5, 4)),
        "pad": (Many([
            lambda m, x: F.pad(x, (1, 1, 2, 2)),
            lambda m, x: F.pad(x, (0, 1, 2, 0), value=0.5),
            lambda m, x: F.pad(x, (-1, 1, 0, -2)),
        ]), (1, 6, 5, 4)),
        "resample": (Many([
            lambda m, x: F.interpolate(x, scale_factor=2),
            lambda m, x: F.interpolate(x, size=(6, 15)),
            lambda m, x: F.interpolate(x, scale_factor=2, mode="bilinear"),
            lambda m, x: F.interpolate(x, scale_factor=(3, 4), mode="bilinear"),
        ]), (1, 6, 3, 5)),
        "bilinear_from_1x1": (Fn(lambda m, x: F.interpolate(x, size=(5, 5), mode="bilinear")),
                              (1, 6, 1, 1)),
        "argmax_head": (Fn(lambda m, x: m.head(x).argmax(1), head=nn.Conv2d(6, 4, 1)),
                        (1, 6, 4, 4)),
    }


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """Export and run every op group once; the tests below read the results."""
    results = {}
    for name, (module, shape) in _groups().items():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
        results[name] = roundtrip(module.eval(), x, tmp_path_factory.mktemp(name))
    return results


@pytest.mark.parametrize("group", sorted(_groups()))
def test_op_group_matches_pytorch(group, group_results):
    record, got, ref = group_results[group]
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == tuple(r.shape), (i, g.shape, tuple(r.shape))
        if g.dtype == np.int64:
            np.testing.assert_array_equal(g, r.numpy())
        else:
            assert normalized_error(g, r) <= TOL, (group, i, normalized_error(g, r))


def test_layer_type_coverage(group_results):
    types = set().union(*(set(rec.info["layer_types"]) for rec, _, _ in group_results.values()))
    expected = {"Input", "Convolution", "Deconvolution", "BatchNorm", "Scale", "ReLU", "PReLU",
                "Sigmoid", "TanH", "ELU", "AbsVal", "Exp", "Power", "Pooling", "InnerProduct",
                "Flatten", "Reshape", "Concat", "Slice", "Eltwise", "Softmax", "ArgMax"}
    assert expected <= types, expected - types


# ----------------------------------------------------------------------------- pooling


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 5), s=st.integers(1, 4), data=st.data(), ceil=st.booleans(),
    h=st.integers(1, 13), w=st.integers(1, 13), avg=st.booleans(),
)
def test_pooling_rounding_matches_pytorch(k, s, data, ceil, h, w, avg, tmp_path_factory):
    p = data.draw(st.integers(0, k // 2), label="pad")
    assume(h + 2 * p >= k and w + 2 * p >= k)
    pool = nn.AvgPool2d(k, s, p, ceil_mode=ceil) if avg else nn.MaxPool2d(k, s, p, ceil_mode=ceil)
    x = torch.randn(1, 2, h, w)
    out_dir = tmp_path_factory.mktemp("pool")
    assert_close(pool.eval(), x, out_dir)


def test_avg_pool_excluding_padding_is_refused(tmp_path):
    pool = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
    with pytest.raises(UnsupportedOpError, match="count_include_pad"):
        EXPORTER.write(pool, (torch.randn(1, 2, 6, 6),), tmp_path, "caffe")
    # without padding the two conventions agree, so it is accepted
    assert_close(nn.AvgPool2d(3, 2, 0, ceil_mode=True, count_include_pad=False),
                 torch.randn(1, 2, 8, 7), tmp_path / "ok")


# ----------------------------------------------------------------------------- argmax, misc


def test_segmentation_head_argmax(tmp_path):
    head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    model = Fn(lambda m, x: torch.argmax(m.head(x), dim=1), head=head).eval()
    x = torch.randn(2, 3, 9, 7)
    record, got, ref = roundtrip(model, x, tmp_path)
    assert got[0].dtype == np.int64 and got[0].shape == (2, 9, 7)
    np.testing.assert_array_equal(got[0], ref[0].numpy())
    assert "ArgMax" in record.info["layer_types"]
    assert "np.argmax" in record.info["argmax"]
    assert any("ArgMax" in note for note in record.info["runtime_notes"])
    # the record survives the manifest's JSON round trip and still runs the files
    stored = FormatRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    again = RUNNER.run(tmp_path, stored, [x.numpy()])
    np.testing.assert_array_equal(again[0], got[0])


@settings(max_examples=8, deadline=None)
@given(fh=st.integers(1, 4), fw=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6),
       bilinear=st.booleans())
def test_integer_factor_resampling(fh, fw, h, w, bilinear, tmp_path_factory):
    mode = "bilinear" if bilinear else "nearest"
    model = Fn(lambda m, x: F.interpolate(x, scale_factor=(fh, fw), mode=mode))
    assert_close(model, torch.randn(1, 3, h, w), tmp_path_factory.mktemp("up"))


def test_unsupported_ops_are_all_named_and_no_files_written(tmp_path):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.act = nn.GELU()

        def forward(self, x):
            return torch.erf(self.act(self.conv(x))) + x.permute(0, 1, 3, 2)

    out_dir = tmp_path / "out"
    with pytest.raises(UnsupportedOpError) as info:
        EXPORTER.write(Bad().eval(), (torch.randn(1, 3, 4, 4),), out_dir, "caffe")
    ops = {o.op for o in info.value.offenders}
    assert {"gelu", "erf", "permute"} <= ops
    gelu = next(o for o in info.value.offenders if o.op == "gelu")
    assert gelu.module_path == "act" and gelu.target == "caffe" and gelu.suggestions
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_fft_is_refused_without_files(tmp_path):
    model = Fn(lambda m, x: torch.fft.rfft2(x).abs())
    with pytest.raises((UnsupportedOpError, CaptureError)) as info:
        EXPORTER.write(model, (torch.randn(1, 2, 4, 4),), tmp_path / "o", "caffe")
    assert "fft" in str(info.value)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_output_padding_and_broadcast_add_are_refused(tmp_path):
    model = Fn(lambda m, x: m.up(x) + m.up(x)[:, :, :1],
               up=nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1, output_padding=1))
    with pytest.raises(UnsupportedOpError) as info:
        EXPORTER.write(model, (torch.randn(1, 3, 4, 4),), tmp_path, "caffe")
    reasons = {o.op: o.reason for o in info.value.offenders}
    assert "output_padding" in reasons["conv_transpose2d"]
    assert "broadcast" in reasons["add"]


def test_files_agree_on_layers_blobs_and_shapes(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), randomize_batchnorm(nn.BatchNorm2d(8)),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, bias=False), nn.Flatten(),
                          nn.Linear(8 * 4 * 2, 5)).eval()
    x = torch.randn(1, 3, 8, 6)
    EXPORTER.write(model, (x,), tmp_path, "caffe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.caffemodel", "model.prototxt"]
    net = read_prototxt(tmp_path / "model.prototxt")
    weights = read_caffemodel(tmp_path / "model.caffemodel")
    assert all(len(layer.blobs) == 0 for layer in net.layer)  # no data in the text file
    params = {layer.name: layer for layer in net.layer}
    assert len(params) == len(net.layer)  # unique layer names
    tops = [t for layer in net.layer for t in layer.top]
    assert len(tops) == len(set(tops))  # no duplicate tops (no in-place layers)
    blobs = {layer.name: [blob_array(b) for b in layer.blobs] for layer in weights.layer}
    for layer in weights.layer:
        assert layer.type == params[layer.name].type
    assert set(blobs) == {n for n, layer in params.items()
                          if layer.type in ("Convolution", "InnerProduct", "BatchNorm", "Scale")}
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert [b.shape for b in blobs["0"]] == [(8, 3, 3, 3), (8,)]
    np.testing.assert_array_equal(blobs["0"][0], state["0.weight"])
    assert params["3"].convolution_param.group == 4
    assert [b.shape for b in blobs["3"]] == [(8, 2, 3, 3)]  # (out, in / group, kh, kw)
    mean, var, factor = blobs["1/0"]  # BatchNorm then Scale, named after the module
    np.testing.assert_array_equal(mean, state["1.running_mean"])
    np.testing.assert_array_equal(var, state["1.running_var"])
    assert factor.tolist() == [1.0]
    np.testing.assert_array_equal(blobs["1"][0], state["1.weight"])
    np.testing.assert_array_equal(blobs["1"][1], state["1.bias"])
    assert params["1"].scale_param.bias_term and params["1/0"].batch_norm_param.use_global_stats
    assert [b.shape for b in blobs["5"]] == [(5, 64), (5,)]


def test_zero_pad_folds_into_the_convolution(tmp_path):
    model = Fn(lambda m, x: (m.conv(F.pad(x, (2, 2, 1, 1))), F.pad(x, (1, 1, 1, 1)) * 2),
               conv=nn.Conv2d(3, 4, 3, padding=1)).eval()
    record, errors = assert_close(model, torch.randn(1, 3, 6, 5), tmp_path)
    net = read_prototxt(tmp_path / "model.prototxt")
    convs = [layer for layer in net.layer if layer.type == "Convolution"]
    # the conv's own pad grows by the folded one; the pad feeding a product stays a layer
    folded = next(c for c in convs if c.name == "conv")
    assert (folded.convolution_param.pad_h, folded.convolution_param.pad_w) == (2, 3)
    assert folded.bottom == ["x"] and len(convs) == 2


def test_user_model_untouched(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    EXPORTER.write(model, (torch.randn(1, 3, 6, 6),), tmp_path, "caffe")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_first_divergence_names_the_broken_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    record = EXPORTER.write(model, (x,), tmp_path, "caffe")
    assert RUNNER.first_divergence(tmp_path, record, model, [x.numpy()], TOL) is None
    weights = read_caffemodel(tmp_path / "model.caffemodel")
    target = next(layer for layer in weights.layer if layer.name == "2")
    target.blobs[0].data[0] += 1.0
    (tmp_path / "model.caffemodel").write_bytes(weights.SerializeToString())
    found = RUNNER.first_divergence(tmp_path, record, model, [x.numpy()], TOL)
    assert found is not None and found.startswith("layer '2'"), found


def test_multiple_inputs_and_outputs(tmp_path):
    class Two(nn.Module):
        def forward(self, a, b):
            parts = torch.split(a + b, 2, dim=1)
            return parts[1], parts[0] * 2

    a, b = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    record, got, ref = roundtrip(Two(), (a, b), tmp_path)
    for g, r in zip(got, ref):
        assert normalized_error(g, r) <= TOL
    assert [i["name"] for i in record.info["inputs"]] == ["a", "b"]
