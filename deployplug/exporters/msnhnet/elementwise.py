"""MsnhNet rules for element-wise maths: activations, arithmetic, powers.

MsnhNet's ``varop`` has no broadcasting and some of its maths is wrong (``varop tanh`` is
tan, ``pow`` breaks on negatives, ``elu`` ignores alpha, ``selu`` uses rounded constants):
these rules route around each of those with exact compositions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deployplug.capture import Graph, Node
from deployplug.errors import OpAttributeError
from deployplug.exporters.msnhnet.emit import Emitter
from deployplug.exporters.msnhnet.rules import RULES, Lower, rule, source, value_shape
from deployplug.profiles.msnhnet_checks import (
    ACTIVATIONS,
    UNARY_VAROPS,
    channel_const,
    is_activation,
    scalar_of,
)

_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805


# -- activations ----------------------------------------------------------------------
def _simple_act(name: str) -> Lower:
    def lower(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
        em.act(source(node), name)
        return None

    return lower


for _op, _name in ACTIVATIONS.items():
    RULES[_op] = _simple_act(_name)


@rule("leaky_relu")
def _lower_leaky(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    from deployplug.exporters.msnhnet.text import format_value

    em.act(source(node), f"leaky,{format_value(float(node.args.get('negative_slope', 0.01)))}")
    return None


@rule("prelu")
def _lower_prelu(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    c = em.shapes[source(node)][0]
    slopes = node.args["weight"].detach().float().numpy().reshape(-1)
    em.act(source(node), "prelu", np.broadcast_to(slopes, (c,)).copy())
    return None


def _clip(em: Emitter, src: str, low: float | None, high: float | None) -> None:
    if low == 0 and high == 6:
        em.act(src, "relu6")
    elif low == -1 and high == 1:
        em.act(src, "hardtan")
    elif low == 0 and high is None:
        em.act(src, "relu")
    else:
        em.use(src)
        fields = ([("min", float(low))] if low is not None else []) + (
            [("max", float(high))] if high is not None else [])
        em.emit("clip", fields or [("min", -3.4e38)])


@rule("clamp", "clip")
def _lower_clamp(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    _clip(em, source(node), node.args.get("min"), node.args.get("max"))
    return None


@rule("hardtanh")
def _lower_hardtanh(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    _clip(em, source(node), node.args.get("min_val", -1.0), node.args.get("max_val", 1.0))
    return None


@rule("clamp_min")
def _lower_clamp_min(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    _clip(em, source(node), node.args.get("min"), None)
    return None


@rule("clamp_max")
def _lower_clamp_max(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    _clip(em, source(node), None, node.args.get("max"))
    return None


@rule("hardsigmoid")
def _lower_hardsigmoid(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    em.unary(source(node), "addConst", 3.0)
    em.emit("act", [("activation", "relu6")])
    em.emit("varop", [("type", "divConst"), ("constVal", 6.0)])
    return None


def _elu_like(em: Emitter, src: str, alpha: float) -> None:
    """relu(x) + alpha * (elu1(x) - relu(x)): exact, since elu1 - relu is 0 for x > 0."""
    shape = em.shapes[src]
    if alpha == 1.0:
        em.act(src, "elu")
        return
    em.act(src, "relu")
    pos = em.temp(shape)
    em.act(src, "elu")
    em.emit("varop", [("layers", em.index(pos)), ("type", "sub")])
    em.emit("varop", [("type", "mulConst"), ("constVal", float(alpha))])
    em.emit("varop", [("layers", em.index(pos)), ("type", "add")])


@rule("elu")
def _lower_elu(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    src = source(node)
    alpha = float(node.args.get("alpha", 1.0))
    scale = float(node.args.get("scale", 1.0))
    input_scale = float(node.args.get("input_scale", 1.0))
    if input_scale != 1.0:
        em.unary(src, "mulConst", input_scale)
        src = em.temp(em.shapes[src])
    _elu_like(em, src, alpha)
    if scale != 1.0:
        em.emit("varop", [("type", "mulConst"), ("constVal", scale)])
    return None


@rule("selu")
def _lower_selu(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    # MsnhNet's own selu uses rounded constants (off by ~7e-5), so compose it exactly.
    _elu_like(em, source(node), _SELU_ALPHA)
    em.emit("varop", [("type", "mulConst"), ("constVal", _SELU_SCALE)])
    return None


@rule("softplus")
def _lower_softplus(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    from deployplug.exporters.msnhnet.text import format_value

    beta = float(node.args.get("beta", 1))
    threshold = float(node.args.get("threshold", 20))
    src = source(node)
    if beta != 1.0:
        em.unary(src, "mulConst", beta)
        src = em.temp(em.shapes[src])
    em.act(src, f"softplus,{format_value(threshold)}")
    if beta != 1.0:
        em.emit("varop", [("type", "divConst"), ("constVal", beta)])
    return None


# -- element-wise math ----------------------------------------------------------------
def _unary_rule(kind: str) -> Lower:
    def lower(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
        em.unary(source(node), kind)
        return None

    return lower


for _op in UNARY_VAROPS:
    RULES[_op] = _unary_rule(_op)


@rule("neg")
def _lower_neg(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    em.unary(source(node), "mulConst", -1.0)
    return None


@rule("reciprocal")
def _lower_reciprocal(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    em.unary(source(node), "divConstInv", 1.0)
    return None


@rule("rsqrt")
def _lower_rsqrt(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    em.unary(source(node), "sqrt")
    em.emit("varop", [("type", "divConstInv"), ("constVal", 1.0)])
    return None


@rule("log2")
def _lower_log2(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    em.unary(source(node), "log")
    em.emit("varop", [("type", "divConst"), ("constVal", float(np.log(2.0)))])
    return None


def _power(em: Emitter, src: str, n: int) -> None:
    """x**n for an integer n >= 2 by repeated multiplication (exact like x*x*...)."""
    em.use(src)
    em.emit("act", [("activation", "none")])
    for _ in range(n - 1):
        em.emit("varop", [("layers", em.index(src)), ("type", "mul")])


def _number(node: Node, value: float | None) -> float:
    """A scalar operand the target's check accepted; ``None`` means the two disagree."""
    if value is None:
        raise OpAttributeError(f"{node.name} ({node.op} at '{node.where}'): the operand is not "
                               "a scalar constant")
    return value


@rule("pow")
def _lower_pow(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    e = _number(node, scalar_of(graph, node.args["exponent"]))
    src = source(node)
    if e == 1.0:
        return src
    if e == 0.0:
        em.unary(src, "mulConst", 0.0)
        em.emit("varop", [("type", "addConst"), ("constVal", 1.0)])
    elif abs(e) == 0.5:
        em.unary(src, "sqrt")
    elif e == int(e):
        if abs(int(e)) == 1:
            em.use(src)
            em.emit("act", [("activation", "none")])
        else:
            _power(em, src, abs(int(e)))
    else:
        em.unary(src, "pow", abs(e))
    if e < 0:
        em.emit("varop", [("type", "divConstInv"), ("constVal", 1.0)])
    return None


@rule("square")
def _lower_square(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    _power(em, source(node), 2)
    return None


def _operands(node: Node, graph: Graph) -> tuple[Any, Any]:
    return node.args.get("self"), node.args.get("other")


def _per_channel(em: Emitter, node: Node, src: str, vec: np.ndarray, act_first: bool,
                 alpha: float) -> None:
    """A per-channel constant operand as an identity-statistics batchnorm (exact: var 1,
    eps 0, mean 0), the only MsnhNet layer with per-channel scale and shift."""
    op, c = node.op, len(vec)
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    if op == "div" and not act_first:  # vec / x
        em.unary(src, "divConstInv", 1.0)
        src = em.temp(em.shapes[src])
        op = "mul"
    scale, shift = {
        "add": lambda: ((alpha * ones, vec) if not act_first else (ones, alpha * vec)),
        "sub": lambda: ((ones, -alpha * vec) if act_first else (-alpha * ones, vec)),
        "rsub": lambda: ((-alpha * ones, vec) if act_first else (ones, -alpha * vec)),
        "mul": lambda: (vec, zeros),
        "div": lambda: (1.0 / vec, zeros),
    }[op]()
    em.use(src)
    em.emit("batchnorm", [("eps", 0.0)], [scale, shift, zeros, ones])


def _lower_binary(em: Emitter, node: Node, graph: Graph) -> str | bool | None:
    a, b = _operands(node, graph)
    op = node.op
    alpha = float(node.args.get("alpha", 1))
    act_a, act_b = is_activation(graph, a), is_activation(graph, b)
    if act_a and act_b:
        em.binary("sub" if op == "rsub" else op, b.name if op == "rsub" else a.name,
                  a.name if op == "rsub" else b.name)
        return None
    src = (a if act_a else b).name
    if scalar_of(graph, b if act_a else a) is None:
        vector = channel_const(graph, b if act_a else a, value_shape(graph, src))
        if vector is None:  # the target's check admits only scalars and per-channel constants
            raise OpAttributeError(f"{node.name} ({node.op} at '{node.where}'): the constant "
                                   "operand is neither a scalar nor per-channel")
        _per_channel(em, node, src, vector, act_a, alpha)
        return None
    c = _number(node, scalar_of(graph, b if act_a else a))
    if op == "add":
        if act_b and alpha != 1:  # const + alpha * x
            em.unary(src, "mulConst", alpha)
            src = em.temp(em.shapes[src])
            alpha = 1.0
        em.unary(src, "addConst", c * alpha)
    elif op == "mul":
        em.unary(src, "mulConst", c)
    elif op == "sub":
        if act_a:
            em.unary(src, "subConst", c * alpha)
        else:  # const - alpha * x
            if alpha != 1:
                em.unary(src, "mulConst", alpha)
                src = em.temp(em.shapes[src])
            em.unary(src, "subConstInv", c)
    elif op == "rsub":  # other - alpha * self
        if act_a:
            if alpha != 1:
                em.unary(src, "mulConst", alpha)
                src = em.temp(em.shapes[src])
            em.unary(src, "subConstInv", c)
        else:
            em.unary(src, "subConst", c * alpha)
    elif op == "div":
        em.unary(src, "divConst" if act_a else "divConstInv", c)
    return None


for _op in ("add", "sub", "mul", "div", "rsub"):
    RULES[_op] = _lower_binary
