"""MsnhNet rules for windowed resampling: max/average/adaptive pooling and resizing.

They share one concern -- MsnhNet's output-size formulas and padding behaviour differ from
PyTorch's (:func:`deployplug.ops.sizes.msnhnet_pool_out`; an average pooling's plan is
:func:`deployplug.profiles.msnhnet_checks.avg_plan`) -- so they live together: max pooling is
written unpadded behind an explicit ``-3.4e38`` padding layer, average pooling gets an
explicit zero padding layer when PyTorch counts the padding and a crop when the two axes
round differently, and upsample keys are written ``type`` first, the order MsnhNet's parser
needs.
"""

from __future__ import annotations

import numpy as np

from deployplug.capture import Graph, Node
from deployplug.exporters.msnhnet.emit import Emitter
from deployplug.exporters.msnhnet.rules import PAD_MIN, rule, source
from deployplug.profiles.msnhnet_checks import AvgPlan, avg_plan, in_out_hw, pool_params


# -- pooling --------------------------------------------------------------------------
def _maxpool_layer(em: Emitter, k: tuple[int, int], s: tuple[int, int]) -> None:
    em.emit("maxpool", [("kSizeX", k[1]), ("kSizeY", k[0]), ("strideX", s[1]),
                        ("strideY", s[0]), ("paddingX", 0), ("paddingY", 0), ("ceilMode", 0)])


@rule("max_pool2d")
def _lower_maxpool(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    k, s, p = pool_params(node)
    src = source(node)
    c, h, w = em.shapes[src]
    _, _, oh, ow = node.out_shape
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


@rule("avg_pool2d")
def _lower_avgpool(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    k, s, p = pool_params(node)
    plan = avg_plan(node, graph)
    assert isinstance(plan, AvgPlan), plan  # the target refused it before lowering
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


@rule("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _lower_adaptive_avg(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = in_out_hw(node, graph)
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


@rule("adaptive_max_pool2d")
def _lower_adaptive_max(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = in_out_hw(node, graph)
    kh, kw = h // oh, w // ow
    em.use(source(node))
    if (kh, kw) == (1, 1):
        em.emit("act", [("activation", "none")])
    else:  # k == s: square (AVX path, unpadded: exact) or unequal strides (exact)
        _maxpool_layer(em, (kh, kw), (kh, kw))
    return None


# -- resizing -------------------------------------------------------------------------
@rule("upsample_nearest2d", "_upsample_nearest_exact2d")
def _lower_nearest(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = in_out_hw(node, graph)
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


@rule("upsample_bilinear2d")
def _lower_bilinear(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    h, w, oh, ow = in_out_hw(node, graph)
    em.use(source(node))
    em.emit("upsample", [("type", "bilinear"), ("strideX", 1), ("strideY", 1),
                         ("scaleX", _msnh_scale(w, ow)), ("scaleY", _msnh_scale(h, oh)),
                         ("alignCorners", int(bool(node.args.get("align_corners"))))])
    return None


