"""What the callback reads from a running Trainer: the best checkpoint, the validation data.

Both are read defensively: the checkpoint callback may be absent or may not have saved yet,
and a datamodule may have no validation data.
"""

from __future__ import annotations

import os
from typing import Any


def trainer_callbacks(trainer: Any) -> list[Any]:
    """The trainer's callbacks (Lightning sets the attribute at run time, untyped)."""
    return list(trainer.callbacks)


def is_fast_dev_run(trainer: Any) -> bool:
    """Whether the run is a ``fast_dev_run`` smoke test, which exports nothing."""
    return bool(trainer.fast_dev_run)


def best_checkpoint_key(trainer: Any) -> list[Any] | None:
    """What identifies the best checkpoint's *content*: path, score, size and mtime.

    ModelCheckpoint reuses a file name when its ``filename`` has no placeholders, so the path
    alone would never change after the first save.
    """
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") or ""
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    score = getattr(ckpt, "best_model_score", None)
    score_text = None if score is None else repr(float(score))
    return [str(path), score_text, int(stat.st_size), int(stat.st_mtime_ns)]


def validation_loader(trainer: Any) -> Any:
    """A fresh, non-distributed validation loader if the datamodule makes one."""
    datamodule = trainer.datamodule
    if datamodule is not None:
        try:
            return datamodule.val_dataloader()
        except Exception:  # a datamodule without validation data: fall back to the trainer's
            pass
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders
