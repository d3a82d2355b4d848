"""What a Caffe lowering builds and where its rules register.

Separate from the driver (:mod:`.lower`) and the per-op modules (``layers_*``) so that both
can import it without importing each other: the layer modules register their emitters in
:data:`RULES` and append to a :class:`LowerCtx`; the driver only walks the graph and
dispatches. The network itself (:class:`CaffeNet`) is plain data, independent of protobuf,
so the writer serializes it without knowing how it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployplug.capture import Graph, Node, Ref


@dataclass
class Layer:
    """One Caffe layer: params are ``{"convolution_param": {...}}`` style plain dicts."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: list[np.ndarray] = field(default_factory=list)
    node: str = ""


@dataclass
class CaffeNet:
    """A lowered network, independent of protobuf (the writer serializes it)."""

    name: str
    dialect: str
    inputs: list[tuple[str, tuple[int, ...]]]
    layers: list[Layer]
    outputs: list[str]
    #: graph value name -> blob name holding it (aliases share a blob)
    value_blobs: dict[str, str]
    #: facts runtimes need (e.g. channel counts of om Upsample layers)
    extras: dict[str, Any] = field(default_factory=dict)

    def name_outputs(self, names: list[str]) -> None:
        """Call the output blobs after the model's outputs (dict keys), where that is safe.

        Deploy code looks outputs up by blob name, so ``logits`` beats ``head.fc``. A blob is
        left as it is when it is also an input, holds two outputs at once, or when the new
        name is already taken by another blob: renaming must never merge two blobs.
        """
        if len(names) != len(self.outputs):
            return
        taken = {t for layer in self.layers for t in layer.tops} | {n for n, _ in self.inputs}
        inputs = {n for n, _ in self.inputs}
        renames: dict[str, str] = {}
        for old, new in zip(self.outputs, names):
            if (old == new or old in inputs or self.outputs.count(old) > 1
                    or new in taken or new in renames.values()):
                continue
            renames[old] = new
        if not renames:
            return
        for layer in self.layers:
            layer.tops = [renames.get(t, t) for t in layer.tops]
            layer.bottoms = [renames.get(b, b) for b in layer.bottoms]
        self.outputs = [renames.get(o, o) for o in self.outputs]
        self.value_blobs = {v: renames.get(b, b) for v, b in self.value_blobs.items()}


def hw(prefix: str, v: Sequence[int], scalar: str, default: int | None = None) -> dict:
    """``kernel_size: 3`` when square, ``kernel_h/kernel_w`` otherwise (``pad``, ``stride``)."""
    if v[0] == v[1]:
        return {} if v[0] == default else {scalar: v[0]}
    return {f"{prefix}_h": v[0], f"{prefix}_w": v[1]}


def nearest_deconv_param(c: int, fh: int, fw: int) -> dict[str, Any]:
    """A depthwise Deconvolution that repeats every pixel ``fh x fw`` times (weights all 1).

    BVLC Caffe's nearest upsampling, and what OpenCV runs in place of om's ``Upsample``; kept
    with the data model so the runtime can use it without the lowering.
    """
    return {"num_output": c, "bias_term": False, "group": c,
            **hw("kernel", (fh, fw), "kernel_size"), **hw("stride", (fh, fw), "stride")}


Emit = Callable[["LowerCtx", Node], None]

#: op -> how to emit it; which ops are legal (and why not) is the target's business
#: (:mod:`deployplug.profiles.caffe_checks`), and :mod:`.lower` holds the two key sets equal.
RULES: dict[str, Emit] = {}


def rule(*ops: str) -> Callable[[Emit], Emit]:
    def deco(emit: Emit) -> Emit:
        for op in ops:
            RULES[op] = emit
        return emit

    return deco


class LowerCtx:
    """Mutable state of one lowering: layers so far and where each value lives."""

    def __init__(self, graph: Graph, dialect: str,
                 folded: dict[str, tuple[Ref, tuple[int, int]]]):
        self.graph = graph
        self.dialect = dialect
        self.layers: list[Layer] = []
        self.value_blobs: dict[str, str] = {}
        self.extras: dict[str, Any] = {}
        #: zero pads folded into the convolutions that read them: pad node -> (source, (ph, pw))
        self.folded = folded
        self._names: set[str] = {v.name for v in graph.inputs} | {n.name for n in graph.nodes}
        self._taken: set[str] = set()

    def blob(self, value: str | Ref) -> str:
        return self.value_blobs[value.name if isinstance(value, Ref) else value]

    def fresh(self, base: str) -> str:
        """An intermediate blob/layer name under ``base`` that no graph value or layer uses."""
        i = 0
        while True:
            name = f"{base}/{i}"
            if name not in self._names and name not in self._taken:
                self._taken.add(name)
                return name
            i += 1

    def add(self, name: str, type_: str, bottoms: list[str], tops: list[str],
            params: dict[str, dict[str, Any]] | None = None,
            blobs: list[np.ndarray] | None = None, node: str = "") -> str:
        self._taken.add(name)
        self.layers.append(Layer(name, type_, list(bottoms), list(tops), params or {},
                                 [np.asarray(b, dtype=np.float32) for b in blobs or []], node))
        return tops[0]

    def step(self, node: Node, type_: str, bottoms: list[str],
             params: dict[str, dict[str, Any]] | None = None,
             blobs: list[np.ndarray] | None = None, final: bool = False) -> str:
        """Add a single-top layer; ``final`` names it (and its blob) after the node."""
        name = node.name if final else self.fresh(node.name)
        top = self.add(name, type_, bottoms, [name], params, blobs, node.name)
        if final:
            self.value_blobs[node.name] = top
        return top

    def alias(self, node: Node, blob: str) -> None:
        self.value_blobs[node.name] = blob
