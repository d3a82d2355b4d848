"""Constraints of Huawei Ascend's Caffe converter (ATC, target ``om``), checked on a prototxt.

The om target (:data:`deployplug.profiles.caffe.OM`) refuses the ops that would break these
before lowering, and its limits are the numbers used here; this check reads the written file
itself, so a hand-edited or foreign prototxt gets the same scrutiny:

* only BVLC layer types, plus the om dialect's ``Upsample`` (no OpenCV/SSD fork layers);
* ``Upsample`` only by integer factors >= 1 (and ``scale`` 1: a plain repeat);
* pooling windows at most 32 x 32 -- a global pooling counts with the size of its input map,
  so the blob shapes must be supplied for it;
* symmetric H/W padding: Caffe's ``pad``/``pad_h``/``pad_w`` are symmetric by construction,
  so only a graph-level pad op can be asymmetric, and the om profile refuses those;
* no ``Reduction`` over non-channel axes, and no padding along channels (a ``Concat`` on
  axis 1 with a constant ``DummyData`` input).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deployplug.errors import ArtifactFormatError
from deployplug.profiles.caffe import OM_LIMITS

assert OM_LIMITS.max_pool_window is not None
MAX_POOL_WINDOW: int = OM_LIMITS.max_pool_window

BVLC_TYPES = frozenset({
    "AbsVal", "Accuracy", "ArgMax", "BNLL", "BatchNorm", "Bias", "Clip", "Concat",
    "Convolution", "Crop", "Deconvolution", "Dropout", "DummyData", "ELU", "Eltwise", "Embed",
    "Exp", "Filter", "Flatten", "Input", "InnerProduct", "LRN", "Log", "MVN", "Parameter",
    "Pooling", "Power", "PReLU", "ReLU", "Reduction", "Reshape", "Scale", "Sigmoid", "Silence",
    "Slice", "Softmax", "Split", "Swish", "TanH", "Threshold", "Tile",
})
OM_TYPES = BVLC_TYPES | {"Upsample"}


@dataclass(frozen=True)
class Violation:
    layer: str
    type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.layer} ({self.type}): {self.reason}"


def _window(p) -> tuple[int, int]:
    kh = p.kernel_h if p.HasField("kernel_h") else p.kernel_size
    kw = p.kernel_w if p.HasField("kernel_w") else p.kernel_size
    return kh, kw


def violations(net, shapes: Mapping[str, Sequence[int]] | None = None) -> list[Violation]:
    """Every om constraint ``net`` (an om-dialect ``NetParameter``) breaks."""
    shapes = shapes or {}
    out: list[Violation] = []
    producer = {top: layer for layer in net.layer for top in layer.top}
    for layer in net.layer:
        bad = _layer_violation(layer, shapes, producer)
        if bad:
            out.append(Violation(layer.name, layer.type, bad))
    return out


def _layer_violation(layer, shapes, producer) -> str | None:
    t = layer.type
    if t not in OM_TYPES:
        return f"layer type '{t}' is not a BVLC/om layer"
    if t == "Upsample":
        p = layer.upsample_param
        if p.stride_h < 1 or p.stride_w < 1:
            return f"upsampling factors ({p.stride_h}, {p.stride_w}) must be integers >= 1"
        if p.scale != 1:
            return f"Upsample scale {p.scale} is not a plain nearest-neighbour repeat"
    if t == "Pooling":
        p = layer.pooling_param
        if p.global_pooling:
            shape = shapes.get(layer.bottom[0])
            if shape is None:
                return "global pooling over a map of unknown size (om allows windows <= 32)"
            window = (int(shape[2]), int(shape[3]))
        else:
            window = _window(p)
        if max(window) > MAX_POOL_WINDOW:
            return f"pooling window {window[0]}x{window[1]} exceeds {MAX_POOL_WINDOW}"
    if t == "Reduction":
        shape = shapes.get(layer.bottom[0])
        if layer.reduction_param.axis != 1 or shape is None or len(shape) != 2:
            return "Reduction over non-channel axes"
    if t == "Concat" and layer.concat_param.axis == 1 and any(
        producer.get(b) is not None and producer[b].type == "DummyData" for b in layer.bottom
    ):
        return "padding along channels (Concat with constant data on axis 1)"
    return None


def enforce(net, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Raise :class:`ArtifactFormatError` listing every violation, if any."""
    found = violations(net, shapes)
    if found:
        lines = "\n".join(f"  - {v}" for v in found)
        raise ArtifactFormatError(f"the prototxt breaks {len(found)} om constraint(s):\n{lines}")
