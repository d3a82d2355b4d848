"""Run Caffe files in OpenCV's Caffe importer (``cv2.dnn.readNetFromCaffe``, OpenCV 4.x).

OpenCV 5 removed the Caffe importer, so this needs ``opencv-python-headless<5``. Two things the
files may contain that OpenCV cannot execute are adapted *in memory* (the files on disk are
never changed), and every adaptation is reported back:

* ``ArgMax`` (a BVLC layer OpenCV does not implement): the net is run up to ArgMax's input and
  ``np.argmax`` is applied over the same axis, followed by the reshape the files describe;
* ``Upsample`` (the om dialect's nearest-neighbour layer): replaced by the equivalent
  depthwise Deconvolution with unit weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from deployplug.capture import Graph
from deployplug.errors import ArtifactFormatError
from deployplug.exporters.base import FormatRecord
from deployplug.exporters.caffe.net import nearest_deconv_param
from deployplug.exporters.caffe.writer import (
    CAFFEMODEL,
    PROTOTXT,
    fill,
    read_caffemodel,
    read_prototxt,
)
from deployplug.layer_profile import LayerProfile
from deployplug.limits import INT32_MAX, current
from deployplug.runtimes import Runner, caffe_bounds, register_runner

_RESHAPES = ("Reshape", "Flatten")


@dataclass
class _ArgMaxTail:
    """A net output computed outside OpenCV: argmax over ``axis`` of blob ``source``."""

    output: str
    source: str
    axis: int


@dataclass
class PreparedNet:
    """A cv2 net plus what must happen around it to reproduce the files' outputs."""

    net: Any
    layer_tops: dict[str, list[str]]
    argmax: dict[str, _ArgMaxTail] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)
    #: net inputs in OpenCV's order, and the float32 bytes of all weights (for shape checks)
    input_order: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    source: str = "caffe"


def _cv2():
    import cv2

    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise ArtifactFormatError(
            f"OpenCV {cv2.__version__} has no Caffe importer (removed in 5.0); install "
            "opencv-python-headless<5 to verify Caffe files"
        )
    return cv2


def prepare(prototxt: Path, caffemodel: Path, dialect: str = "bvlc",
            upsample_channels: Mapping[str, int] | None = None,
            extra_outputs: Sequence[str] = ()) -> PreparedNet:
    """Load the pair into OpenCV, adapting ArgMax / om Upsample as described above.

    ``extra_outputs`` are blob names that must be retrievable by name afterwards; blobs that are
    not the first top of a same-named layer get an identity Power layer named after them.
    """
    net, weights, weight_bytes = read_checked(prototxt, caffemodel, dialect)
    source = f"{Path(prototxt).name} + {Path(caffemodel).name}"
    return prepare_parsed(net, weights, weight_bytes, source, upsample_channels, extra_outputs)


def read_checked(prototxt: Path, caffemodel: Path, dialect: str = "bvlc") -> tuple[Any, Any, int]:
    """Both files parsed and bounds-checked: ``(net, weights, weight bytes)``."""
    limits = current()
    net = read_prototxt(prototxt, dialect)
    weights = read_caffemodel(caffemodel, dialect)
    weight_bytes = caffe_bounds.check_net(net, Path(prototxt).name, limits)
    weight_bytes += caffe_bounds.check_net(weights, Path(caffemodel).name, limits)
    limits.check_total(weight_bytes, f"{Path(prototxt).name} + {Path(caffemodel).name}")
    return net, weights, weight_bytes


def prepare_parsed(net: Any, weights: Any, weight_bytes: int, source: str,
                   upsample_channels: Mapping[str, int] | None = None,
                   extra_outputs: Sequence[str] = ()) -> PreparedNet:
    """:func:`prepare` on messages already read by :func:`read_checked` (both are changed)."""
    cv2 = _cv2()
    limits = current()
    notes: list[str] = []

    for layer in net.layer:
        if layer.type == "Upsample":
            fh, fw = layer.upsample_param.stride_h, layer.upsample_param.stride_w
            c = (upsample_channels or {}).get(layer.name)
            if c is None:
                raise ArtifactFormatError(f"Upsample layer {layer.name!r}: channel count unknown")
            if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= INT32_MAX:
                raise ArtifactFormatError(f"Upsample layer {layer.name!r}: recorded channel "
                                          f"count {c!r} is not a positive int")
            if min(fh, fw) < 1:
                raise ArtifactFormatError(f"Upsample layer {layer.name!r}: strides must be >= 1")
            weight_bytes += 4 * c * fh * fw
            # the unit weights are built as a Python list first (8 bytes per value)
            limits.check_total(2 * weight_bytes + 8 * c * fh * fw,
                               f"Upsample layer {layer.name!r} run as a Deconvolution")
            if layer.upsample_param.scale != 1:
                raise ArtifactFormatError(f"Upsample layer {layer.name!r} with scale != 1")
            layer.ClearField("upsample_param")
            layer.type = "Deconvolution"
            fill(layer.convolution_param, nearest_deconv_param(c, fh, fw))
            blob = weights.layer.add(name=layer.name, type="Deconvolution").blobs.add()
            blob.shape.dim.extend([c, 1, fh, fw])
            blob.data.extend([1.0] * (c * fh * fw))
            notes.append(f"om Upsample '{layer.name}' run as the equivalent Deconvolution")

    argmax, removed = _strip_argmax(net)
    if argmax:
        notes.append("OpenCV cannot execute ArgMax: the net runs up to ArgMax's input and "
                     "np.argmax is applied over the same axis")
    keep = [lay for lay in net.layer if lay.name not in removed]
    del net.layer[:]
    net.layer.extend(keep)

    layer_tops = {lay.name: list(lay.top) for lay in net.layer}
    for blob in extra_outputs:
        if blob in argmax or blob in removed:
            continue
        if layer_tops.get(blob, [None])[0] != blob:
            ident = net.layer.add(name=_probe(blob), type="Power")
            ident.bottom.append(blob)
            ident.top.append(_probe(blob))
    # OpenCV parses with its own fork of caffe.proto: hand it BVLC-compatible text
    text = text_format.MessageToString(net).encode()
    model = weights.SerializeToString()
    try:
        cv_net = cv2.dnn.readNetFromCaffe(np.frombuffer(text, np.uint8),
                                          np.frombuffer(model, np.uint8))
    except cv2.error as exc:
        raise ArtifactFormatError(f"{source}: OpenCV cannot load the net: "
                                  f"{' '.join(str(exc).split())}") from None
    return PreparedNet(cv_net, layer_tops, argmax, notes, removed,
                       caffe_bounds.input_order(net), weight_bytes, source)


def _probe(blob: str) -> str:
    return f"{blob}#out"


def _strip_argmax(net) -> tuple[dict[str, _ArgMaxTail], set[str]]:
    """Remove every ArgMax layer and the reshapes after it; describe how to redo them."""
    consumers: dict[str, list] = {}
    for layer in net.layer:
        for b in layer.bottom:
            consumers.setdefault(b, []).append(layer)
    tails: dict[str, _ArgMaxTail] = {}
    removed: set[str] = set()
    for layer in net.layer:
        if layer.type != "ArgMax":
            continue
        p = layer.argmax_param
        if p.out_max_val or p.top_k != 1 or not p.HasField("axis"):
            raise ArtifactFormatError(f"ArgMax '{layer.name}': only top_k 1 along an axis is run")
        frontier = [layer]
        while frontier:
            cur = frontier.pop()
            removed.add(cur.name)
            tails[cur.top[0]] = _ArgMaxTail(cur.top[0], layer.bottom[0], p.axis)
            for nxt in consumers.get(cur.top[0], []):
                if nxt.type not in _RESHAPES:
                    raise ArtifactFormatError(
                        f"'{nxt.name}' ({nxt.type}) consumes ArgMax output; OpenCV cannot run "
                        "ArgMax, so only reshapes may follow it for verification"
                    )
                frontier.append(nxt)
    return tails, removed


def forward(prepared: PreparedNet, input_names: Sequence[str], inputs: Sequence[np.ndarray],
            blobs: Sequence[str], shapes: Mapping[str, Sequence[int]] | None = None
            ) -> list[np.ndarray]:
    """Values of ``blobs`` for ``inputs`` (ArgMax tails computed with numpy).

    The layer shapes OpenCV will allocate for these inputs are checked against the tensor
    budget first (:func:`caffe_bounds.check_layer_shapes`).
    """
    net = prepared.net
    fed = {name: np.shape(value) for name, value in zip(input_names, inputs)}
    missing = [name for name in prepared.input_order if name not in fed]
    if missing:
        raise ArtifactFormatError(f"{prepared.source}: net input(s) {missing} are not fed")
    caffe_bounds.check_layer_shapes(net, [fed[n] for n in prepared.input_order], current(),
                                    prepared.weight_bytes, prepared.source)
    for name, value in zip(input_names, inputs):
        net.setInput(np.ascontiguousarray(value, dtype=np.float32), name)
    wanted: list[str] = []
    for blob in blobs:
        src = prepared.argmax[blob].source if blob in prepared.argmax else blob
        if src in input_names:
            continue
        layer = src if prepared.layer_tops.get(src, [None])[0] == src else _probe(src)
        if layer not in wanted:
            wanted.append(layer)
    values = dict(zip(wanted, net.forward(wanted))) if wanted else {}
    feeds = dict(zip(input_names, inputs))

    def value_of(blob: str) -> np.ndarray:
        if blob in feeds:
            return np.asarray(feeds[blob], dtype=np.float32)
        return values[blob if blob in values else _probe(blob)]

    out = []
    for blob in blobs:
        if blob in prepared.argmax:
            tail = prepared.argmax[blob]
            arr = np.argmax(value_of(tail.source), axis=tail.axis).astype(np.int64)
            if shapes and blob in shapes:
                arr = arr.reshape(tuple(shapes[blob]))
            out.append(arr)
        else:
            arr = np.array(value_of(blob))
            if shapes and blob in shapes and arr.size == int(np.prod(shapes[blob])):
                arr = arr.reshape(tuple(shapes[blob]))
            out.append(arr)
    return out


def run_samples(prototxt: Path, caffemodel: Path, info: Mapping[str, Any],
                samples: Sequence[Sequence[np.ndarray]]
                ) -> tuple[list[list[np.ndarray]], list[str]]:
    """Outputs of the files for every sample, in the order recorded in ``info['outputs']``.

    The net is loaded into OpenCV once for all samples.
    """
    outputs = [o["blob"] for o in info["outputs"]]
    prepared = prepare(prototxt, caffemodel, info.get("dialect", "bvlc"),
                       info.get("upsample_channels"), outputs)
    shapes = {o["blob"]: o["shape"] for o in info["outputs"]}
    names = [i["name"] for i in info["inputs"]]
    return [forward(prepared, names, inputs, outputs, shapes) for inputs in samples], \
        prepared.notes


class CaffeRunner(Runner):
    """``model.prototxt`` + ``model.caffemodel`` in OpenCV, loaded once for all samples."""

    format = "caffe"

    def run_samples(self, out_dir: Path, record: FormatRecord,
                    samples: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        out_dir = Path(out_dir)
        outputs, notes = run_samples(out_dir / PROTOTXT, out_dir / CAFFEMODEL, record.info,
                                     samples)
        record.info["runtime_notes"] = notes
        return outputs

    def layer_profile(self, out_dir: Path, record: FormatRecord, graph: Graph,
                      inputs: Sequence[np.ndarray], tolerance: float, source: str = "verify",
                      reference: dict[str, Any] | None = None) -> LayerProfile | None:
        """Per-layer errors of every blob the record maps a node to (see :mod:`.caffe_layers`)."""
        from deployplug.runtimes import caffe_layers

        return caffe_layers.layer_profile(Path(out_dir) / PROTOTXT, Path(out_dir) / CAFFEMODEL,
                                          record.info, graph, inputs, tolerance, source,
                                          reference)


register_runner(CaffeRunner())
