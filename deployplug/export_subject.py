"""Which module of a LightningModule is exported, and which one is the truth it is checked against.

What was trained is what ``pl_module(x)`` computes: its ``forward`` may normalise the input,
run a backbone and a head, or post-process. Exporting only ``pl_module.net`` whenever that
attribute exists silently ships a different function, and verifying that export against
``net`` itself proves nothing. So:

* the reference (the outputs every artifact must reproduce) is always the LightningModule's
  forward, on a CPU copy;
* by default the whole forward is exported; the ``net`` attribute is exported instead only
  when it reproduces the forward exactly on the samples given (same outputs, bitwise or within
  :data:`EXACT` normalized error), since the two are then the same function;
* a submodule the user names must reproduce the forward too, unless they accept the
  difference explicitly, in which case that submodule is its own reference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deployplug.errors import ModuleMismatchError
from deployplug.io_spec import flatten_outputs, strip_compiled_children
from deployplug.numerics import normalized_error

Example = torch.Tensor | tuple[torch.Tensor, ...]
#: Largest normalized error at which a submodule counts as computing the forward itself.
EXACT = 1e-7
AUTO_ATTR = "net"


@dataclass
class ExportSubject:
    """The module handed to the exporters and the module whose outputs are the truth."""

    model: nn.Module
    reference: nn.Module
    name: str  # "ClassifierModule.forward" or the submodule path ("net")
    attr: str  # "" when the whole forward is exported, else the submodule path
    reproduces_forward: bool

    def metadata(self) -> dict[str, Any]:
        return {"exported_module": self.name, "reproduces_forward": self.reproduces_forward}


def forward_name(module: nn.Module) -> str:
    return f"{type(module).__name__}.forward"


def lightning_copy(pl_module: nn.Module) -> nn.Module:
    """A CPU, float32, eval-mode deep copy of a (Lightning) module, without its Trainer.

    The trainer and its datamodule are mapped to ``None`` in the copy's memo, so neither they
    nor the data and loggers they reference are copied, whichever attribute points at them.
    ``torch.compile`` wrappers are removed from the copy (they would still call the original).
    """
    memo: dict[int, Any] = {}
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            memo[id(datamodule)] = None
    clone = strip_compiled_children(copy.deepcopy(pl_module, memo))
    return clone.cpu().float().eval()


def _inputs(example: Example) -> tuple[torch.Tensor, ...]:
    return (example,) if isinstance(example, torch.Tensor) else tuple(example)


def difference(candidate: nn.Module, reference: nn.Module,
               samples: Sequence[Example]) -> str | None:
    """``None`` when ``candidate`` computes what ``reference`` computes on every sample.

    Otherwise a one-line description: the output shapes, the error, or what the candidate
    raised. The reference is assumed to run (the caller probes it first).
    """
    for k, sample in enumerate(samples):
        inputs = _inputs(sample)
        with torch.no_grad():
            want = [t.detach() for t in flatten_outputs(reference(*inputs))]
            try:
                got = [t.detach() for t in flatten_outputs(candidate(*inputs))]
            except Exception as exc:  # the candidate decides what a wrong input raises
                return f"it raises {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        got_shapes = [tuple(t.shape) for t in got]
        want_shapes = [tuple(t.shape) for t in want]
        if got_shapes != want_shapes:
            return f"its outputs have shapes {got_shapes}, the forward's {want_shapes}"
        for j, (a, b) in enumerate(zip(got, want, strict=True)):
            if torch.equal(a, b):
                continue
            err = normalized_error(a.float(), b.float())
            if not err <= EXACT:
                return (f"output {j} differs on sample {k} by normalized error {err:.3g} "
                        f"(exact means <= {EXACT:g})")
    return None


def resolve_subject(lit: nn.Module, samples: Sequence[Example], module_attr: str | None = None,
                    accept_submodule_mismatch: bool = False) -> ExportSubject:
    """Decide what to export from ``lit`` (a CPU eval copy of the LightningModule).

    ``module_attr``: ``None`` exports the forward (or the identical ``net``), ``""`` the whole
    forward always, a dotted path that submodule. ``samples`` are the inputs the submodule
    must agree on; the first is the example input.
    """
    whole = ExportSubject(model=lit, reference=lit, name=forward_name(lit), attr="",
                          reproduces_forward=True)
    if module_attr == "":
        return whole
    if module_attr is None:
        net = getattr(lit, AUTO_ATTR, None)
        if isinstance(net, nn.Module) and net is not lit and \
                difference(net, lit, samples) is None:
            return ExportSubject(model=net, reference=lit, name=AUTO_ATTR, attr=AUTO_ATTR,
                                 reproduces_forward=True)
        return whole
    sub = submodule(lit, module_attr)
    diff = difference(sub, lit, samples)
    if diff is None:
        return ExportSubject(model=sub, reference=lit, name=module_attr, attr=module_attr,
                             reproduces_forward=True)
    if accept_submodule_mismatch:
        return ExportSubject(model=sub, reference=sub, name=module_attr, attr=module_attr,
                             reproduces_forward=False)
    owner = type(lit).__name__
    raise ModuleMismatchError(
        f"module_attr={module_attr!r} would export {owner}.{module_attr}, which does not compute "
        f"what {owner}.forward computes on the example input: {diff}. Either export the whole "
        f"forward (module_attr=None or '', command line: --module-attr ''), or export "
        f"{module_attr!r} on purpose with accept_submodule_mismatch=True (command line: "
        "--accept-submodule-mismatch); its artifacts are then checked against the submodule "
        "alone")


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root``'s submodule at dotted ``path``, or a ValueError naming what exists."""
    try:
        found = root.get_submodule(path)
    except AttributeError:
        found = None
    if not isinstance(found, nn.Module):
        children = [name for name, _ in root.named_children()]
        raise ValueError(f"{type(root).__name__} has no submodule {path!r}; its children are "
                         f"{children}")
    return found
