"""Conversion bugs injected into correct exports must be caught and blamed on the right layer.

Each net is exported once to ONNX, Caffe and MsnhNet (fused, decomposed, verified). Every case
copies that export, changes one layer of one artifact the way a buggy writer would (a padding,
a pooling window or its rounding, a BatchNorm epsilon or scale, a scaled weight, a dropped
bias, an upsampling mode, a slice point, a concat axis, an eltwise coefficient...), records the
changed file's size and sha256 in the manifest as that writer would have (so integrity passes
and only the numbers can catch it), and calls ``dp.verify(dir, model=net)`` once. The case
passes when verification fails and ``report.divergence[fmt]`` -- the culprit -- names the
layer that was changed. The rate must be at least 95 % overall and for every format.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format
from onnx import numpy_helper
from torch import nn

import deployplug as dp
from deployplug.exporters.caffe.writer import read_caffemodel, read_prototxt
from deployplug.manifest import describe_files
from deployplug.runtimes.msnhnet import build
from deployplug.testing import randomize_batchnorm

FORMATS = ("onnx", "caffe", "msnhnet")


# ----------------------------------------------------------------------------- the nets
class BnNet(nn.Module):
    """BatchNorm everywhere (so fusion matters), a ceil-mode max pool, a BatchNorm after a
    concat (which no fusion removes), average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = dp.RepVGGBlock(8, 8)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.branch = nn.Conv2d(8, 8, 1)
        self.mix = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 6, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        y = self.mix(torch.cat([x, self.branch(x)], 1))
        y = self.avg(F.relu(self.head(y)))
        return self.fc(y.flatten(1))


class FuncNet(nn.Module):
    """Functional ops: split, scalar product, concat, residual add, a slice, floor pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        a, b = torch.split(x, [3, 5], dim=1)
        y = torch.cat([b * 2.0, a], 1)
        y = self.conv2(y) + x
        z = F.relu(y[:, :, 1:, :])
        return self.conv3(F.max_pool2d(z, 2))


class UpNet(nn.Module):
    """Average pooling, then nearest and bilinear upsampling and a deconvolution side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv3 = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        d = F.relu(self.conv2(F.avg_pool2d(x, 2)))
        u1 = F.interpolate(d, scale_factor=2, mode="nearest")
        u2 = self.deconv(d)
        u3 = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv3(torch.cat([u1 + x, u2, u3], 1))


def _net(cls: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = randomize_batchnorm(cls(), seed=seed).eval()
    with torch.no_grad():  # biases well away from zero, so dropping one shows
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) \
                    and module.bias is not None:
                module.bias.uniform_(0.2, 0.6)
    return net


NETS: dict[str, Callable[[], nn.Module]] = {
    "bn": lambda: _net(BnNet, 1), "func": lambda: _net(FuncNet, 2),
    "up": lambda: _net(UpNet, 3)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    root = tmp_path_factory.mktemp("fault-exports")
    out = {}
    for name, make in NETS.items():
        net = make()
        manifest = dp.export(net, torch.randn(1, 3, 16, 16), root / name, formats=FORMATS)
        assert manifest.passed, str(manifest.verification)
        out[name] = (net, manifest.dir)
    return out


# ----------------------------------------------------------------------------- a buggy writer
def rehash(directory: Path, name: str) -> None:
    """Record ``name``'s new size and sha256, as the writer that produced it would have."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["files"] = [describe_files(directory, [name])[0] if e["name"] == name else e
                     for e in data["files"]]
    path.write_text(json.dumps(data))


# ONNX ------------------------------------------------------------------------------------
def _onnx_edit(directory: Path, pick: Callable[[onnx.NodeProto], bool],
               change: Callable[[onnx.ModelProto, onnx.NodeProto], None]) -> str:
    path = directory / "model.onnx"
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if pick(n))
    change(proto, node)
    onnx.save(proto, str(path))
    rehash(directory, path.name)
    return node.name


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(a for a in node.attribute if a.name == name)


def _initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def _scale_input(index: int, factor: float) -> Callable[[onnx.ModelProto, onnx.NodeProto],
                                                        None]:
    def change(proto: onnx.ModelProto, node: onnx.NodeProto) -> None:
        tensor = _initializer(proto, node.input[index])
        array = numpy_helper.to_array(tensor) * factor
        tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))
    return change


def _constant_input(proto: onnx.ModelProto, node: onnx.NodeProto, index: int
                    ) -> tuple[onnx.TensorProto, np.ndarray]:
    """The tensor behind input ``index``: an initializer or a Constant node's value."""
    name = node.input[index]
    for tensor in proto.graph.initializer:
        if tensor.name == name:
            return tensor, numpy_helper.to_array(tensor)
    const = next(n for n in proto.graph.node if name in n.output)
    tensor = _attr(const, "value").t
    return tensor, numpy_helper.to_array(tensor)


def _set_constant(index: int, value: Callable[[np.ndarray], np.ndarray]
                  ) -> Callable[[onnx.ModelProto, onnx.NodeProto], None]:
    def change(proto: onnx.ModelProto, node: onnx.NodeProto) -> None:
        tensor, array = _constant_input(proto, node, index)
        tensor.CopyFrom(numpy_helper.from_array(value(array).astype(array.dtype), tensor.name))
    return change


def _set_ints(attr: str, values: list[int]) -> Callable[[onnx.ModelProto, onnx.NodeProto], None]:
    def change(_: onnx.ModelProto, node: onnx.NodeProto) -> None:
        a = _attr(node, attr)
        del a.ints[:]
        a.ints.extend(values)
    return change


def _set_attr(attr: str, value: object) -> Callable[[onnx.ModelProto, onnx.NodeProto], None]:
    def change(_: onnx.ModelProto, node: onnx.NodeProto) -> None:
        a = _attr(node, attr)
        if isinstance(value, bytes):
            a.s = value
        elif isinstance(value, float):
            a.f = value
        else:
            a.i = int(value)  # type: ignore[call-overload]
    return change


def _op(op_type: str, scope: str = "") -> Callable[[onnx.NodeProto], bool]:
    return lambda n: n.op_type == op_type and n.name.startswith(scope)


def _set_op_type(op_type: str) -> Callable[[onnx.ModelProto, onnx.NodeProto], None]:
    def change(_: onnx.ModelProto, node: onnx.NodeProto) -> None:
        node.op_type = op_type
    return change


def _zero_bias(proto: onnx.ModelProto, node: onnx.NodeProto) -> None:
    _scale_input(2, 0.0)(proto, node)


ONNX_CASES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "conv pad": ("bn", lambda d: _onnx_edit(d, _op("Conv", "/head"),
                                            _set_ints("pads", [2, 2, 2, 2]))),
    "conv pad (before a residual add)": (
        "func", lambda d: _onnx_edit(d, _op("Conv", "/conv2"), _set_ints("pads", [0, 0, 0, 0]))),
    "scaled conv weight": ("bn", lambda d: _onnx_edit(d, _op("Conv", "/stem"),
                                                      _scale_input(1, 1.1))),
    "zeroed bias": ("up", lambda d: _onnx_edit(d, _op("Conv", "/conv2"), _zero_bias)),
    "pool kernel": ("bn", lambda d: _onnx_edit(d, _op("MaxPool"),
                                               _set_ints("kernel_shape", [2, 2]))),
    "pool ceil mode": ("bn", lambda d: _onnx_edit(d, _op("MaxPool"), _set_attr("ceil_mode", 0))),
    "BN epsilon": ("bn", lambda d: _onnx_edit(d, _op("BatchNormalization"),
                                              _set_attr("epsilon", 0.3))),
    "BN scale": ("bn", lambda d: _onnx_edit(d, _op("BatchNormalization"),
                                            _scale_input(1, 1.2))),
    "upsample mode": ("up", lambda d: _onnx_edit(
        d, lambda n: n.op_type == "Resize" and _attr(n, "mode").s == b"nearest",
        _set_attr("mode", b"linear"))),
    "slice point": ("func", lambda d: _onnx_edit(d, _op("Split"),
                                                 _set_constant(1, lambda a: a + [1, -1]))),
    "slice start": ("func", lambda d: _onnx_edit(d, _op("Slice"),
                                                 _set_constant(1, lambda a: a + 1))),
    "concat axis": ("func", lambda d: _onnx_edit(d, _op("Concat"), _set_attr("axis", 2))),
    "eltwise op": ("func", lambda d: _onnx_edit(d, _op("Add"), _set_op_type("Sub"))),
    "scalar coefficient": ("func", lambda d: _onnx_edit(d, _op("Mul"),
                                                        _set_constant(1, lambda a: a * 1.5))),
    "deconv scale": ("up", lambda d: _onnx_edit(d, _op("ConvTranspose"), _scale_input(1, 1.5))),
    "linear weight": ("bn", lambda d: _onnx_edit(d, _op("Gemm"), _scale_input(1, 0.9))),
}


# Caffe -----------------------------------------------------------------------------------
def _caffe_edit(directory: Path, pick: Callable[[object], bool],
                text: Callable[[object], None] | None = None,
                blobs: Callable[[object], None] | None = None) -> str:
    """Change the first layer ``pick`` accepts: its parameters and/or its weights."""
    proto_path, model_path = directory / "model.prototxt", directory / "model.caffemodel"
    net = read_prototxt(proto_path)
    layer = next(lay for lay in net.layer if pick(lay))
    if text is not None:
        text(layer)
        proto_path.write_text(text_format.MessageToString(net))
        rehash(directory, proto_path.name)
    if blobs is not None:
        weights = read_caffemodel(model_path)
        blobs(next(lay for lay in weights.layer if lay.name == layer.name))
        model_path.write_bytes(weights.SerializeToString())
        rehash(directory, model_path.name)
    return layer.name


def _layer(type_: str, name: str | None = None) -> Callable[[object], bool]:
    return lambda lay: lay.type == type_ and (name is None or lay.name == name)


def _scale_blob(index: int, factor: float) -> Callable[[object], None]:
    def change(layer: object) -> None:
        blob = layer.blobs[index]  # type: ignore[attr-defined]
        data = np.array(blob.data, dtype=np.float32) * factor
        del blob.data[:]
        blob.data.extend(data.tolist())
    return change


def _param(group: str, **values: object) -> Callable[[object], None]:
    def change(layer: object) -> None:
        message = getattr(layer, group)
        for key, value in values.items():
            if isinstance(value, list):  # a repeated field
                del getattr(message, key)[:]
                getattr(message, key).extend(value)
            else:
                setattr(message, key, value)
    return change


CAFFE_CASES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "conv pad": ("bn", lambda d: _caffe_edit(d, _layer("Convolution", "head"),
                                             _param("convolution_param", pad=[2]))),
    "conv pad (before a residual add)": (
        "func", lambda d: _caffe_edit(d, _layer("Convolution", "conv2"),
                                      _param("convolution_param", pad=[0]))),
    "scaled conv weight": ("bn", lambda d: _caffe_edit(d, _layer("Convolution"),
                                                       blobs=_scale_blob(0, 1.1))),
    "zeroed bias": ("up", lambda d: _caffe_edit(d, _layer("Convolution", "conv2"),
                                                blobs=_scale_blob(1, 0.0))),
    "pool kernel": ("bn", lambda d: _caffe_edit(d, _layer("Pooling", "pool"),
                                                _param("pooling_param", kernel_size=2))),
    "pool stride (floor-mode pool)": ("func", lambda d: _caffe_edit(
        d, lambda lay: lay.type == "Pooling" and lay.name.startswith("max_pool2d"),
        _param("pooling_param", stride=1))),
    "BN epsilon": ("bn", lambda d: _caffe_edit(d, _layer("BatchNorm"),
                                               _param("batch_norm_param", eps=0.3))),
    "BN scale": ("bn", lambda d: _caffe_edit(d, _layer("Scale"), blobs=_scale_blob(0, 1.2))),
    "upsample deconv scale": ("up", lambda d: _caffe_edit(
        d, _layer("Deconvolution", "upsample_nearest2d"), blobs=_scale_blob(0, 1.5))),
    "bilinear taps": ("up", lambda d: _caffe_edit(
        d, _layer("Deconvolution", "upsample_bilinear2d"), blobs=_scale_blob(0, 0.8))),
    "slice point": ("func", lambda d: _caffe_edit(d, _layer("Slice", "split_with_sizes"),
                                                  _param("slice_param", slice_point=[4]))),
    "concat axis": ("func", lambda d: _caffe_edit(d, _layer("Concat", "cat"),
                                                  _param("concat_param", axis=2))),
    "eltwise coefficient": ("func", lambda d: _caffe_edit(
        d, _layer("Eltwise"), _param("eltwise_param", coeff=[1.0, 0.5]))),
    "scalar coefficient": ("func", lambda d: _caffe_edit(d, _layer("Power", "mul"),
                                                         _param("power_param", scale=3.0))),
    "deconv scale": ("up", lambda d: _caffe_edit(d, _layer("Deconvolution", "deconv"),
                                                 blobs=_scale_blob(0, 1.5))),
    "linear weight": ("bn", lambda d: _caffe_edit(d, _layer("InnerProduct"),
                                                  blobs=_scale_blob(0, 0.9))),
}


# MsnhNet ---------------------------------------------------------------------------------
def _msnh_layers(directory: Path) -> tuple[list[list[str]], list]:
    """The text split into layer blocks (config first) and the runtime's parsed layers."""
    text = (directory / "model.msnhnet").read_text()
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")) and line.endswith(":") \
                and line != "config:":
            blocks.append([])
        blocks[-1].append(line)
    return blocks, build(text).layers


def _msnh_edit(directory: Path, pick: Callable[[object], bool],
               field: str | None = None, value: str | None = None,
               weights: Callable[[np.ndarray], np.ndarray] | None = None,
               block: int = 0) -> str:
    """Change the first layer ``pick`` accepts: one text field and/or one weight block."""
    blocks, layers = _msnh_layers(directory)
    layer = next(lay for lay in layers if pick(lay))
    if field is not None:
        lines = blocks[layer.index + 1]
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(field + ":"))
        lines[at] = f"  {field}: {value}"
        (directory / "model.msnhnet").write_text("\n".join(sum(blocks, [])) + "\n")
        rehash(directory, "model.msnhnet")
    if weights is not None:
        path = directory / "model.msnhbin"
        data = np.fromfile(path, dtype="<f4")
        offset = sum(lay.num_weights for lay in layers[:layer.index])
        offset += sum(n for _, n in layer.block_sizes[:block])
        size = layer.block_sizes[block][1]
        data[offset:offset + size] = weights(data[offset:offset + size])
        data.astype("<f4").tofile(path)
        rehash(directory, path.name)
    return f"#{layer.index}"


def _kind(kind: str, nth: int = 0, **params: object) -> Callable[[object], bool]:
    seen: list[int] = []

    def pick(layer: object) -> bool:
        if layer.kind != kind or any(layer.params.get(k) != v  # type: ignore[attr-defined]
                                     for k, v in params.items()):
            return False
        seen.append(1)
        return len(seen) == nth + 1
    return pick


MSNHNET_CASES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "conv pad": ("bn", lambda d: _msnh_edit(d, _kind("conv", 3), "padding", "2")),
    "conv pad (before a residual add)": ("func", lambda d: _msnh_edit(
        d, _kind("conv", 2), "padding", "0")),
    "scaled conv weight": ("bn", lambda d: _msnh_edit(d, _kind("conv"),
                                                      weights=lambda w: w * 1.1)),
    "zeroed bias": ("up", lambda d: _msnh_edit(d, _kind("conv", 1), weights=lambda w: w * 0,
                                               block=1)),
    "pool kernel": ("bn", lambda d: _msnh_edit(d, _kind("maxpool"), "kSizeX", "2")),
    "pool rounding": ("bn", lambda d: _msnh_edit(d, _kind("padding"), "down", "0")),
    "BN epsilon": ("bn", lambda d: _msnh_edit(d, _kind("batchnorm"), "eps", "0.3")),
    "BN scale": ("bn", lambda d: _msnh_edit(d, _kind("batchnorm"), weights=lambda w: w * 1.2)),
    "upsample mode": ("up", lambda d: _msnh_edit(d, _kind("upsample"), "type", "bilinear")),
    "slice point": ("func", lambda d: _msnh_edit(d, _kind("slice"), "start0", "4")),
    "concat order": ("func", lambda d: _swap_route(d)),
    "eltwise op": ("func", lambda d: _msnh_edit(d, _kind("varop", type="add"), "type", "sub")),
    "scalar coefficient": ("func", lambda d: _msnh_edit(d, _kind("varop", type="mulConst"),
                                                        "constVal", "3")),
    "deconv scale": ("up", lambda d: _msnh_edit(d, _kind("deconv"), weights=lambda w: w * 1.5)),
    "linear weight": ("bn", lambda d: _msnh_edit(d, _kind("connect"),
                                                 weights=lambda w: w * 0.9)),
}


def _swap_route(directory: Path) -> str:
    """A concat route whose two sources are listed the other way round."""
    blocks, layers = _msnh_layers(directory)
    layer = next(lay for lay in layers if lay.kind == "route"
                 and len(lay.params.get("layers", ())) == 2)
    lines = blocks[layer.index + 1]
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("layers:"))
    first, second = lines[at].split(":", 1)[1].strip().split(",")
    lines[at] = f"  layers: {second},{first}"
    (directory / "model.msnhnet").write_text("\n".join(sum(blocks, [])) + "\n")
    rehash(directory, "model.msnhnet")
    return f"#{layer.index}"


CASES = {"onnx": ONNX_CASES, "caffe": CAFFE_CASES, "msnhnet": MSNHNET_CASES}


@dataclass
class Outcome:
    fmt: str
    case: str
    injected: str
    detected: bool
    named: bool
    divergence: str


def run_case(exports: dict[str, tuple[nn.Module, Path]], fmt: str, case: str,
             inject: tuple[str, Callable[[Path], str]], root: Path) -> Outcome:
    net_name, change = inject
    net, source = exports[net_name]
    directory = root / f"{fmt}-{case.replace(' ', '_').replace('(', '').replace(')', '')}"
    shutil.copytree(source, directory)
    injected = change(directory)
    report = dp.verify(directory, model=net)
    where = report.divergence.get(fmt, "")
    profile = report.layers.get(fmt)
    row = profile.culprit_row if profile is not None else None
    named = row is not None and injected in row.layers and f"'{injected}'" in where
    return Outcome(fmt, case, injected, not report.format_passed(fmt), named, where)


def test_injected_conversion_bugs_are_detected_and_localised(
        exports: dict[str, tuple[nn.Module, Path]], tmp_path: Path) -> None:
    outcomes = [run_case(exports, fmt, case, inject, tmp_path)
                for fmt, cases in CASES.items() for case, inject in cases.items()]
    kinds = {case.split(" (")[0] for cases in CASES.values() for case in cases}
    assert len(kinds) >= 10
    for o in outcomes:
        print(f"{o.fmt:<8} {o.case:<34} {o.injected:<40} "
              f"{'detected' if o.detected else 'MISSED':<9} "
              f"{'named' if o.named else 'NOT NAMED'}  {o.divergence}")
    assert all(o.detected for o in outcomes), [o for o in outcomes if not o.detected]
    overall = sum(o.named for o in outcomes) / len(outcomes)
    print(f"localised: {overall:.1%} of {len(outcomes)} cases")
    for fmt in CASES:
        mine = [o for o in outcomes if o.fmt == fmt]
        rate = sum(o.named for o in mine) / len(mine)
        print(f"  {fmt}: {rate:.1%} of {len(mine)}")
        assert rate >= 0.95, (fmt, [o for o in mine if not o.named])
    assert overall >= 0.95
