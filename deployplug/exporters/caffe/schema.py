"""The Caffe protobuf schema, built in Python from field numbers (no protoc, no generated code).

Caffe files are ``caffe.NetParameter`` messages: text format for the ``.prototxt``, binary for
the ``.caffemodel``. Readers match binary fields by *number*, so every number below is the one
BVLC's ``caffe.proto`` assigns. Forks reuse some numbers for different things (pooling field 13
is BVLC's ``round_mode`` enum but OpenCV's ``ceil_mode`` bool), so each dialect gets its own
descriptor pool and fork-only fields live only in the dialect that owns them:

* ``bvlc``   -- BVLC master, what the ``caffe`` target writes;
* ``om``     -- ``bvlc`` plus the ``Upsample`` layer of Huawei's Ascend converter (ATC);
* ``opencv`` -- ``bvlc`` with OpenCV's ``ceil_mode`` in place of ``round_mode``.

Only the messages and fields the lowering emits (plus the few every reader expects) are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DIALECTS = ("bvlc", "om", "opencv")

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}


@dataclass(frozen=True)
class _Field:
    name: str
    number: int
    type: str  # a scalar name, or the name of a message / enum in this file
    label: str = "optional"  # "optional" | "repeated" | "packed"
    default: str | None = None


def _f(name: str, number: int, type_: str, label: str = "optional", default: Any = None) -> _Field:
    return _Field(name, number, type_, label, None if default is None else str(default).lower()
                  if isinstance(default, bool) else str(default))


_ENUMS: dict[str, list[tuple[str, int]]] = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    "PoolingParameter.PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
    "PoolingParameter.RoundMode": [("CEIL", 0), ("FLOOR", 1)],
    "EltwiseParameter.EltwiseOp": [("PROD", 0), ("SUM", 1), ("MAX", 2)],
    "ReductionParameter.ReductionOp": [("SUM", 1), ("ASUM", 2), ("SUMSQ", 3), ("MEAN", 4)],
}

# The BVLC messages. ``LayerParameter`` only lists the ``*_param`` fields the lowering uses.
_MESSAGES: dict[str, list[_Field]] = {
    "BlobShape": [_f("dim", 1, "int64", "packed")],
    "BlobProto": [
        _f("shape", 7, "BlobShape"),
        _f("data", 5, "float", "packed"),
        _f("diff", 6, "float", "packed"),
        _f("double_data", 8, "double", "packed"),
        _f("double_diff", 9, "double", "packed"),
        _f("num", 1, "int32", default=0),
        _f("channels", 2, "int32", default=0),
        _f("height", 3, "int32", default=0),
        _f("width", 4, "int32", default=0),
    ],
    "NetState": [
        _f("phase", 1, "Phase", default="TEST"),
        _f("level", 2, "int32", default=0),
        _f("stage", 3, "string", "repeated"),
    ],
    "NetStateRule": [
        _f("phase", 1, "Phase"),
        _f("min_level", 2, "int32"),
        _f("max_level", 3, "int32"),
        _f("stage", 4, "string", "repeated"),
        _f("not_stage", 5, "string", "repeated"),
    ],
    "NetParameter": [
        _f("name", 1, "string"),
        _f("input", 3, "string", "repeated"),
        _f("input_shape", 8, "BlobShape", "repeated"),
        _f("input_dim", 4, "int32", "repeated"),
        _f("force_backward", 5, "bool", default=False),
        _f("state", 6, "NetState"),
        _f("debug_info", 7, "bool", default=False),
        _f("layer", 100, "LayerParameter", "repeated"),
    ],
    "LayerParameter": [
        _f("name", 1, "string"),
        _f("type", 2, "string"),
        _f("bottom", 3, "string", "repeated"),
        _f("top", 4, "string", "repeated"),
        _f("phase", 10, "Phase"),
        _f("loss_weight", 5, "float", "repeated"),
        _f("blobs", 7, "BlobProto", "repeated"),
        _f("propagate_down", 11, "bool", "repeated"),
        _f("include", 8, "NetStateRule", "repeated"),
        _f("exclude", 9, "NetStateRule", "repeated"),
        _f("argmax_param", 103, "ArgMaxParameter"),
        _f("batch_norm_param", 139, "BatchNormParameter"),
        _f("concat_param", 104, "ConcatParameter"),
        _f("convolution_param", 106, "ConvolutionParameter"),
        _f("crop_param", 144, "CropParameter"),
        _f("dropout_param", 108, "DropoutParameter"),
        _f("eltwise_param", 110, "EltwiseParameter"),
        _f("elu_param", 140, "ELUParameter"),
        _f("flatten_param", 135, "FlattenParameter"),
        _f("inner_product_param", 117, "InnerProductParameter"),
        _f("input_param", 143, "InputParameter"),
        _f("pooling_param", 121, "PoolingParameter"),
        _f("power_param", 122, "PowerParameter"),
        _f("prelu_param", 131, "PReLUParameter"),
        _f("reduction_param", 136, "ReductionParameter"),
        _f("relu_param", 123, "ReLUParameter"),
        _f("reshape_param", 133, "ReshapeParameter"),
        _f("scale_param", 142, "ScaleParameter"),
        _f("sigmoid_param", 124, "SigmoidParameter"),
        _f("slice_param", 126, "SliceParameter"),
        _f("softmax_param", 125, "SoftmaxParameter"),
        _f("tanh_param", 127, "TanHParameter"),
    ],
    "ArgMaxParameter": [
        _f("out_max_val", 1, "bool", default=False),
        _f("top_k", 2, "uint32", default=1),
        _f("axis", 3, "int32"),
    ],
    "BatchNormParameter": [
        _f("use_global_stats", 1, "bool"),
        _f("moving_average_fraction", 2, "float", default=0.999),
        _f("eps", 3, "float", default=1e-5),
    ],
    "ConcatParameter": [
        _f("axis", 2, "int32", default=1),
        _f("concat_dim", 1, "uint32", default=1),
    ],
    "ConvolutionParameter": [
        _f("num_output", 1, "uint32"),
        _f("bias_term", 2, "bool", default=True),
        _f("pad", 3, "uint32", "repeated"),
        _f("kernel_size", 4, "uint32", "repeated"),
        _f("stride", 6, "uint32", "repeated"),
        _f("dilation", 18, "uint32", "repeated"),
        _f("pad_h", 9, "uint32", default=0),
        _f("pad_w", 10, "uint32", default=0),
        _f("kernel_h", 11, "uint32"),
        _f("kernel_w", 12, "uint32"),
        _f("stride_h", 13, "uint32"),
        _f("stride_w", 14, "uint32"),
        _f("group", 5, "uint32", default=1),
        _f("axis", 16, "int32", default=1),
        _f("force_nd_im2col", 17, "bool", default=False),
    ],
    "CropParameter": [_f("axis", 1, "int32", default=2), _f("offset", 2, "uint32", "repeated")],
    "DropoutParameter": [_f("dropout_ratio", 1, "float", default=0.5)],
    "EltwiseParameter": [
        _f("operation", 1, "EltwiseParameter.EltwiseOp", default="SUM"),
        _f("coeff", 2, "float", "repeated"),
        _f("stable_prod_grad", 3, "bool", default=True),
    ],
    "ELUParameter": [_f("alpha", 1, "float", default=1)],
    "FlattenParameter": [_f("axis", 1, "int32", default=1), _f("end_axis", 2, "int32", default=-1)],
    "InnerProductParameter": [
        _f("num_output", 1, "uint32"),
        _f("bias_term", 2, "bool", default=True),
        _f("axis", 5, "int32", default=1),
        _f("transpose", 6, "bool", default=False),
    ],
    "InputParameter": [_f("shape", 1, "BlobShape", "repeated")],
    "PoolingParameter": [
        _f("pool", 1, "PoolingParameter.PoolMethod", default="MAX"),
        _f("pad", 4, "uint32", default=0),
        _f("pad_h", 9, "uint32", default=0),
        _f("pad_w", 10, "uint32", default=0),
        _f("kernel_size", 2, "uint32"),
        _f("kernel_h", 5, "uint32"),
        _f("kernel_w", 6, "uint32"),
        _f("stride", 3, "uint32", default=1),
        _f("stride_h", 7, "uint32"),
        _f("stride_w", 8, "uint32"),
        _f("global_pooling", 12, "bool", default=False),
    ],
    "PowerParameter": [
        _f("power", 1, "float", default=1.0),
        _f("scale", 2, "float", default=1.0),
        _f("shift", 3, "float", default=0.0),
    ],
    "PReLUParameter": [_f("channel_shared", 2, "bool", default=False)],
    "ReductionParameter": [
        _f("operation", 1, "ReductionParameter.ReductionOp", default="SUM"),
        _f("axis", 2, "int32", default=0),
        _f("coeff", 3, "float", default=1.0),
    ],
    "ReLUParameter": [_f("negative_slope", 1, "float", default=0)],
    "ReshapeParameter": [
        _f("shape", 1, "BlobShape"),
        _f("axis", 2, "int32", default=0),
        _f("num_axes", 3, "int32", default=-1),
    ],
    "ScaleParameter": [
        _f("axis", 1, "int32", default=1),
        _f("num_axes", 2, "int32", default=1),
        _f("bias_term", 4, "bool", default=False),
    ],
    "SigmoidParameter": [],
    "SliceParameter": [
        _f("axis", 3, "int32", default=1),
        _f("slice_point", 2, "uint32", "repeated"),
        _f("slice_dim", 1, "uint32", default=1),
    ],
    "SoftmaxParameter": [_f("axis", 2, "int32", default=1)],
    "TanHParameter": [],
}

# Field 13 of PoolingParameter: the number two forks gave different meanings.
_POOL_ROUND_BVLC = _f("round_mode", 13, "PoolingParameter.RoundMode", default="CEIL")
_POOL_CEIL_OPENCV = _f("ceil_mode", 13, "bool", default=True)

# Ascend ATC's nearest-neighbour Upsample (values are multiplied by ``scale``).
_UPSAMPLE_MESSAGE = [
    _f("scale", 1, "float", default=1),
    _f("stride", 2, "int32", default=2),
    _f("stride_h", 3, "int32", default=2),
    _f("stride_w", 4, "int32", default=2),
]
_UPSAMPLE_FIELD = _f("upsample_param", 160, "UpsampleParameter")


def _dialect_messages(dialect: str) -> dict[str, list[_Field]]:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown Caffe dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    messages = {k: list(v) for k, v in _MESSAGES.items()}
    messages["PoolingParameter"].append(
        _POOL_CEIL_OPENCV if dialect == "opencv" else _POOL_ROUND_BVLC
    )
    if dialect == "om":
        messages["UpsampleParameter"] = list(_UPSAMPLE_MESSAGE)
        messages["LayerParameter"].append(_UPSAMPLE_FIELD)
    return messages


def file_descriptor(dialect: str = "bvlc") -> descriptor_pb2.FileDescriptorProto:
    """The ``caffe`` proto2 file of one dialect, as a descriptor (what protoc would produce)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"deployplug_caffe_{dialect}.proto", package="caffe", syntax="proto2"
    )
    messages = _dialect_messages(dialect)
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}
    for msg_name in messages:
        protos[msg_name] = fdp.message_type.add(name=msg_name)
    for enum_name, values in _ENUMS.items():
        owner, _, short = enum_name.rpartition(".")
        container = protos[owner].enum_type if owner else fdp.enum_type
        enum = container.add(name=short)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for msg_name, fields in messages.items():
        for fld in fields:
            _add_field(protos[msg_name], fld, set(messages))
    return fdp


def _add_field(msg: descriptor_pb2.DescriptorProto, fld: _Field, message_names: set[str]) -> None:
    proto = msg.field.add(name=fld.name, number=fld.number)
    proto.label = _F.LABEL_REPEATED if fld.label in ("repeated", "packed") else _F.LABEL_OPTIONAL
    if fld.label == "packed":
        proto.options.packed = True
    if fld.type in _SCALARS:
        proto.type = _SCALARS[fld.type]
    elif fld.type in message_names:
        proto.type = _F.TYPE_MESSAGE
        proto.type_name = f".caffe.{fld.type}"
    elif fld.type in _ENUMS:
        proto.type = _F.TYPE_ENUM
        proto.type_name = f".caffe.{fld.type}"
    else:
        raise KeyError(f"schema type {fld.type!r} of field {fld.name!r} is not defined")
    if fld.default is not None:
        proto.default_value = fld.default


@cache
def messages(dialect: str = "bvlc") -> SimpleNamespace:
    """Message classes of one dialect: ``messages("bvlc").NetParameter()`` etc.

    Every dialect lives in its own descriptor pool, because the forks disagree about what
    some field numbers mean and one pool cannot hold two ``caffe.PoolingParameter``.
    """
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_descriptor(dialect))
    classes = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
        for name in _dialect_messages(dialect)
    }
    return SimpleNamespace(dialect=dialect, **classes)


def proto_text(dialect: str = "bvlc") -> str:
    """The schema as ``.proto`` source text, for readers who want to compile it themselves."""
    fdp = file_descriptor(dialect)
    lines = ['syntax = "proto2";', "package caffe;", ""]
    for enum in fdp.enum_type:
        lines += _enum_text(enum, "")
    for msg in fdp.message_type:
        lines.append(f"message {msg.name} {{")
        for enum in msg.enum_type:
            lines += _enum_text(enum, "  ")
        for fld in msg.field:
            lines.append("  " + _field_text(fld))
        lines += ["}", ""]
    return "\n".join(lines)


def _enum_text(enum: descriptor_pb2.EnumDescriptorProto, indent: str) -> list[str]:
    body = [f"{indent}  {v.name} = {v.number};" for v in enum.value]
    return [f"{indent}enum {enum.name} {{", *body, f"{indent}}}"]


def _field_text(fld: descriptor_pb2.FieldDescriptorProto) -> str:
    label = "repeated" if fld.label == _F.LABEL_REPEATED else "optional"
    if fld.type_name:
        type_name = fld.type_name.removeprefix(".caffe.")
    else:
        type_name = next(k for k, v in _SCALARS.items() if v == fld.type)
    opts = []
    if fld.options.packed:
        opts.append("packed = true")
    if fld.HasField("default_value"):
        opts.append(f"default = {fld.default_value}")
    suffix = f" [{', '.join(opts)}]" if opts else ""
    return f"{label} {type_name} {fld.name} = {fld.number}{suffix};"
