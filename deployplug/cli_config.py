"""The user's LightningModule and DataModule, from fit configs or from a checkpoint.

``deployplug fit|validate|test|predict`` is LightningCLI in subclass mode: ``model`` and
``data`` take any LightningModule / LightningDataModule by ``class_path`` + ``init_args``,
and the deploy overlays (``callbacks+:``) compose onto any fit config. A ``model`` section
without ``class_path`` means :class:`deployplug.lit.ClassifierModule`, so configs written for
it keep working.

``deployplug export`` / ``check`` rebuild the same objects from the same configs, or, without
a config, from what LightningCLI stored in the checkpoint (``_class_path`` and the init
arguments). A checkpoint is untrusted input, so the class it names is only instantiated when
it is a LightningModule (LightningDataModule) subclass importable from the installed
packages, outside the standard library; its own ``_instantiator`` entry is never called.

Every problem is a :class:`~deployplug.errors.ConfigError` or a
:class:`~deployplug.errors.CheckpointLoadError` whose message is one line naming the
command-line flag to change.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from deployplug.errors import CheckpointLoadError, ConfigError

DEFAULT_MODEL = "deployplug.lit.ClassifierModule"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch",
                      "lightning.fabric")
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)': (.*?)(?: - Expected a|$)")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def one_line(text: object) -> str:
    """``text`` on one line, with jsonargparse's ``Parser key "a.b"`` spelt as ``--a.b``.

    A class that rejects its arguments is reported by jsonargparse as a page about union
    subtypes; the class and its reason are what the user needs, so that is what is kept.
    """
    flat = " ".join(re.sub(r'Parser key "([^"]+)"', r"--\1", str(text)).split())
    rejected = _CLASS_PROBLEM.search(flat)
    if rejected and flat.startswith("--"):
        flag = flat.split(":", 1)[0]
        return f"{flag}: {rejected.group(1)}: {rejected.group(2).strip()}"
    return flat


def lightning_cli(args: Sequence[str], run: bool = True) -> Any:
    """The LightningCLI behind the training commands and config loading elsewhere.

    Parse errors raise :class:`ConfigError` instead of printing the whole usage and exiting,
    so the command line can report them in one line.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    class DeployLightningCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as exc:  # the user's classes decide what a bad argument raises
                raise ConfigError(
                    f"--config: building the model, data, trainer or callbacks failed with "
                    f"{type(exc).__name__}: {one_line(exc)}") from exc

    quiet = {"exit_on_error": False}
    parser_kwargs: dict[str, Any] = dict(quiet)
    parser_kwargs.update({name: dict(quiet) for name in LIGHTNING_COMMANDS})
    with warnings.catch_warnings():
        # args is always passed explicitly, also from the console script.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return DeployLightningCLI(
                pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                subclass_mode_data=True, args=list(args), run=run,
                save_config_kwargs={"overwrite": True}, parser_kwargs=parser_kwargs)
        except _parse_errors() as exc:
            raise ConfigError(one_line(exc)) from exc


def _parse_errors() -> tuple[type[BaseException], ...]:
    import argparse

    from jsonargparse import ArgumentError as JsonArgumentError

    return (argparse.ArgumentError, JsonArgumentError)


def load_config(configs: Sequence[str]) -> tuple[Any, Any, Any]:
    """(LightningModule, its first DeployCallback or None, DataModule or None) from configs.

    The configs are fit configs (as given to ``deployplug fit``), later files overriding
    earlier ones. Nothing is trained; the Trainer is built only to read its callbacks.
    """
    from deployplug.callback import DeployCallback

    for path in configs:
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file")
    args: list[str] = []
    for path in configs:
        args += ["--config", str(path)]
    with _quiet_lightning():  # no "GPU available" banner for a Trainer that never runs
        cli = lightning_cli(args, run=False)
    callback = next((cb for cb in cli.trainer.callbacks if isinstance(cb, DeployCallback)), None)
    return cli.model, callback, getattr(cli, "datamodule", None)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info messages (seed, accelerators, tips) off for the duration."""
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------- checkpoints

def saved_class_path(ckpt: Mapping[str, Any], key: str = "hyper_parameters") -> str | None:
    """The ``_class_path`` LightningCLI stored beside the init arguments, if any."""
    hparams = ckpt.get(key)
    value = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    return value if isinstance(value, str) else None


def module_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path) -> Any:
    """The LightningModule the checkpoint's stored hyperparameters describe.

    Checkpoints written by LightningCLI name their class; older ones (and plain
    ``save_hyperparameters`` users of ClassifierModule) are ClassifierModule checkpoints.
    """
    import pytorch_lightning as pl

    from deployplug.checkpoint_io import hyperparameters

    hparams = hyperparameters(ckpt, path)
    class_path = saved_class_path(ckpt)
    if class_path is None:
        from deployplug.lit import ClassifierModule

        try:
            return ClassifierModule(**hparams)
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointLoadError(
                f"checkpoint {path} names no LightningModule class and its hyperparameters do "
                f"not build a ClassifierModule ({type(exc).__name__}: {one_line(exc)}); pass "
                "the fit config it was trained with: --config") from exc
    return _instantiate(class_path, hparams, pl.LightningModule, path, "model")


def datamodule_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path) -> Any | None:
    """The LightningDataModule a LightningCLI checkpoint describes, or None."""
    import pytorch_lightning as pl

    from deployplug.checkpoint_io import hyperparameters

    key = "datamodule_hyper_parameters"
    class_path = saved_class_path(ckpt, key)
    if class_path is None:
        return None
    hparams = hyperparameters(ckpt, path, key=key)
    return _instantiate(class_path, hparams, pl.LightningDataModule, path, "data")


def _instantiate(class_path: str, hparams: dict[str, Any], base: type, path: str | Path,
                 what: str) -> Any:
    from pytorch_lightning.cli import instantiate_module

    hint = f"pass the fit config it was trained with (--config) to name the {what} class"
    top = class_path.split(".")[0]
    if not _DOTTED.fullmatch(class_path) or top in sys.stdlib_module_names:
        raise CheckpointLoadError(f"checkpoint {path} names {class_path!r} as its {what} "
                                  f"class, which is not a {base.__name__}; {hint}")
    try:
        return instantiate_module(base, {"_class_path": class_path, **hparams})
    except Exception as exc:  # jsonargparse and the class itself raise many kinds
        raise CheckpointLoadError(
            f"checkpoint {path}: building its {what} class {class_path} failed "
            f"({type(exc).__name__}: {one_line(exc)}); {hint}, and make the class importable "
            "(installed, or on PYTHONPATH)") from exc
