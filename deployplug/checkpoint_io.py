"""Reading Lightning checkpoints without running code from them.

A ``.ckpt`` file is a pickle, and unpickling executes whatever the file asks for: a checkpoint
from somewhere else is code, not data. Lightning's own checkpoints hold only tensors, numbers,
strings and containers, which torch's weights-only unpickler reads, so that is the only way
files are read here. Full unpickling needs an explicit opt-in (``trust_checkpoint``) and warns.

Everything about the file is treated as untrusted: it may be truncated, not a dict, lack a
``state_dict`` or hold keys that do not fit the model. Each of those is a
:class:`~deployplug.errors.CheckpointLoadError` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployplug.errors import CheckpointLoadError

TRUST_HINT = ("if, and only if, you trust where the file came from, load it with "
              "trust_checkpoint=True (command line: --trust-checkpoint)")
_LISTED_KEYS = 5  # how many missing/unexpected keys an error message names


@dataclass(frozen=True)
class CheckpointInfo:
    """What an export records about the checkpoint its weights came from."""

    path: str
    sha256: str
    epoch: int | None
    global_step: int | None

    def metadata(self) -> dict[str, Any]:
        return {"source_checkpoint": self.path, "checkpoint_sha256": self.sha256,
                "epoch": self.epoch, "global_step": self.global_step}


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False
                    ) -> tuple[dict[str, Any], CheckpointInfo]:
    """The checkpoint's dict and its provenance, read with the weights-only unpickler.

    The bytes are read once, so the recorded sha256 is the hash of exactly what was loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint {path} does not exist or is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointLoadError(f"cannot read checkpoint {path}: {exc}") from exc
    if trust_checkpoint:
        warnings.warn(f"loading {path} with full unpickling (trust_checkpoint): the file can run "
                      "arbitrary code while it loads", UserWarning, stacklevel=2)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as exc:
        if not trust_checkpoint and "weights only load failed" in str(exc).lower():
            raise CheckpointLoadError(
                f"checkpoint {path} holds objects other than tensors, numbers, strings and "
                f"containers, and loading them would run code from the file; {TRUST_HINT}"
            ) from None
        raise CheckpointLoadError(f"checkpoint {path} is not a readable checkpoint "
                                  f"({_first_line(exc)})") from exc
    except Exception as exc:  # torch reports truncated or foreign files in many ways
        raise CheckpointLoadError(f"checkpoint {path} is not a readable checkpoint "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(ckpt, Mapping):
        raise CheckpointLoadError(
            f"checkpoint {path} holds a {type(ckpt).__name__}, not a Lightning checkpoint (a "
            "dict with a 'state_dict' entry); save it with Trainer.save_checkpoint")
    info = CheckpointInfo(path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                          epoch=_int_or_none(ckpt.get("epoch")),
                          global_step=_int_or_none(ckpt.get("global_step")))
    return dict(ckpt), info


def checkpoint_weights(ckpt: Mapping[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` entry, checked to be a mapping of names to tensors."""
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointLoadError(
            f"checkpoint {path} has no 'state_dict' entry (keys: {_names(list(ckpt))}); it is "
            "not a Lightning checkpoint")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointLoadError(
            f"checkpoint {path}: state_dict entries {_names(bad)} are not named tensors")
    return dict(state)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a LightningModule ``state_dict`` that belong to attribute ``prefix``."""
    if not prefix:
        return dict(state_dict)
    head = prefix + "."
    return {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}


def load_weights(module: nn.Module, path: str | Path, prefix: str = "",
                 trust_checkpoint: bool = False) -> CheckpointInfo:
    """Load a checkpoint's weights under ``prefix`` into ``module``, strictly, in place."""
    ckpt, info = read_checkpoint(path, trust_checkpoint=trust_checkpoint)
    apply_weights(module, ckpt, path, prefix)
    return info


def apply_weights(module: nn.Module, ckpt: Mapping[str, Any], path: str | Path,
                  prefix: str = "") -> None:
    """Load the already-read checkpoint ``ckpt``'s weights under ``prefix`` into ``module``.

    Missing or unexpected keys and shape mismatches are reported as a
    :class:`CheckpointLoadError` naming the file, instead of torch's multi-page message.
    """
    weights = strip_prefix(checkpoint_weights(ckpt, path), prefix)
    if not weights:
        where = f"under '{prefix}.'" if prefix else "at all"
        raise CheckpointLoadError(f"checkpoint {path} has no weights {where}; is it a checkpoint "
                                  f"of {type(module).__name__}?")
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointLoadError(
            f"checkpoint {path} does not fit {type(module).__name__}: missing keys "
            f"{_names(missing)}, unexpected keys {_names(unexpected)}; it was written for a "
            "different model (give the fit config it was trained with, command line: "
            "--config)")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in weights.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointLoadError(f"checkpoint {path} has weights of the wrong shape for "
                                  f"{type(module).__name__}: {_names(wrong)}")
    module.load_state_dict(weights, strict=True)


def hyperparameters(ckpt: Mapping[str, Any], path: str | Path,
                    key: str = "hyper_parameters") -> dict[str, Any]:
    """The ``__init__`` arguments Lightning stored (``save_hyperparameters``), checked.

    ``key`` is ``hyper_parameters`` for the LightningModule, ``datamodule_hyper_parameters``
    for the DataModule. Keys starting with ``_`` are Lightning's bookkeeping (LightningCLI's
    ``_class_path`` and ``_instantiator``), not arguments.
    """
    hparams = ckpt.get(key)
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping) or not all(isinstance(k, str) for k in hparams):
        raise CheckpointLoadError(f"checkpoint {path}: {key!r} is not a mapping of "
                                  "argument names to values")
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def load_checkpoint_into(module: nn.Module, path: str | Path, prefix: str = "",
                         trust_checkpoint: bool = False) -> nn.Module:
    """:func:`load_weights`, returning the module (handy in expressions)."""
    load_weights(module, path, prefix, trust_checkpoint=trust_checkpoint)
    return module


def _names(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_LISTED_KEYS])
    more = f" and {len(items) - _LISTED_KEYS} more" if len(items) > _LISTED_KEYS else ""
    return f"[{shown}{more}]" if items else "none"


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
