"""Did fusion keep what each changed block computes? Checked on an example input, block by block.

The structural passes only fold what they can prove exact, but blocks fuse themselves with
their own code (``fuse()`` / ``reparameterize()`` / ``switch_to_deploy()``), and one wrong line
there changes the model silently. So when the caller gives an example input, the model is run
once before fusion, recording the outputs of every module fusion may change, and once after,
comparing each changed module's output as it is produced. The first one (in execution order)
whose normalized error exceeds the tolerance is named in a
:class:`~deployplug.errors.ReparameterizationError`; the final outputs are compared too.

Both runs use the same deep copy (before and after fusion) in eval mode, so the user's model is
never run, hooked or switched to eval. Both runs see the same random seed, so a model that
draws random numbers in eval mode does not raise a false alarm.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deployplug.errors import ReparameterizationError

Inputs = torch.Tensor | Sequence[torch.Tensor]
Leaves = list[tuple[str, Any]]

FIX = ("Export with reparameterize=False (DeployCallback(reparameterize=False), "
       "`--no-reparameterize`), or give the block its own fuse()/reparameterize() method.")
_SEED = 0
_MAX_DEPTH = 32
_MAX_LEAVES = 100_000
_MAX_LISTED = 8
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


@dataclass(frozen=True)
class Change:
    """A module fusion replaced or rewrote: where, which object was there before, and how."""

    path: str
    before: nn.Module
    how: str


def as_inputs(example_input: Inputs) -> tuple[torch.Tensor, ...]:
    """A tensor or a tuple/list of tensors -> positional arguments for ``forward``."""
    items = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
    if not isinstance(items, (tuple, list)) or not all(
            isinstance(t, torch.Tensor) for t in items):
        raise TypeError("example_input must be a tensor or a tuple of tensors, got "
                        f"{type(example_input).__name__}")
    return tuple(items)


def flatten(value: Any, where: str = "", depth: int = 0,
            out: Leaves | None = None) -> Leaves:
    """``(key path, leaf)`` pairs of a nested output, in a stable order.

    Tensors and plain scalars are leaves; tuples, lists, mappings (keys sorted by ``repr``) and
    dataclasses are walked. Anything else cannot be compared, so it raises rather than pass.
    """
    out = [] if out is None else out
    if depth > _MAX_DEPTH or len(out) > _MAX_LEAVES:
        raise ReparameterizationError(
            f"output{where} is nested deeper than {_MAX_DEPTH} or has more than {_MAX_LEAVES} "
            "leaves; the fused model cannot be checked on it")
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        out.append((where, value))
    elif isinstance(value, Mapping):
        for key, item in sorted(value.items(), key=lambda kv: repr(kv[0])):
            flatten(item, f"{where}[{key!r}]", depth + 1, out)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            flatten(item, f"{where}[{i}]", depth + 1, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            flatten(getattr(value, f.name), f"{where}.{f.name}", depth + 1, out)
    else:
        raise ReparameterizationError(
            f"output{where} is a {type(value).__name__}, which the fusion check cannot compare; "
            "return tensors (or tuples, lists, dicts or dataclasses of them)")
    return out


def _snapshot(value: Any) -> Leaves:
    """Flattened copy: later in-place ops (``ReLU(inplace=True)``) must not change the record."""
    return [(k, v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in flatten(value)]


def tensor_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|a - r| / max|r|`` like :func:`deployplug.numerics.normalized_error`; ``inf`` for a
    shape change or for NaN/inf where the reference has none (or the reverse).

    Computed in at least float32 (a difference of two float32 values is exact to one rounding,
    plenty against a tolerance); only when a non-finite value shows up does it fall back to
    float64 with masks.
    """
    if actual.shape != reference.shape:
        return math.inf
    a, r = actual.detach(), reference.detach()
    if a.is_complex() or r.is_complex():
        a, r = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(
            r.to(torch.complex128))
    if a.numel() == 0:
        return 0.0
    dtype = torch.promote_types(torch.promote_types(a.dtype, r.dtype), torch.float32)
    a, r = a.to(dtype), r.to(dtype)
    low, high = torch.aminmax(r)
    diff, scale = float(torch.sub(a, r).abs_().amax()), max(-float(low), float(high))
    if math.isfinite(diff) and math.isfinite(scale):
        return diff / max(scale, 1e-12)
    a, r = a.to(torch.float64), r.to(torch.float64)
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(a), finite):
        return math.inf
    same = (a == r) | (torch.isnan(a) & torch.isnan(r))  # equal infinities, or both NaN
    if not bool(same[~finite].all()):
        return math.inf
    a, r = a[finite], r[finite]
    if a.numel() == 0:
        return 0.0
    return float((a - r).abs().max()) / max(float(r.abs().max()), 1e-12)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, complex)) and not isinstance(value, bool)


def leaves_error(actual: Leaves, reference: Leaves) -> tuple[float, str]:
    """Largest per-leaf normalized error and, when the structures differ, why."""
    if [k for k, _ in actual] != [k for k, _ in reference]:
        return math.inf, (f" (output structure changed: {[k for k, _ in reference]} -> "
                          f"{[k for k, _ in actual]})")
    worst, detail = 0.0, ""
    for (key, a), (_, r) in zip(actual, reference):
        if isinstance(a, torch.Tensor) and isinstance(r, torch.Tensor):
            err = tensor_error(a, r)
            if a.shape != r.shape:
                detail = f" (output{key} shape {tuple(r.shape)} -> {tuple(a.shape)})"
        elif _is_number(a) and _is_number(r):
            dtype = torch.complex128 if complex in (type(a), type(r)) else torch.float64
            err = tensor_error(torch.tensor(a, dtype=dtype), torch.tensor(r, dtype=dtype))
            if err:
                detail = f" (output{key} {r!r} -> {a!r})"
        else:
            err = 0.0 if type(a) is type(r) and a == r else math.inf
            if err:
                detail = f" (output{key} {r!r} -> {a!r})"
        worst = max(worst, err)
    return worst, detail


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """One eval forward on fresh clones of the inputs (a forward may write into its input),
    with a fixed seed inside a forked RNG so the caller's random state is not consumed."""
    args = tuple(t.detach().clone() for t in inputs)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(_SEED)
        return model(*args)


def _hooked(modules: Mapping[str, nn.Module],
            on_output: Callable[[str, Any], None]) -> list[torch.utils.hooks.RemovableHandle]:
    handles = []
    for path, module in modules.items():
        def hook(_module: nn.Module, _args: Any, output: Any, path: str = path) -> None:
            on_output(path, output)
        handles.append(module.register_forward_hook(hook))
    return handles


@dataclass
class Reference:
    """What the model computed before fusion: watched modules' outputs (per call) and the
    final output. ``modules`` keeps the watched objects alive, so identity checks are sound."""

    modules: dict[str, nn.Module]
    outputs: dict[str, list[Leaves]]
    final: Leaves


def record(model: nn.Module, inputs: tuple[torch.Tensor, ...],
           watch: Mapping[str, nn.Module]) -> Reference:
    """Run ``model`` once, recording the output of each watched module; hooks are removed."""
    outputs: dict[str, list[Leaves]] = {path: [] for path in watch}
    handles = _hooked(watch, lambda path, out: outputs[path].append(_snapshot(out)))
    try:
        final = _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return Reference(dict(watch), outputs, _snapshot(final))


def _describe(path: str, change: Change) -> str:
    where = path or "<top-level model>"
    return f"'{where}' ({type(change.before).__name__}, {change.how})"


def check(fused: nn.Module, inputs: tuple[torch.Tensor, ...], reference: Reference,
          changes: Sequence[Change], tolerance: float) -> None:
    """Compare ``fused`` with ``reference`` at every change it can map back, in execution
    order, then at the final output; raise :class:`ReparameterizationError` on the first miss.

    A change is mapped when the module recorded at its path is the very object fusion changed
    (so a path reused by a replacement's new children is never compared with a stranger).
    """
    fused_modules = dict(fused.named_modules())
    mapped = {c.path: c for c in changes
              if reference.modules.get(c.path) is c.before and c.path in fused_modules}
    calls: dict[str, int] = dict.fromkeys(mapped, 0)
    results: list[tuple[str, int, float, str]] = []

    def compare(path: str, output: Any) -> None:
        index = calls[path]
        calls[path] += 1
        recorded = reference.outputs[path]
        if index >= len(recorded):
            results.append((path, index, math.inf, " (called more often than before fusion)"))
            return
        err, detail = leaves_error(flatten(output), recorded[index])
        results.append((path, index, err, detail))

    handles = _hooked({p: fused_modules[p] for p in mapped}, compare)
    try:
        final = _run(fused, inputs)
    except ReparameterizationError:
        raise
    except Exception as exc:
        raise ReparameterizationError(
            f"the fused model fails on the example input ({type(exc).__name__}: {exc}) although "
            f"the original runs. {FIX}") from exc
    finally:
        for handle in handles:
            handle.remove()
    for path, index, err, detail in results:
        if not err <= tolerance:
            raise ReparameterizationError(
                f"fusion changed the output of block {_describe(path, mapped[path])}: "
                f"normalized error {err:.3g} > tolerance {tolerance:g} on the example input"
                f"{detail}{f' (call {index + 1})' if index else ''}. {FIX}")
    for path, count in calls.items():
        if count != len(reference.outputs[path]):
            raise ReparameterizationError(
                f"block {_describe(path, mapped[path])} ran {count} time(s) after fusion but "
                f"{len(reference.outputs[path])} before. {FIX}")
    err, detail = leaves_error(flatten(final), reference.final)
    if not err <= tolerance:
        changed = ", ".join(_describe(c.path, c) for c in changes[:_MAX_LISTED])
        if len(changes) > _MAX_LISTED:
            changed += f" and {len(changes) - _MAX_LISTED} more"
        raise ReparameterizationError(
            f"fusion changed the model output: normalized error {err:.3g} > tolerance "
            f"{tolerance:g} on the example input{detail}, although every block it could check "
            f"matched; a changed module's output is probably used where the passes cannot see "
            f"it. Changed: {changed}. {FIX}")
