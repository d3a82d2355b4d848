"""Captured graph -> Caffe layers (BVLC types that OpenCV 4.x also loads): the driver.

Which nodes Caffe expresses, and why not, is the target's question
(:mod:`deployplug.profiles.caffe`); each op the target accepts has one *emitter* here that
appends the layers computing it exactly, and the two key sets are held equal when this module
is imported.

This module only asks the target, dispatches each node to its emitter and applies the
whole-network fix-ups; the emitters live by concept in the ``layers_*`` modules (imported here
so they register), on top of :mod:`.net` (data model, registry, context) and :mod:`.blocks`.
Ops BVLC Caffe has no layer for are composed there from exact primitives (all verified in
OpenCV against PyTorch): clamp/hardsigmoid/hardswish/silu in :mod:`.layers_act`, floor-mode
pooling in :mod:`.layers_pool`, padding in :mod:`.layers_shape`, nearest/bilinear upsampling
in :mod:`.layers_resample`.

Every value of the graph keeps the node name as its blob name and as the name of the layer
that produces it, so a layer in the files points back at the PyTorch module path.
"""

from __future__ import annotations

from deployplug.capture import Graph, Node
from deployplug.errors import ExportFailedError, UnsupportedOpError
from deployplug.exporters.caffe import (  # noqa: F401 -- imported so their emitters register
    layers_act,
    layers_arith,
    layers_conv,
    layers_pool,
    layers_resample,
    layers_shape,
)
from deployplug.exporters.caffe.layers_resample import bilinear_taps
from deployplug.exporters.caffe.layers_shape import foldable_pads
from deployplug.exporters.caffe.net import (
    RULES,
    CaffeNet,
    Layer,
    LowerCtx,
    nearest_deconv_param,
    rule,
)
from deployplug.ops.sizes import caffe_pool_out
from deployplug.profiles import TargetProfile, get_target, offenders
from deployplug.profiles.base import registry_agrees
from deployplug.profiles.caffe import CAFFE, OM
from deployplug.profiles.caffe_checks import CHECKS

__all__ = ["RULES", "CaffeNet", "Layer", "bilinear_taps", "caffe_pool_out", "lower",
           "nearest_deconv_param", "refusal", "rule", "supported_ops"]

_TARGET_OF_DIALECT = {"bvlc": CAFFE, "om": OM}


def check_registry() -> None:
    """Every op the target accepts has a lowering here, and every lowering a check."""
    registry_agrees("Caffe emitters", CHECKS, RULES)


check_registry()


def refusal(node: Node, graph: Graph, dialect: str = "bvlc") -> str | None:
    """``None`` when ``node`` lowers exactly to Caffe layers of ``dialect``, otherwise why not."""
    return _TARGET_OF_DIALECT[dialect].refusal(node, graph)


def lower(graph: Graph, dialect: str = "bvlc", target: str | TargetProfile = "caffe",
          name: str = "net") -> CaffeNet:
    """Lower every node, or raise :class:`UnsupportedOpError` listing *all* offenders first."""
    profile = get_target(target)
    found = offenders(graph, profile)
    if found:
        raise UnsupportedOpError(found)
    ctx = LowerCtx(graph, dialect, foldable_pads(graph))
    for inp in graph.inputs:
        ctx.add(inp.name, "Input", [], [inp.name],
                {"input_param": {"shape": [{"dim": list(inp.shape)}]}})
        ctx.value_blobs[inp.name] = inp.name
    for node in graph.nodes:
        emit = RULES.get(node.op)
        if emit is None:  # a target beyond the Caffe checks accepted an op nobody emits
            raise ExportFailedError("caffe", f"target {profile.name!r} accepted {node.op} at "
                                    f"'{node.where}', which the Caffe writer cannot emit")
        emit(ctx, node)
    outputs = [ctx.blob(o) for o in graph.outputs]
    _guard_power_fusion(ctx, set(outputs))
    return CaffeNet(name, dialect, [(v.name, tuple(v.shape)) for v in graph.inputs], ctx.layers,
                    outputs, dict(ctx.value_blobs), ctx.extras)


def _affine_scalar(layer: Layer) -> bool:
    """Layers OpenCV reports a single scale/shift for (what it folds into a preceding Power)."""
    if layer.type == "Power":
        return float(layer.params.get("power_param", {}).get("power", 1.0)) == 1.0
    if layer.type in ("Scale", "BatchNorm") and len(layer.bottoms) == 1:
        return all(b.size <= 1 for b in layer.blobs[:1])
    return False


def _guard_power_fusion(ctx: LowerCtx, outputs: set[str]) -> None:
    """Keep OpenCV from fusing ``Power(power != 1, shift 0)`` with a following scalar affine.

    OpenCV 4.x folds the next layer's scale into the Power's *inner* scale, computing
    ``(a*k*x)^p`` for ``a*(k*x)^p`` (e.g. ``2 / x`` came out as ``0.5 / x``). An identity
    Reshape between the two is exact everywhere and stops that fusion.
    """
    consumers: dict[str, list[Layer]] = {}
    for layer in ctx.layers:
        for b in layer.bottoms:
            consumers.setdefault(b, []).append(layer)
    patched: list[Layer] = []
    for layer in ctx.layers:
        patched.append(layer)
        p = layer.params.get("power_param", {})
        if layer.type != "Power" or float(p.get("power", 1.0)) == 1.0 or p.get("shift", 0.0):
            continue
        users = consumers.get(layer.tops[0], [])
        if layer.tops[0] in outputs or len(users) != 1 or not _affine_scalar(users[0]):
            continue
        rank = len(ctx.graph.node(layer.node).shape or ()) or 4  # elementwise: node's rank
        guard = ctx.fresh(layer.tops[0])
        patched.append(Layer(guard, "Reshape", [layer.tops[0]], [guard],
                             {"reshape_param": {"shape": {"dim": [0] * rank}}}, [], layer.node))
        users[0].bottoms = [guard if b == layer.tops[0] else b for b in users[0].bottoms]
    ctx.layers[:] = patched


def supported_ops() -> frozenset[str]:
    return frozenset(RULES)
