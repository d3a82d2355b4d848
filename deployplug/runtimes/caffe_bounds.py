"""Declared sizes in Caffe files, checked before OpenCV sees them.

OpenCV's Caffe importer trusts what the files say: a weight blob whose shape claims a billion
rows is allocated at that size before its data is compared with the shape, and its shape
inference multiplies dimensions in 32-bit ints, so a padding of 100000 wraps to a negative
size. Everything here runs on the parsed protobuf messages (whose size the file caps bound)
and refuses, with the layer named:

* any integer parameter outside the 32-bit range OpenCV stores it in;
* spatial parameters (kernel, pad, stride, dilation) above :data:`MAX_SPATIAL` and output
  counts above :data:`MAX_OUTPUTS`, values no real network uses;
* input shapes and weight blobs over the tensor budget, and blobs whose data does not match
  their declared shape;

and :func:`check_layer_shapes` checks the shapes OpenCV infers for a concrete input (without
allocating them) against the budget before a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from deployplug.errors import ArtifactFormatError
from deployplug.limits import INT32_MAX, Limits

#: no real kernel, padding, stride or dilation comes close; OpenCV keeps them in ints
MAX_SPATIAL = 65_535
#: a layer with more outputs than this is not a network anybody deploys
MAX_OUTPUTS = 1 << 24
#: far more layers than any real network; bounds the bookkeeping a hostile file can demand
MAX_LAYERS = 20_000

_SPATIAL = frozenset({"pad", "kernel_size", "stride", "dilation", "pad_h", "pad_w",
                      "kernel_h", "kernel_w", "stride_h", "stride_w"})
_COUNTS = frozenset({"num_output"})
_INT_TYPES = frozenset({FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64,
                        FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
                        FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
                        FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
                        FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64})


def _is_repeated(fld: FieldDescriptor) -> bool:
    if hasattr(fld, "is_repeated"):
        return bool(fld.is_repeated)
    return fld.label == FieldDescriptor.LABEL_REPEATED


def _check_ints(message: Any, where: str, path: str = "",
                skip: frozenset[str] = frozenset({"blobs"})) -> None:
    """Every integer field inside ``message`` (``skip`` excluded) against its range."""
    for fld, value in message.ListFields():
        name = f"{path}{fld.name}"
        if fld.name in skip:
            continue
        values = list(value) if _is_repeated(fld) else [value]
        if fld.type == FieldDescriptor.TYPE_MESSAGE:
            for item in values:
                _check_ints(item, where, f"{name}.")
            continue
        if fld.type not in _INT_TYPES:
            continue
        high = INT32_MAX
        if fld.name in _SPATIAL and fld.containing_type.name != "BlobShape":
            high = MAX_SPATIAL
        elif fld.name in _COUNTS:
            high = MAX_OUTPUTS
        for item in values:
            if not -INT32_MAX - 1 <= item <= high:
                raise ArtifactFormatError(
                    f"{where}: {name} = {item} is outside [{-INT32_MAX - 1}, {high}]; the file "
                    "is damaged or hostile")


def _blob_count(blob: Any, where: str) -> int:
    if blob.HasField("shape"):
        dims = list(blob.shape.dim)
    else:
        dims = [d for d in (blob.num, blob.channels, blob.height, blob.width)]
    if any(d < 0 or d > INT32_MAX for d in dims):
        raise ArtifactFormatError(f"{where}: blob shape {dims} has a negative or oversized "
                                  "dimension")
    count = math.prod(dims)
    held = len(blob.data) if len(blob.data) else len(blob.double_data)
    if count != held:
        raise ArtifactFormatError(f"{where}: blob shape {dims} declares {count} values but "
                                  f"the file holds {held}")
    return count


def _layer_where(source: str, index: int, layer: Any) -> str:
    return f"{source}: layer {index} '{layer.name}' ({layer.type})"


def check_net(net: Any, source: str, limits: Limits) -> int:
    """Check one parsed ``NetParameter``; returns the bytes its blobs will take as float32."""
    if len(net.layer) > MAX_LAYERS:
        raise ArtifactFormatError(f"{source}: {len(net.layer)} layers, more than {MAX_LAYERS}")
    _check_ints(net, source, skip=frozenset({"layer"}))
    for shape in net.input_shape:
        limits.check_tensor(list(shape.dim), 4, f"{source}: input_shape")
    if net.input_dim:
        limits.check_tensor(list(net.input_dim), 4, f"{source}: input_dim")
    blob_bytes = 0
    for index, layer in enumerate(net.layer):
        where = _layer_where(source, index, layer)
        _check_ints(layer, where)
        if layer.HasField("input_param"):
            for shape in layer.input_param.shape:
                limits.check_tensor(list(shape.dim), 4, f"{where}: input shape")
        for b, blob in enumerate(layer.blobs):
            blob_bytes += 4 * _blob_count(blob, f"{where}: blob {b}")
            limits.check_total(blob_bytes, f"{source}: weight blobs up to {where}")
    return blob_bytes


def input_order(net: Any) -> list[str]:
    """Net input names in the order OpenCV numbers them (``input:`` fields, Input layers)."""
    names = list(net.input)
    for layer in net.layer:
        if layer.type == "Input":
            names += list(layer.top)
    return names


def check_layer_shapes(cv_net: Any, input_shapes: Sequence[Sequence[int]], limits: Limits,
                       weight_bytes: int, source: str) -> None:
    """The shapes OpenCV will allocate for ``input_shapes``, summed, against the budget.

    ``getLayersShapes`` only infers shapes; nothing of those sizes exists yet. Dimensions are
    multiplied here in Python ints, so an overflow inside OpenCV cannot hide a huge layer.
    """
    import cv2

    try:
        ids, _, outs = cv_net.getLayersShapes([list(map(int, s)) for s in input_shapes])
    except cv2.error as exc:
        detail = " ".join(str(exc).split())
        raise ArtifactFormatError(f"{source}: OpenCV cannot infer the layer shapes (declared "
                                  f"sizes are inconsistent or overflow): {detail}") from None
    total = weight_bytes
    for layer_id, shapes in zip(_flat(ids), outs):
        for shape in shapes:
            dims = [int(d) for d in _flat(shape)]
            if any(d < 0 for d in dims):
                raise ArtifactFormatError(
                    f"{source}: layer '{_layer_name(cv_net, layer_id)}' gets the invalid output "
                    f"shape {dims} (its declared kernel, stride or padding do not fit its "
                    "input)")
            total += 4 * math.prod(dims)
    limits.check_total(total, f"{source}: running the net on input {list(input_shapes)}")


def _flat(values: Any) -> Iterable[Any]:
    try:
        return list(values.reshape(-1))
    except AttributeError:
        return list(values)


def _layer_name(cv_net: Any, layer_id: Any) -> str:
    try:
        return str(cv_net.getLayer(int(layer_id)).name)
    except Exception:  # a name is only decoration for the message
        return f"#{int(layer_id)}"


__all__ = ["MAX_LAYERS", "MAX_OUTPUTS", "MAX_SPATIAL", "check_layer_shapes", "check_net",
           "input_order"]
