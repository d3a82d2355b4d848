"""Names for a model's inputs and outputs, and one flat order for any output structure.

Deployment formats know tensors, not Python containers: an ONNX graph, a Caffe net and a
MsnhNet file each end in a flat list of named outputs. A model may return a tensor, a tuple,
a list, a dict or any nesting of them; this module fixes *one* order for the leaves (the order
the model returns them in, dict keys in insertion order) and *one* name per leaf, so the
writers, the reference outputs, verification and the manifest all line up.

Names:

* a single tensor is ``output``; a flat tuple/list of tensors is ``output0``, ``output1`` ...
* dict keys are used as they are (``{"logits": t}`` -> ``logits``), nested positions are
  joined with ``.`` (``{"aux": (a, b)}`` -> ``aux.0``, ``aux.1``);
* inputs are named after ``forward``'s parameters (``x``, ``image`` ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deployplug.errors import InputShapeError


@dataclass(frozen=True)
class OutputSpec:
    """Where each leaf of a model's output sits, and its name."""

    names: tuple[str, ...]
    #: True when the model already returns a tensor or a flat tuple/list of tensors
    flat: bool


def _leaves(value: Any, path: tuple[str, ...], out: list[tuple[tuple[str, ...], Any]]) -> None:
    if isinstance(value, torch.Tensor):
        out.append((path, value))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise InputShapeError(
                    f"output dict key {key!r} is not a non-empty string; deployment formats "
                    "name outputs after dict keys, so use string keys")
            _leaves(item, (*path, key), out)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _leaves(item, (*path, str(i)), out)
    else:
        where = ".".join(path) or "the output"
        raise InputShapeError(
            f"{where} is a {type(value).__name__}; a deployed model can only return tensors "
            "(alone, or in tuples, lists and dicts of tensors). Return tensors from forward(), "
            "or export a sub-module that does.")


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """The output leaves in their fixed order."""
    leaves: list[tuple[tuple[str, ...], Any]] = []
    _leaves(value, (), leaves)
    if not leaves:
        raise InputShapeError("the model returned no tensor; a deployed model needs an output")
    return [t for _, t in leaves]


def output_spec(value: Any) -> OutputSpec:
    """Names for the leaves of one output value (see the module docstring)."""
    leaves: list[tuple[tuple[str, ...], Any]] = []
    _leaves(value, (), leaves)
    if not leaves:
        raise InputShapeError("the model returned no tensor; a deployed model needs an output")
    if isinstance(value, torch.Tensor):
        return OutputSpec(("output",), flat=True)
    flat = isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value)
    if flat:
        return OutputSpec(tuple(f"output{i}" for i in range(len(leaves))), flat=True)
    names = []
    for path, _ in leaves:
        head = path[0] if not isinstance(value, (tuple, list)) else f"output{path[0]}"
        names.append(".".join((head, *path[1:])))
    if len(set(names)) != len(names):
        raise InputShapeError(f"output names are not unique: {names}")
    return OutputSpec(tuple(names), flat=False)


def input_names(model: nn.Module, count: int) -> list[str]:
    """Names of ``forward``'s first ``count`` positional parameters.

    Falls back to ``input`` / ``input0``... when ``forward`` takes ``*args`` or the
    signature cannot be read (a compiled or C++ module).
    """
    fallback = ["input"] if count == 1 else [f"input{i}" for i in range(count)]
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return fallback
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional[:count]]
    if len(names) < count or len(set(names)) < count:
        return fallback
    return names


class FlatOutputs(nn.Module):
    """Run a model and return its output leaves as a flat tuple, with the same module paths.

    The wrapper shares the wrapped model's submodules, parameters and buffers (the same
    dictionaries, not copies), so every module path a capture records, every error message and
    every Caffe layer name is the one the user knows, with no wrapper prefix.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        object.__setattr__(self, "wrapped", model)

    wrapped: nn.Module  # set in __dict__, not registered: its children are ours already

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.wrapped(*args)))


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs: that is what gets exported and checked."""
    inner = getattr(model, "_orig_mod", None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "_orig_mod", None)
    return model


def strip_compiled_children(model: nn.Module) -> nn.Module:
    """Replace every ``torch.compile`` wrapper inside ``model`` by the module it wraps, in place.

    A compiled child runs through dynamo, which hides the calls inside it from module hooks
    and adds ``_orig_mod`` to every module path; the function it computes is its inner
    module's, so the deploy copy holds that instead. Returns ``model`` (unwrapped itself too).
    """
    model = unwrap_compiled(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            inner = unwrap_compiled(child)
            if inner is not child:
                setattr(parent, name, inner)
        _drop_compiled_forward(parent)
    return model


_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def _drop_compiled_forward(module: nn.Module) -> None:
    """Undo Lightning's compilation of a LightningModule (``trainer.fit(torch.compile(m))``).

    Lightning keeps the compiled module but sets instance attributes ``forward`` (and the
    step methods) to dynamo-wrapped functions, remembering the originals in
    ``_compiler_ctx``. In a deep copy those wrappers still close over the *original* module,
    so the copy would run the training model; deleting them restores the class methods.
    """
    if not getattr(module, "_compiler_ctx", None):
        return
    for name in _COMPILED_METHODS:
        module.__dict__.pop(name, None)
    module.__dict__["_compiler_ctx"] = None


def as_sequence(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
