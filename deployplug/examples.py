"""Example inputs for an export, and real inputs cut from validation batches.

The callback and the command line both need the same answers: which shape the export is
written for, a seeded example of that shape, whether the model runs on it, and which real
validation inputs join the verification samples. They differ only in how a setting is
spelled for the user (``DeployCallback(input_shape=...)`` or ``--input-shape``), so every
message takes the spelling as an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from deployplug.errors import InputShapeError

Example = torch.Tensor | tuple[torch.Tensor, ...]
#: How the callback names its shape setting; the command line passes ``--input-shape``.
CALLBACK_SHAPE_OPTION = "DeployCallback(input_shape=...)"


def example_shapes(input_shape: Sequence[int] | None, example_input_array: Any,
                   option: str = CALLBACK_SHAPE_OPTION) -> list[tuple[int, ...]]:
    """Input shapes (batch dim included): the configured one, else the module's example."""
    if input_shape is not None:
        return [tuple(int(d) for d in input_shape)]
    if isinstance(example_input_array, torch.Tensor):
        return [tuple(example_input_array.shape)]
    if isinstance(example_input_array, (tuple, list)) and example_input_array and all(
            isinstance(t, torch.Tensor) for t in example_input_array):
        return [tuple(t.shape) for t in example_input_array]
    raise InputShapeError(
        f"the shape of an example input is unknown: pass {option} (batch dim included, e.g. "
        "1 3 224 224) or set example_input_array on the LightningModule")


def make_example(shapes: Sequence[Sequence[int]], seed: int = 0) -> Example:
    """Seeded standard-normal inputs: zeros would hide wrong weights behind the biases."""
    gen = torch.Generator().manual_seed(seed)
    tensors = tuple(torch.randn(*s, generator=gen) for s in shapes)
    return tensors[0] if len(tensors) == 1 else tensors


def expected_shape_text(pl_module: nn.Module, network: nn.Module | None = None) -> str | None:
    """What the model says its input looks like, for error messages."""
    parts = []
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        parts.append(f"{tuple(example.shape)} (example_input_array)")
    default = getattr(network if network is not None else pl_module, "default_input_shape", None)
    if default is not None:
        parts.append(f"{tuple(default)} (default_input_shape)")
    return " or ".join(parts) or None


def probe_forward(network: nn.Module, example: Example, expected: str | None = None,
                  option: str = CALLBACK_SHAPE_OPTION) -> None:
    """Run one forward pass; a mismatch names the given shape and what the model expects."""
    from deployplug.pipeline import as_input_tuple, check_runs

    hint = (f"The model expects {expected}. " if expected else "") + (
        f"Set {option} to the shape the network takes.")
    check_runs(network, as_input_tuple(example), hint=hint)


def split_batch(batch: Any, count: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """``(inputs, labels)`` of a validation batch: a tensor, or ``(x..., y, ...)`` items.

    The first ``count`` items are the model's inputs; the item after them, when it is an
    integer vector with one entry per sample, is the labels. Anything else is refused with a
    ``ValueError`` naming what was found, since guessing which part of a batch is the input
    would measure the wrong thing.
    """
    if isinstance(batch, torch.Tensor):
        if count != 1:
            raise ValueError(f"a batch that is one tensor cannot feed a model of {count} inputs")
        return (batch,), None
    if not isinstance(batch, (tuple, list)):
        raise ValueError(f"validation batches must be a tensor or a tuple (inputs..., labels), "
                         f"got a {type(batch).__name__}")
    items = list(batch)
    if len(items) < count or not all(isinstance(t, torch.Tensor) for t in items[:count]):
        kinds = [type(t).__name__ for t in items]
        raise ValueError(f"the first {count} item(s) of a validation batch must be the model's "
                         f"input tensors, got {kinds}")
    inputs = tuple(items[:count])
    labels = items[count] if len(items) > count else None
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and \
            labels.ndim == 1 and labels.shape[0] == inputs[0].shape[0]:
        return inputs, labels
    return inputs, None


def validation_samples(loader: Iterable[Any] | None, shapes: Sequence[Sequence[int]],
                       count: int = 2, max_batches: int = 2) -> list[Example]:
    """Up to ``count`` real inputs of exactly the example's shapes, cut from the first batches.

    Real images exercise value ranges a standard-normal example does not (a normalisation in
    the forward, saturating activations). Batches whose per-sample shape differs from the
    example's are not used (the export has a fixed shape); the caller is told by an empty list.
    """
    samples: list[Example] = []
    if loader is None or count <= 0:
        return samples
    want = [tuple(int(d) for d in s) for s in shapes]
    size = want[0][0]
    for index, batch in enumerate(loader):
        if index >= max_batches or len(samples) >= count:
            break
        try:
            inputs, _ = split_batch(batch, len(want))
        except ValueError:
            break
        if any(tuple(t.shape[1:]) != s[1:] or t.shape[0] != inputs[0].shape[0]
               for t, s in zip(inputs, want, strict=True)):
            break
        for start in range(0, inputs[0].shape[0] - size + 1, size):
            if len(samples) >= count:
                break
            piece = tuple(t[start:start + size].detach().to("cpu", torch.float32).clone()
                          for t in inputs)
            samples.append(piece[0] if len(piece) == 1 else piece)
    return samples
