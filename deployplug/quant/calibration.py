"""Calibration and evaluation batches: checked once, cut to a bounded count, fed to runtimes.

Quantization ranges come from real inputs, so the batches the caller hands over decide what
the int8 file can represent. They are checked here (floating point, finite, one shape per
input apart from the batch size, the same number of inputs everywhere) and cut to at most
``max_samples`` samples, so a whole training loader passed by mistake costs a bounded amount
of work instead of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deployplug.errors import ConfigError, InputShapeError

Batch = tuple[torch.Tensor, ...]
#: default number of calibration samples (images), a common choice for static quantization
DEFAULT_CALIBRATION_SAMPLES = 256


def _as_batch(item: Any, where: str) -> Batch:
    tensors = (item,) if isinstance(item, torch.Tensor) else item
    if not isinstance(tensors, (tuple, list)) or not tensors or not all(
            isinstance(t, torch.Tensor) for t in tensors):
        raise InputShapeError(
            f"{where} must be a tensor or a tuple of tensors (the model's inputs), got "
            f"{type(item).__name__}; pass input batches, not (input, label) pairs")
    batch = tuple(t.detach().cpu() for t in tensors)
    for i, t in enumerate(batch):
        if not t.is_floating_point():
            raise InputShapeError(f"{where}, input {i}: dtype {t.dtype}; int8 calibration "
                                  "needs the float inputs the model is fed")
        if t.dim() < 1 or t.shape[0] < 1:
            raise InputShapeError(f"{where}, input {i}: shape {tuple(t.shape)} has no batch")
        if not bool(torch.isfinite(t).all()):
            raise InputShapeError(f"{where}, input {i}: holds NaN or infinity")
    return tuple(t.float() for t in batch)


@dataclass
class Batches:
    """Input batches of one model, all with the same per-sample shapes."""

    batches: list[Batch]

    @property
    def samples(self) -> int:
        return sum(int(b[0].shape[0]) for b in self.batches)

    def sample_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape[1:]) for t in self.batches[0]]

    def first_sample(self) -> Batch:
        """A batch of one: the example the fp32 graph is traced with."""
        return tuple(t[:1] for t in self.batches[0])

    def head(self, max_samples: int | None) -> Batches:
        """The first ``max_samples`` samples (all of them for ``None``)."""
        if max_samples is None or max_samples >= self.samples:
            return self
        return collect_batches(self.batches, max_samples)

    def numpy(self) -> list[list[np.ndarray]]:
        """Every batch as numpy arrays, the way the exporters' ``run_samples`` takes them."""
        return [[t.numpy() for t in b] for b in self.batches]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collect_batches(source: torch.Tensor | Iterable[Any], max_samples: int | None,
                    name: str = "calibration") -> Batches:
    """Check ``source`` (one tensor, or an iterable of input batches) and cut it to size.

    ``max_samples`` bounds the samples taken (the last batch is cut); ``None`` takes all.
    Raises :class:`~deployplug.errors.InputShapeError` naming the batch that does not fit
    and :class:`~deployplug.errors.ConfigError` when nothing usable was given.
    """
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"{name}: the sample count must be at least 1, got {max_samples}")
    items: Iterable[Any] = [source] if isinstance(source, torch.Tensor) else source
    if isinstance(source, (str, bytes)) or not isinstance(items, Iterable):
        raise ConfigError(f"{name} must be a tensor or an iterable of input batches, got "
                          f"{type(source).__name__}")
    batches: list[Batch] = []
    taken = 0
    shapes: list[tuple[int, ...]] | None = None
    for k, item in enumerate(items):
        batch = _as_batch(item, f"{name} batch {k}")
        this = [tuple(t.shape[1:]) for t in batch]
        if shapes is None:
            shapes = this
        elif this != shapes:
            raise InputShapeError(f"{name} batch {k} has per-sample shapes {this}, batch 0 "
                                  f"has {shapes}: every batch must fit the same model input")
        if len({int(t.shape[0]) for t in batch}) != 1:
            raise InputShapeError(f"{name} batch {k}: its inputs have different batch sizes")
        if max_samples is not None:
            room = max_samples - taken
            batch = tuple(t[:room] for t in batch)
        batches.append(batch)
        taken += int(batch[0].shape[0])
        if max_samples is not None and taken >= max_samples:
            break
    if not batches:
        raise ConfigError(f"{name} is empty: pass at least one batch of real inputs")
    return Batches(batches)


def collect_labels(labels: torch.Tensor | np.ndarray | Sequence[Any] | None,
                   batches: Batches) -> np.ndarray | None:
    """Labels for ``batches`` as one integer array, or None; their count must match."""
    if labels is None:
        return None
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        parts = [np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)]
    else:
        parts = [np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p) for p in labels]
    flat = np.concatenate([p.reshape(-1) if p.ndim <= 1 else p for p in parts])
    if flat.dtype.kind not in "iu":
        raise ConfigError(f"labels must be integer class indices, got dtype {flat.dtype}")
    if flat.shape[0] < batches.samples:
        raise ConfigError(f"{flat.shape[0]} labels for {batches.samples} evaluation samples: "
                          "pass one label per sample (or none)")
    return flat[: batches.samples].astype(np.int64)
