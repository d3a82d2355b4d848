"""DeployCallback: pre-flight at fit start; export and verification at fit end and per checkpoint.

The callback is a thin shell over :func:`deployplug.pipeline.export`. Its job is the Lightning
plumbing the pipeline must not know about:

* which network to export: a CPU float32 eval *copy* of the LightningModule's network (``net``
  by default), so the training module keeps its branches and BatchNorms and stays resumable;
* when: ``on_fit_end`` (the model is unwrapped, on CPU, with final weights and the last
  checkpoint already written) and, optionally, whenever ModelCheckpoint's best path changes;
* where: ``<run dir>/deploy/<tag>/`` beside the ``checkpoints`` folder;
* who: global rank zero exports, the outcome is broadcast so every rank agrees on failures;
* how failures surface: a warning by default (training results are never lost to a failed
  export), or an exception with ``fail_on_error``.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from deployplug.errors import DeployError, VerificationError
from deployplug.pipeline import deploy_copy

EXPORT_TRIGGERS = ("fit_end", "best_checkpoint")
PREFLIGHT_MODES = ("error", "warn", "off")
Example = torch.Tensor | tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------- building blocks

def resolve_network(pl_module: nn.Module, module_attr: str | None = None) -> tuple[nn.Module, str]:
    """The module to export and its attribute prefix in the LightningModule's ``state_dict``.

    ``module_attr`` names the attribute explicitly; otherwise a ``net`` attribute holding an
    ``nn.Module`` is used (the convention of :class:`deployplug.lit.ClassifierModule`), and
    failing that the LightningModule itself (prefix ``""``).
    """
    if module_attr:
        net = getattr(pl_module, module_attr, None)
        if not isinstance(net, nn.Module):
            raise AttributeError(
                f"{type(pl_module).__name__} has no nn.Module attribute '{module_attr}'")
        return net, module_attr
    net = getattr(pl_module, "net", None)
    if isinstance(net, nn.Module):
        return net, "net"
    return pl_module, ""


def strip_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a LightningModule ``state_dict`` that belong to attribute ``prefix``."""
    if not prefix:
        return dict(state_dict)
    head = prefix + "."
    return {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}


def load_checkpoint_into(network: nn.Module, ckpt_path: str | Path, prefix: str) -> nn.Module:
    """Load a Lightning checkpoint's weights for ``prefix`` into ``network`` (strictly)."""
    # The checkpoint holds hyperparameters and loop state besides tensors, so a weights-only
    # unpickler would refuse files Lightning itself wrote.
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    weights = strip_prefix(state, prefix)
    if not weights:
        raise KeyError(f"checkpoint {ckpt_path} has no weights under '{prefix}.'")
    network.load_state_dict(weights, strict=True)
    return network


def example_shapes(input_shape: Sequence[int] | None,
                   example_input_array: Any) -> list[tuple[int, ...]]:
    """Input shapes (batch dim included): the configured one, else the module's example."""
    if input_shape is not None:
        return [tuple(int(d) for d in input_shape)]
    if isinstance(example_input_array, torch.Tensor):
        return [tuple(example_input_array.shape)]
    if isinstance(example_input_array, (tuple, list)) and example_input_array and all(
            isinstance(t, torch.Tensor) for t in example_input_array):
        return [tuple(t.shape) for t in example_input_array]
    raise ValueError(
        "DeployCallback needs the shape of an example input: pass input_shape (batch dim "
        "included, e.g. [1, 3, 224, 224]) or set example_input_array on the LightningModule")


def make_example(shapes: Sequence[Sequence[int]], seed: int = 0) -> Example:
    """Seeded standard-normal inputs: zeros would hide wrong weights behind the biases."""
    gen = torch.Generator().manual_seed(seed)
    tensors = tuple(torch.randn(*s, generator=gen) for s in shapes)
    return tensors[0] if len(tensors) == 1 else tensors


def probe_forward(network: nn.Module, example: Example, expected: str | None = None) -> None:
    """Run one forward pass; a mismatch names the given shape and what the model expects."""
    from deployplug.pipeline import as_input_tuple, check_runs

    hint = (f"The model expects {expected}. " if expected else "") + (
        "Set DeployCallback(input_shape=...) to the shape the network takes.")
    check_runs(network, as_input_tuple(example), hint=hint)


def expected_shape_text(pl_module: nn.Module, network: nn.Module) -> str | None:
    """What the model says its input looks like, for error messages."""
    parts = []
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        parts.append(f"{tuple(example.shape)} (example_input_array)")
    default = getattr(network, "default_input_shape", None)
    if default is not None:
        parts.append(f"{tuple(default)} (default_input_shape)")
    return " or ".join(parts) or None


def target_for(fmt: str, target: str | None) -> str:
    """The target profile checked for ``fmt``: ``target`` when that format takes it."""
    from deployplug.pipeline import resolve_target

    return resolve_target(fmt, target).name


def preflight_reports(network: nn.Module, example: Example, formats: Sequence[str],
                      target: str | None) -> list[tuple[str, str, Any]]:
    """``(format, target, CompatReport)`` for every requested format, without writing files.

    The fused network is checked, since that is what gets exported (fusing also fails fast
    on a BatchNorm without running statistics).
    """
    from deployplug.preflight import check
    from deployplug.reparam import reparameterize

    network = reparameterize(network)
    return [(fmt, target_for(fmt, target), check(network, example, target_for(fmt, target)))
            for fmt in formats]


def onnx_parity(onnx_path: str | Path, network: nn.Module, loader: Any) -> dict[str, float]:
    """Top-1 agreement of the ONNX model with PyTorch, and both accuracies, over ``loader``.

    A session whose batch dimension is fixed is fed in chunks of that size (the last chunk
    zero-padded), so static exports can be evaluated too.
    """
    import numpy as np
    import onnxruntime as ort
    from torchmetrics.functional.classification import multiclass_accuracy

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    fixed = feed.shape[0] if isinstance(feed.shape[0], int) and feed.shape[0] > 0 else None
    torch_logits, onnx_logits, labels = [], [], []
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = x.detach().to("cpu", torch.float32)
        with torch.no_grad():
            torch_logits.append(network(x))
        arr = x.numpy()
        step = fixed or len(arr)
        outs = []
        for i in range(0, len(arr), step):
            chunk = arr[i:i + step]
            pad = step - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            outs.append(session.run(None, {feed.name: chunk})[0][:step - pad])
        onnx_logits.append(torch.from_numpy(np.concatenate(outs)))
        if y is not None:
            labels.append(y.detach().cpu())
    if not torch_logits:
        raise ValueError("the validation dataloader is empty")
    t, o = torch.cat(torch_logits), torch.cat(onnx_logits)
    num_classes = t.shape[1]
    metrics = {"deploy/onnx/val_agreement": float(multiclass_accuracy(
        o, t.argmax(1), num_classes=num_classes, average="micro"))}
    if labels:
        y = torch.cat(labels)
        metrics["deploy/onnx/val_acc"] = float(
            multiclass_accuracy(o, y, num_classes=num_classes, average="micro"))
        metrics["deploy/torch/val_acc"] = float(
            multiclass_accuracy(t, y, num_classes=num_classes, average="micro"))
    return metrics


# --------------------------------------------------------------------------- callback

class DeployCallback(Callback):
    """Fuse, export and verify the trained network without touching the training module.

    Args:
        formats: artifact formats to write (``onnx``, ``caffe``, ``msnhnet``).
        target: a target profile refining one format (``om`` for the Caffe files).
        input_shape: example input shape, batch dim included; defaults to the shape of the
            LightningModule's ``example_input_array``.
        dirpath: folder holding one sub-folder per export; defaults to ``<run dir>/<folder>``
            beside the ``checkpoints`` folder.
        folder: name of that default folder; give each DeployCallback of a run its own.
        export_on: ``fit_end`` and/or ``best_checkpoint`` (re-export whenever
            ModelCheckpoint's best checkpoint changes, from that checkpoint's weights).
        verify: run each artifact in its runtime and compare with PyTorch.
        validation_parity: after the final export, run the ONNX model over the validation
            set and log top-1 agreement with PyTorch and both accuracies.
        fail_on_error: raise when an export or verification fails (after the checkpoints are
            saved) instead of warning.
        preflight: at fit start, check that every format can take the model: ``error`` stops
            before the first training step, ``warn`` only reports, ``off`` skips the check.
        tolerance: largest normalized error accepted by verification.
        onnx_dynamo: use the dynamo-based ONNX exporter instead of the TorchScript one.
        opset: ONNX opset version.
        dynamic_batch: export ONNX with a dynamic batch dimension (always on with
            ``validation_parity``).
        module_attr: LightningModule attribute holding the network; default ``net`` if
            present, else the LightningModule itself.
    """

    def __init__(self, formats: Sequence[str] = ("onnx",), target: str | None = None,
                 input_shape: Sequence[int] | None = None, dirpath: str | None = None,
                 folder: str = "deploy",
                 export_on: Sequence[Literal["fit_end", "best_checkpoint"]] = ("fit_end",),
                 verify: bool = True,
                 validation_parity: bool = False, fail_on_error: bool = False,
                 preflight: Literal["error", "warn", "off"] = "error", tolerance: float = 1e-5,
                 onnx_dynamo: bool = False, opset: int = 17, dynamic_batch: bool = False,
                 module_attr: str | None = None):
        super().__init__()
        self.formats = tuple(formats)
        if not self.formats:
            raise ValueError("DeployCallback needs at least one format")
        bad = [t for t in export_on if t not in EXPORT_TRIGGERS]
        if bad:
            raise ValueError(f"unknown export_on value(s) {bad}; choose from {EXPORT_TRIGGERS}")
        if preflight not in PREFLIGHT_MODES:
            raise ValueError(f"preflight must be one of {PREFLIGHT_MODES}, got {preflight!r}")
        if validation_parity and "onnx" not in self.formats:
            raise ValueError("validation_parity runs the ONNX artifact: add 'onnx' to formats")
        if input_shape is not None and (not input_shape or any(int(d) < 1 for d in input_shape)):
            raise ValueError(f"input_shape must be positive sizes (batch first), got "
                             f"{list(input_shape)}")
        self.target = target
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.dirpath = dirpath
        if not folder or Path(folder).name != folder:
            raise ValueError(f"folder must be a plain folder name, got {folder!r}")
        self.folder = folder
        self.export_on = tuple(export_on)
        self.verify = verify
        self.validation_parity = validation_parity
        self.fail_on_error = fail_on_error
        self.preflight = preflight
        self.tolerance = tolerance
        self.onnx_dynamo = onnx_dynamo
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.module_attr = module_attr
        # Persistent state (see state_dict): what was exported, and the last best path seen.
        self.exports: dict[str, dict[str, Any]] = {}
        self.last_exported_best: str | None = None
        # Per-fit state, resolved in on_fit_start on every rank.
        self._root: Path | None = None
        self._shapes: list[tuple[int, ...]] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(formats=self.formats, target=self.target,
                                        dirpath=self.dirpath, folder=self.folder)

    # ----------------------------------------------------------------- Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint resolves its dirpath in its own setup, which runs after ours, so
        # the output folder is decided here; trainer.log_dir is collective: every rank asks.
        self._root = self._resolve_root(trainer)
        for other in trainer.callbacks:
            if isinstance(other, DeployCallback) and other is not self and \
                    other._resolve_root(trainer) == self._root:
                raise ValueError(
                    f"two DeployCallbacks would write to {self._root}; give each its own "
                    "folder (or dirpath)")
        self._shapes = example_shapes(self.input_shape,
                                      getattr(pl_module, "example_input_array", None))
        if self.target and all(target_for(f, self.target) != self.target for f in self.formats):
            # get_target already raised for an unknown name; this one is known but unused.
            rank_zero_warn(f"DeployCallback: target {self.target!r} applies to none of the "
                           f"formats {list(self.formats)}; each format uses its own profile")
        if "best_checkpoint" in self.export_on and trainer.checkpoint_callback is None:
            rank_zero_warn("DeployCallback(export_on=[..., 'best_checkpoint']) needs a "
                           "ModelCheckpoint callback; only fit-end exports will happen")
        if self.preflight == "off":
            return
        error: BaseException | None = None
        if trainer.is_global_zero:
            with torch.random.fork_rng(devices=[]):  # leave training's random stream alone
                error = self._preflight(pl_module)
        message = trainer.strategy.broadcast(None if error is None else str(error), src=0)
        if message is None:
            return
        if self.preflight == "warn":
            rank_zero_warn(f"DeployCallback pre-flight failed (training continues): {message}")
            return
        if error is not None:
            raise error
        raise DeployError(message)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Catches saves from the previous epoch's on_train_epoch_end (ModelCheckpoint's default
        # when validation runs once per epoch), which happen after this callback's own hook.
        if "best_checkpoint" in self.export_on:
            self._maybe_export_best(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Non-monitoring pass: runs after a ModelCheckpoint that saved in on_validation_end.
        if "best_checkpoint" in self.export_on:
            self._maybe_export_best(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            rank_zero_info("DeployCallback: fast_dev_run, no artifacts written")
            return
        if "best_checkpoint" in self.export_on:
            self._maybe_export_best(trainer, pl_module)
        if "fit_end" in self.export_on:
            self._collective(trainer, lambda: self._export_final(trainer, pl_module))

    def state_dict(self) -> dict[str, Any]:
        return {"exports": copy.deepcopy(self.exports),
                "last_exported_best": self.last_exported_best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.exports = dict(state_dict.get("exports", {}))
        self.last_exported_best = state_dict.get("last_exported_best")

    # ----------------------------------------------------------------- steps

    def _resolve_root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        ckpt_dir = getattr(ckpt, "dirpath", None)
        if ckpt_dir:
            return Path(ckpt_dir).parent / self.folder
        return Path(trainer.log_dir or trainer.default_root_dir) / self.folder

    def _network_copy(self, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        network, prefix = resolve_network(pl_module, self.module_attr)
        return deploy_copy(network), prefix

    def _example(self) -> Example:
        assert self._shapes is not None, "on_fit_start resolves the example shape"
        return make_example(self._shapes)

    def _preflight(self, pl_module: pl.LightningModule) -> BaseException | None:
        """Rank-zero pre-flight; returns the failure instead of raising (it is broadcast)."""
        try:
            network, _ = self._network_copy(pl_module)
            example = self._example()
            probe_forward(network, example, expected_shape_text(pl_module, network))
            failed = []
            for fmt, target, report in preflight_reports(network, example, self.formats,
                                                         self.target):
                rank_zero_info(f"DeployCallback pre-flight [{fmt} -> {target}]\n{report}")
                if not report.passed:
                    failed.append(report)
            for report in failed:
                report.raise_if_failed()
        except Exception as exc:
            return exc
        return None

    def _collective(self, trainer: pl.Trainer, work: Any) -> None:
        """Run ``work`` on rank zero, share its failure with every rank, then act on it."""
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                with torch.random.fork_rng(devices=[]):  # exports must not shift training's RNG
                    work()
            except Exception as exc:
                error = exc
        # broadcast doubles as the barrier that keeps other ranks from racing ahead.
        message = trainer.strategy.broadcast(None if error is None else _describe(error), src=0)
        if message is None:
            return
        if not self.fail_on_error:
            rank_zero_warn(f"DeployCallback: {message}. Training finished and the checkpoints "
                           "are intact; fix the cause and export them with `deployplug export`.")
            return
        if error is not None:
            raise error
        raise DeployError(message)

    def _export_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network, _ = self._network_copy(pl_module)
        manifest = self._export(trainer, pl_module, network, "final")
        if self.validation_parity:
            self._parity(trainer, network, manifest)
        self._raise_if_unverified(manifest, "final")

    def _maybe_export_best(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        ckpt = trainer.checkpoint_callback
        # Rank zero's view decides, so ranks that track an unsynced metric cannot diverge
        # into a collective that only some of them enter.
        best = trainer.strategy.broadcast(getattr(ckpt, "best_model_path", "") or "", src=0)
        if not best or best == self.last_exported_best:
            return
        self.last_exported_best = best

        def work() -> None:
            network, prefix = self._network_copy(pl_module)
            load_checkpoint_into(network, best, prefix)
            manifest = self._export(trainer, pl_module, network, Path(best).stem, source=best)
            self._prune_stale(keep=Path(best).stem)
            self._raise_if_unverified(manifest, Path(best).stem)

        self._collective(trainer, work)

    def _prune_stale(self, keep: str) -> None:
        """Drop checkpoint-time exports whose checkpoint ModelCheckpoint has deleted.

        The deploy folder then mirrors the top-k checkpoints instead of growing every epoch.
        Only folders this callback wrote (recorded with their source) are removed.
        """
        for tag, info in list(self.exports.items()):
            source = info.get("source")
            if tag == keep or not source or Path(source).exists():
                continue
            folder = Path(info["dir"])
            if (folder / "manifest.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
            del self.exports[tag]

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                tag: str, source: str | None = None) -> Any:
        from deployplug import pipeline

        assert self._root is not None, "on_fit_start resolves the output folder"
        example = self._example()
        probe_forward(network, example, expected_shape_text(pl_module, network))
        out_dir = self._root / tag
        onnx_options = {"dynamo": self.onnx_dynamo, "opset": self.opset,
                        "dynamic_batch": self.dynamic_batch or self.validation_parity}
        manifest = pipeline.export(network, example, out_dir, formats=self.formats,
                                   target=self.target, verify=self.verify,
                                   tolerance=self.tolerance, onnx_options=onnx_options,
                                   metadata={"tag": tag, "source_checkpoint": source,
                                             "epoch": trainer.current_epoch,
                                             "global_step": trainer.global_step})
        rank_zero_info(f"DeployCallback export '{tag}' -> {manifest.dir}\n{manifest}")
        metrics = dict(manifest.metrics())
        if tag != "final":  # keep per-checkpoint numbers apart from the final ones
            metrics = {k.replace("deploy/", "deploy/best/", 1): v for k, v in metrics.items()}
        self._log(trainer, metrics)
        self.exports[tag] = {"dir": str(manifest.dir), "passed": bool(manifest.passed),
                             "formats": list(self.formats), "target": self.target,
                             "source": source, "step": trainer.global_step,
                             "metrics": {k: float(v) for k, v in manifest.metrics().items()}}
        return manifest

    def _raise_if_unverified(self, manifest: Any, tag: str) -> None:
        if self.verify and not manifest.passed:
            raise VerificationError(manifest.verification)

    def _parity(self, trainer: pl.Trainer, network: nn.Module, manifest: Any) -> None:
        loader = _validation_loader(trainer)
        if loader is None:
            rank_zero_warn("DeployCallback: validation_parity is on but there is no validation "
                           "dataloader; skipped")
            return
        metrics = onnx_parity(manifest.artifact("onnx"), network, loader)
        self._log(trainer, metrics)
        self.exports["final"]["metrics"].update(metrics)
        rank_zero_info("DeployCallback validation parity: " +
                       ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        # self.log is not allowed in on_fit_end; loggers are still open, so go to them directly.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _describe(error: BaseException) -> str:
    return f"deployment export failed with {type(error).__name__}: {error}"


def _validation_loader(trainer: pl.Trainer) -> Any:
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
