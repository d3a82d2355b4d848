"""The Caffe schema: BVLC field numbers on the wire, dialects kept apart, files parse back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import nn

from deployplug.exporters import get_exporter
from deployplug.exporters.caffe.schema import DIALECTS, messages, proto_text
from deployplug.exporters.caffe.writer import _blob_bytes, blob_array, read_caffemodel


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def wire_fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, payload) of one message, read without any schema."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.append((number, wire, value))
    return out


BVLC_NUMBERS = {
    "NetParameter": {"name": 1, "input": 3, "input_shape": 8, "input_dim": 4, "layer": 100},
    "LayerParameter": {
        "name": 1, "type": 2, "bottom": 3, "top": 4, "blobs": 7, "include": 8, "phase": 10,
        "argmax_param": 103, "batch_norm_param": 139, "concat_param": 104,
        "convolution_param": 106, "crop_param": 144, "dropout_param": 108,
        "eltwise_param": 110, "elu_param": 140, "flatten_param": 135,
        "inner_product_param": 117, "input_param": 143, "pooling_param": 121,
        "power_param": 122, "prelu_param": 131, "relu_param": 123, "reshape_param": 133,
        "scale_param": 142, "sigmoid_param": 124, "slice_param": 126, "softmax_param": 125,
        "tanh_param": 127, "reduction_param": 136,
    },
    "BlobProto": {"shape": 7, "data": 5, "diff": 6, "num": 1, "channels": 2, "height": 3,
                  "width": 4},
    "BlobShape": {"dim": 1},
    "ConvolutionParameter": {"num_output": 1, "bias_term": 2, "pad": 3, "kernel_size": 4,
                             "stride": 6, "dilation": 18, "pad_h": 9, "pad_w": 10,
                             "kernel_h": 11, "kernel_w": 12, "stride_h": 13, "stride_w": 14,
                             "group": 5},
    "PoolingParameter": {"pool": 1, "pad": 4, "pad_h": 9, "pad_w": 10, "kernel_size": 2,
                         "kernel_h": 5, "kernel_w": 6, "stride": 3, "stride_h": 7,
                         "stride_w": 8, "global_pooling": 12},
    "BatchNormParameter": {"use_global_stats": 1, "moving_average_fraction": 2, "eps": 3},
    "ScaleParameter": {"axis": 1, "num_axes": 2, "bias_term": 4},
    "InnerProductParameter": {"num_output": 1, "bias_term": 2, "axis": 5, "transpose": 6},
    "EltwiseParameter": {"operation": 1, "coeff": 2},
    "ConcatParameter": {"axis": 2},
    "SliceParameter": {"axis": 3, "slice_point": 2},
    "ReLUParameter": {"negative_slope": 1},
    "PReLUParameter": {"channel_shared": 2},
    "PowerParameter": {"power": 1, "scale": 2, "shift": 3},
    "SoftmaxParameter": {"axis": 2},
    "FlattenParameter": {"axis": 1, "end_axis": 2},
    "ReshapeParameter": {"shape": 1, "axis": 2, "num_axes": 3},
    "CropParameter": {"axis": 1, "offset": 2},
    "ArgMaxParameter": {"out_max_val": 1, "top_k": 2, "axis": 3},
    "InputParameter": {"shape": 1},
    "ELUParameter": {"alpha": 1},
    "DropoutParameter": {"dropout_ratio": 1},
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_field_numbers_are_bvlc(dialect):
    m = messages(dialect)
    for msg_name, fields in BVLC_NUMBERS.items():
        descriptor = getattr(m, msg_name).DESCRIPTOR
        assert descriptor.full_name == f"caffe.{msg_name}"
        for field_name, number in fields.items():
            assert descriptor.fields_by_name[field_name].number == number, (msg_name, field_name)


def test_defaults_follow_caffe():
    m = messages("bvlc")
    assert m.ConvolutionParameter().bias_term is True
    assert m.ConvolutionParameter().group == 1
    assert m.PoolingParameter().pool == 0  # MAX
    assert m.EltwiseParameter().operation == 1  # SUM
    assert m.ConcatParameter().axis == 1
    assert m.FlattenParameter().end_axis == -1
    assert m.PowerParameter().scale == 1.0
    assert m.BatchNormParameter().eps == pytest.approx(1e-5)
    assert m.CropParameter().axis == 2


def test_pooling_field_13_differs_by_dialect():
    bvlc = messages("bvlc").PoolingParameter.DESCRIPTOR.fields_by_number[13]
    opencv = messages("opencv").PoolingParameter.DESCRIPTOR.fields_by_number[13]
    assert bvlc.name == "round_mode" and bvlc.enum_type.values_by_name["FLOOR"].number == 1
    assert opencv.name == "ceil_mode" and opencv.default_value is True
    assert "ceil_mode" not in messages("bvlc").PoolingParameter.DESCRIPTOR.fields_by_name


def test_upsample_only_in_om_dialect():
    assert "upsample_param" in messages("om").LayerParameter.DESCRIPTOR.fields_by_name
    for dialect in ("bvlc", "opencv"):
        assert "upsample_param" not in messages(dialect).LayerParameter.DESCRIPTOR.fields_by_name
    with pytest.raises(text_format.ParseError):
        text_format.Parse('layer { upsample_param { stride_h: 2 } }',
                          messages("bvlc").NetParameter())


def test_proto_text_is_a_readable_schema():
    text = proto_text("bvlc")
    assert 'syntax = "proto2";' in text and "package caffe;" in text
    assert "repeated LayerParameter layer = 100;" in text
    assert "optional ConvolutionParameter convolution_param = 106;" in text
    assert "repeated float data = 5 [packed = true];" in text


def test_fast_blob_encoding_equals_protobuf():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5
    m = messages("bvlc")
    slow = m.BlobProto()
    slow.shape.dim.extend(arr.shape)
    slow.data.extend(arr.ravel().tolist())
    fast = m.BlobProto()
    fast.MergeFromString(_blob_bytes(arr))
    assert fast == slow
    np.testing.assert_array_equal(blob_array(fast), arr)


def test_caffemodel_wire_uses_bvlc_numbers(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.ReLU()).eval()
    exporter = get_exporter("caffe")
    exporter.write(model, (torch.randn(1, 3, 5, 5),), tmp_path, "caffe")
    raw = (tmp_path / "model.caffemodel").read_bytes()
    top = wire_fields(raw)
    assert {n for n, _, _ in top} <= {1, 100}
    layers = [payload for n, wire, payload in top if n == 100 and wire == 2]
    assert (1, 2, b"Sequential") in top  # the net's name
    conv = [wire_fields(lay) for lay in layers]
    conv = next(f for f in conv if (2, 2, b"Convolution") in f)
    assert (1, 2, b"0") in conv  # layer name = module path
    blobs = [wire_fields(p) for n, w, p in conv if n == 7]
    assert len(blobs) == 2
    shape = next(p for n, _, p in blobs[0] if n == 7)
    dims_payload = next(p for n, _, p in wire_fields(shape) if n == 1)
    dims, i = [], 0
    while i < len(dims_payload):
        d, i = _varint(dims_payload, i)
        dims.append(d)
    assert dims == [4, 3, 3, 3]
    data = next(p for n, _, p in blobs[0] if n == 5)
    np.testing.assert_array_equal(np.frombuffer(data, "<f4"),
                                  model[0].weight.detach().numpy().ravel())
    # and the schema reads the same bytes back
    parsed = read_caffemodel(tmp_path / "model.caffemodel")
    np.testing.assert_array_equal(blob_array(parsed.layer[0].blobs[1]),
                                  model[0].bias.detach().numpy())


def test_prototxt_params_use_bvlc_numbers_in_binary(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, (1, 3), stride=2, padding=(0, 1)),
                          nn.MaxPool2d(2)).eval()
    get_exporter("caffe").write(model, (torch.randn(1, 3, 6, 6),), tmp_path, "caffe")
    net = messages("bvlc").NetParameter()
    text_format.Parse((tmp_path / "model.prototxt").read_text(), net)
    fields = [wire_fields(p) for n, _, p in wire_fields(net.SerializeToString()) if n == 100]
    conv = next(f for f in fields if (2, 2, b"Convolution") in f)
    conv_param = dict((n, p) for n, _, p in wire_fields(next(p for n, _, p in conv if n == 106)))
    assert conv_param[1] == 4  # num_output
    assert conv_param[11] == 1 and conv_param[12] == 3  # kernel_h, kernel_w
    assert conv_param[10] == 1  # pad_w
    pool = next(f for f in fields if (2, 2, b"Pooling") in f)
    pool_param = dict((n, p) for n, _, p in wire_fields(next(p for n, _, p in pool if n == 121)))
    assert pool_param[2] == 2 and pool_param[3] == 2  # kernel_size, stride
    assert 13 not in pool_param  # neither round_mode nor ceil_mode is ever written
