"""MsnhNet rules for windowed resampling: max/average/adaptive pooling and resizing.

They share one concern -- MsnhNet's output-size formulas and padding behaviour differ from
PyTorch's -- so they live together: max pooling is written unpadded behind an explicit
``-3.4e38`` padding layer, average pooling gets an explicit zero padding layer when PyTorch
counts the padding and a crop when the two axes round differently, and upsample keys are
written ``type`` first, the order MsnhNet's parser needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deployplug.capture import Graph, Node
from deployplug.exporters.msnhnet.emit import (
    Emitter,
)
from deployplug.exporters.msnhnet.rules import (
    PAD_MIN,
    input_shape,
    pair,
    rule,
    source,
)


# -- pooling --------------------------------------------------------------------------
def _pool_params(node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    k = pair(node.args.get("kernel_size"))
    s = pair(node.args.get("stride"), None) if node.args.get("stride") else k
    p = pair(node.args.get("padding"), 0)
    return k, s, p


def _check_maxpool(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "max pooling needs 4-D input"
    k, s, p = _pool_params(node)
    if pair(node.args.get("dilation"), 1) != (1, 1):
        return "dilated max pooling is not expressible in MsnhNet"
    if s[0] == s[1] == 1 and k[0] != k[1]:
        return ("non-square max pooling kernel with stride 1 takes MsnhNet's unverified AVX "
                "path")
    return None


def _maxpool_layer(em: Emitter, k: tuple[int, int], s: tuple[int, int]) -> None:
    em.emit("maxpool", [("kSizeX", k[1]), ("kSizeY", k[0]), ("strideX", s[1]),
                        ("strideY", s[0]), ("paddingX", 0), ("paddingY", 0), ("ceilMode", 0)])


@rule("max_pool2d", check=_check_maxpool)
def _lower_maxpool(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    k, s, p = _pool_params(node)
    src = source(node)
    c, h, w = em.shapes[src]
    _, _, oh, ow = node.shape  # type: ignore[misc]
    extra_h = max(0, (oh - 1) * s[0] + k[0] - (h + 2 * p[0]))
    extra_w = max(0, (ow - 1) * s[1] + k[1] - (w + 2 * p[1]))
    em.use(src)
    if p != (0, 0) or extra_h or extra_w:
        em.emit("padding", [("top", p[0]), ("down", p[0] + extra_h), ("left", p[1]),
                            ("right", p[1] + extra_w), ("paddingVal", PAD_MIN)])
    if s[0] == s[1] and k[0] != k[1]:  # separable: two pools with unequal strides
        _maxpool_layer(em, (k[0], 1), (s[0], 1))
        _maxpool_layer(em, (1, k[1]), (1, s[1]))
    else:
        _maxpool_layer(em, k, s)
    return None


def _floor_ceil(size: int, k: int, s: int, p: int, ceil_mode: int) -> int:
    from deployplug.runtimes.msnhnet.ops import pool_out

    return pool_out(size, k, s, p, ceil_mode)


@dataclass(frozen=True)
class _AvgPlan:
    explicit: bool  # zero padding layer first (PyTorch's count_include_pad=True)
    ceil_mode: int
    crop: tuple[int | None, int | None]  # input rows/cols to keep before pooling


def _avg_plan(node: Node, graph: Graph) -> _AvgPlan | str:
    """How to write an avg_pool2d as a localavgpool, or the reason it cannot be written.

    MsnhNet has one ceilMode for both axes and no "last window must start inside the input"
    rule. When the axes disagree, an unpadded axis that needs floor rounding is cropped to
    exactly the rows its windows read, which makes floor and ceil agree on it.
    """
    k, s, p = _pool_params(node)
    _, _, h, w = input_shape(node, graph)
    _, _, oh, ow = node.shape  # type: ignore[misc]
    if node.args.get("divisor_override") is not None:
        return "avg_pool2d with divisor_override is not expressible"
    explicit = bool(node.args.get("count_include_pad", True)) and p != (0, 0)
    sizes = (h + 2 * p[0], w + 2 * p[1]) if explicit else (h, w)
    pp = (0, 0) if explicit else p
    outs = (oh, ow)
    modes = [{m for m in (0, 1) if _floor_ceil(sizes[a], k[a], s[a], pp[a], m) == outs[a]}
             for a in (0, 1)]
    common = modes[0] & modes[1]
    if common:
        return _AvgPlan(explicit, min(common), (None, None))
    crop: list[int | None] = [None, None]
    for a in (0, 1):
        if 1 not in modes[a]:
            if 0 not in modes[a] or pp[a]:
                return "this avg_pool2d ceil_mode output size has no MsnhNet equivalent"
            crop[a] = (outs[a] - 1) * s[a] + k[a]
    return _AvgPlan(explicit, 1, (crop[0], crop[1]))


def _check_avgpool(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "average pooling needs 4-D input"
    plan = _avg_plan(node, graph)
    return plan if isinstance(plan, str) else None


@rule("avg_pool2d", check=_check_avgpool)
def _lower_avgpool(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    k, s, p = _pool_params(node)
    plan = _avg_plan(node, graph)
    assert isinstance(plan, _AvgPlan)
    src = source(node)
    if plan.explicit:
        em.use(src)
        em.emit("padding", [("top", p[0]), ("down", p[0]), ("left", p[1]), ("right", p[1])])
        c, h, w = em.shapes[src]
        src = em.temp((c, h + 2 * p[0], w + 2 * p[1]))
        p = (0, 0)
    for axis, keep in ((1, plan.crop[0]), (2, plan.crop[1])):
        if keep is not None and keep < em.shapes[src][axis]:
            shape = em.slice_axis(src, axis, 0, keep, 1)
            src = em.temp(shape)
    em.use(src)
    # Only X/Y keys: localavgpool replaces X/Y values < 1 by the scalar form.
    em.emit("localavgpool", [("kSizeX", k[1]), ("kSizeY", k[0]), ("strideX", s[1]),
                             ("strideY", s[0]), ("paddingX", p[1]), ("paddingY", p[0]),
                             ("ceilMode", plan.ceil_mode)])
    return None


def _in_out_hw(node: Node, graph: Graph) -> tuple[int, int, int, int]:
    """Input and output height/width of a pooling or resizing node."""
    _, _, h, w = input_shape(node, graph)
    _, _, oh, ow = node.shape  # type: ignore[misc]
    return h, w, oh, ow


def _check_adaptive(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "adaptive pooling needs 4-D input"
    h, w, oh, ow = _in_out_hw(node, graph)
    if (oh, ow) != (1, 1) and (h % oh or w % ow):
        return (f"adaptive pooling {h}x{w} -> {oh}x{ow} has uneven windows; MsnhNet pools "
                "with fixed windows (use an output size dividing the input)")
    return None


@rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d", check=_check_adaptive)
def _lower_adaptive_avg(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _in_out_hw(node, graph)
    em.use(source(node))
    if (oh, ow) == (1, 1):
        em.emit("globalavgpool")
    elif (oh, ow) != (h, w):
        kh, kw = h // oh, w // ow
        em.emit("localavgpool", [("kSizeX", kw), ("kSizeY", kh), ("strideX", kw),
                                 ("strideY", kh), ("paddingX", 0), ("paddingY", 0)])
    else:
        em.emit("act", [("activation", "none")])
    return None


@rule("adaptive_max_pool2d", check=_check_adaptive)
def _lower_adaptive_max(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _in_out_hw(node, graph)
    kh, kw = h // oh, w // ow
    em.use(source(node))
    if (kh, kw) == (1, 1):
        em.emit("act", [("activation", "none")])
    else:  # k == s: square (AVX path, unpadded: exact) or unequal strides (exact)
        _maxpool_layer(em, (kh, kw), (kh, kw))
    return None


# -- resizing -------------------------------------------------------------------------
def _check_nearest(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "upsampling needs 4-D input"
    h, w, oh, ow = _in_out_hw(node, graph)
    scales = node.args.get("scale_factors") or node.args.get("scales_h")
    if oh % h or ow % w or oh < h or ow < w:
        return (f"nearest resize {h}x{w} -> {oh}x{ow} is not an integer upscale; MsnhNet "
                "nearest upsampling repeats pixels by integer strides")
    if isinstance(scales, (list, tuple)) and len(scales) == 2 and (
            scales[0] != oh // h or scales[1] != ow // w):
        return f"nearest resize with non-integer scale factors {scales}"
    return None


@rule("upsample_nearest2d", "_upsample_nearest_exact2d", check=_check_nearest)
def _lower_nearest(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _in_out_hw(node, graph)
    em.use(source(node))
    # Key order matters: MsnhNet re-applies its scalar fallbacks after every key.
    em.emit("upsample", [("type", "nearest"), ("strideX", ow // w), ("strideY", oh // h),
                         ("scaleX", 1.0), ("scaleY", 1.0), ("alignCorners", 0)])
    return None


def _msnh_scale(size: int, out: int) -> float:
    """A float32 scale with int(size * scale) == out in float32 arithmetic."""
    scale = np.float32(out / size)

    def sizes(sc: np.float32) -> tuple[int, int]:  # float32 and double arithmetic
        return int(np.float32(size) * sc), int(size * float(sc))

    while min(sizes(scale)) < out:
        scale = np.nextafter(scale, np.float32(np.inf))
    if max(sizes(scale)) != out:
        raise ValueError(f"no float32 scale maps {size} to {out}")
    return float(scale)


def _check_bilinear(node: Node, graph: Graph) -> str | None:
    if len(input_shape(node, graph)) != 4:
        return "upsampling needs 4-D input"
    h, w, oh, ow = _in_out_hw(node, graph)
    scales = node.args.get("scale_factors")
    if not node.args.get("align_corners") and isinstance(scales, (list, tuple)) and scales:
        for size, out, sc in ((h, oh, scales[0]), (w, ow, scales[-1])):
            if sc is not None and abs(sc * size - out) > 1e-6 * out:
                return (f"bilinear resize with scale_factor {sc} on size {size}: PyTorch "
                        "samples at 1/scale, MsnhNet at in/out; pass size= instead")
    return None


@rule("upsample_bilinear2d", check=_check_bilinear)
def _lower_bilinear(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = _in_out_hw(node, graph)
    em.use(source(node))
    em.emit("upsample", [("type", "bilinear"), ("strideX", 1), ("strideY", 1),
                         ("scaleX", _msnh_scale(w, ow)), ("scaleY", _msnh_scale(h, oh)),
                         ("alignCorners", int(bool(node.args.get("align_corners"))))])
    return None


