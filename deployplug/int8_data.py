"""Calibration and evaluation batches for ``onnx_int8``, taken from a run's dataloaders.

The callback and ``deployplug export`` both quantize with training batches (what the int8
ranges must cover) and judge on validation batches with their labels (what the accuracy drop
is measured on). Both take them here, the same way, cut to the configured sample counts so a
large dataset costs a bounded number of batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deployplug.errors import ConfigError
from deployplug.examples import split_batch


@dataclass
class Int8Data:
    """Input batches for calibration and evaluation, and the evaluation labels when known."""

    calibration: list[tuple[torch.Tensor, ...]]
    eval_inputs: list[tuple[torch.Tensor, ...]] | None = None
    eval_labels: torch.Tensor | None = None

    def options(self, settings: dict[str, Any] | None) -> dict[str, Any]:
        """``settings`` (the ``int8`` mapping of a callback) with the evaluation data added."""
        merged = dict(settings or {})
        if self.eval_inputs:
            merged["eval_inputs"] = self.eval_inputs
            merged["eval_labels"] = self.eval_labels
        return merged


def loader_batches(loader: Iterable[Any] | None, shapes: Sequence[Sequence[int]],
                   max_samples: int | None, name: str
                   ) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor | None]:
    """Input batches of the export's per-sample shapes, up to ``max_samples`` samples.

    Labels are returned only when every batch taken carries them (an integer vector after
    the inputs). A batch of another per-sample shape is an error: int8 ranges taken from
    inputs the file never sees would be wrong.
    """
    if loader is None:
        return [], None
    want = [tuple(int(d) for d in s[1:]) for s in shapes]
    batches: list[tuple[torch.Tensor, ...]] = []
    labels: list[torch.Tensor] = []
    taken = 0
    for index, batch in enumerate(loader):
        if max_samples is not None and taken >= max_samples:
            break
        try:
            inputs, y = split_batch(batch, len(want))
        except ValueError as exc:
            raise ConfigError(f"int8 {name} batch {index}: {exc}") from None
        got = [tuple(t.shape[1:]) for t in inputs]
        if got != want:
            raise ConfigError(f"int8 {name} batch {index} has per-sample shapes {got}, the "
                              f"export's input {want}: int8 is calibrated and judged on inputs "
                              "of the exported shape")
        room = inputs[0].shape[0] if max_samples is None else max_samples - taken
        batches.append(tuple(t[:room].detach().to("cpu", torch.float32).clone()
                             for t in inputs))
        labels.append(y[:room].detach().cpu().clone() if y is not None else torch.empty(0))
        taken += int(batches[-1][0].shape[0])
    if batches and all(y.numel() == b[0].shape[0] for y, b in zip(labels, batches)):
        return batches, torch.cat(labels).long()
    return batches, None


def gather(train_loader: Iterable[Any] | None, val_loader: Iterable[Any] | None,
           shapes: Sequence[Sequence[int]], settings: dict[str, Any] | None) -> Int8Data:
    """Calibration from ``train_loader``, evaluation (and labels) from ``val_loader``."""
    from deployplug.quant.options import Int8Options

    options = Int8Options.coerce(settings)
    calibration, _ = loader_batches(train_loader, shapes, options.calibration_samples,
                                    "calibration")
    if not calibration:
        raise ConfigError("onnx_int8 needs training batches to calibrate on: the run has no "
                          "training dataloader")
    evaluation, labels = loader_batches(val_loader, shapes, options.eval_samples, "evaluation")
    return Int8Data(calibration, evaluation or None, labels if evaluation else None)


def train_loader(trainer: Any) -> Any:
    """A fresh training loader from the datamodule, else the trainer's own."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        try:
            return datamodule.train_dataloader()
        except Exception:  # a datamodule without training data: fall back to the trainer's
            pass
    return getattr(trainer, "train_dataloader", None)


__all__ = ["Int8Data", "gather", "loader_batches", "train_loader"]
