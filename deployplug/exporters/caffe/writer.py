"""Serialize a lowered :class:`~deployplug.exporters.caffe.lower.CaffeNet` to the two Caffe files.

* ``model.prototxt``: the whole net in protobuf text format, without any blob data.
* ``model.caffemodel``: binary ``NetParameter`` whose layers carry only name, type and blobs.
  BVLC Caffe and OpenCV both take weights from it by layer name and read every parameter from
  the prototxt, so keeping parameters out of the binary also keeps fork-specific field numbers
  (``upsample_param`` of the om dialect) out of the one file that is matched by number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from deployplug.errors import ArtifactFormatError
from deployplug.exporters.caffe.net import CaffeNet
from deployplug.exporters.caffe.schema import messages
from deployplug.limits import read_bounded

PROTOTXT = "model.prototxt"
CAFFEMODEL = "model.caffemodel"
#: the writer's prototxt carries no weights: a few hundred bytes per layer
MAX_PROTOTXT_BYTES = 4 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _blob_bytes(arr: np.ndarray) -> bytes:
    """``BlobProto{shape: {dim...}, data: [...]}`` encoded directly: fast for big weights.

    Field 7 (shape) holds field 1 (dim, packed int64); field 5 (data) is packed float32 LE.
    """
    dims = b"".join(_varint(int(d)) for d in arr.shape)
    shape = b"\x0a" + _varint(len(dims)) + dims if arr.shape else b""
    data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    return b"\x3a" + _varint(len(shape)) + shape + b"\x2a" + _varint(len(data)) + data


def _listify(values: dict, descriptor) -> dict:
    """Wrap scalars given for repeated fields (``kernel_size: 3``) the way text format allows."""
    out = {}
    for key, val in values.items():
        fld = descriptor.fields_by_name[key]
        if fld.message_type is not None:
            items = val if isinstance(val, list) else [val]
            val = [_listify(v, fld.message_type) for v in items]
            if not _is_repeated(fld):
                val = val[0]
        elif _is_repeated(fld) and not isinstance(val, list):
            val = [val]
        out[key] = val
    return out


def _is_repeated(fld) -> bool:
    return bool(fld.is_repeated)


def fill(message, values: dict) -> None:
    """Set a parameter message from a plain dict (enum names, scalars for repeated fields)."""
    json_format.ParseDict(_listify(values, message.DESCRIPTOR), message)
    message.SetInParent()  # present even when every value is a default


def net_parameter(net: CaffeNet, *, params: bool = True, blobs: bool = False):
    """The net as a ``caffe.NetParameter`` of its dialect."""
    m = messages(net.dialect)
    proto = m.NetParameter(name=net.name)
    for layer in net.layers:
        if blobs and not params and not layer.blobs:
            continue  # weights are matched by layer name; parameter-free layers add nothing
        lp = proto.layer.add(name=layer.name, type=layer.type)
        if params:
            lp.bottom.extend(layer.bottoms)
            lp.top.extend(layer.tops)
            for field_name, values in layer.params.items():
                fill(getattr(lp, field_name), values)
        if blobs:
            for arr in layer.blobs:
                lp.blobs.add().MergeFromString(_blob_bytes(arr))
    return proto


def prototxt_text(net: CaffeNet) -> str:
    return text_format.MessageToString(net_parameter(net, params=True, blobs=False))


def caffemodel_bytes(net: CaffeNet) -> bytes:
    return net_parameter(net, params=False, blobs=True).SerializeToString()


def read_prototxt(path: Path, dialect: str = "bvlc"):
    """Parse a ``.prototxt`` with the schema of ``dialect``, as untrusted input.

    The file must be a regular file of at most :data:`MAX_PROTOTXT_BYTES` (text format parses
    at a few MB/s, so the cap bounds the time too) in UTF-8; anything unparsable is an
    :class:`ArtifactFormatError` naming the file. Declared sizes are checked by
    :mod:`deployplug.runtimes.caffe_bounds` before a runtime sees them.
    """
    path = Path(path)
    data = read_bounded(path, path.name, MAX_PROTOTXT_BYTES)
    proto = messages(dialect).NetParameter()
    try:
        text_format.Parse(data.decode("utf-8"), proto)
    except UnicodeDecodeError as exc:
        raise ArtifactFormatError(f"{path.name}: not UTF-8 text (byte {exc.start})") from None
    except (text_format.ParseError, ValueError, RecursionError) as exc:
        raise ArtifactFormatError(f"{path.name}: not a valid {dialect} prototxt: "
                                  f"{' '.join(str(exc).split())}") from None
    return proto


def read_caffemodel(path: Path, dialect: str = "bvlc"):
    """Parse a binary ``.caffemodel`` (size-capped, see :mod:`deployplug.limits`).

    Fields the schema does not know are dropped, so nothing unchecked is handed on.
    """
    path = Path(path)
    data = read_bounded(path, path.name)
    proto = messages(dialect).NetParameter()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise ArtifactFormatError(f"{path.name}: not a valid caffemodel (truncated or "
                                  f"damaged): {exc}") from None
    proto.DiscardUnknownFields()
    return proto


def blob_array(blob) -> np.ndarray:
    """A ``BlobProto`` as a float32 array of its shape (legacy 4-D fields included)."""
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        shape = tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
    return np.asarray(blob.data, dtype=np.float32).reshape(shape)
