"""DeployCallback: pre-flight at fit start; export and verification at fit end and per checkpoint.

The callback is a thin shell over :func:`deployplug.pipeline.export`. This module holds the
callback and its Lightning hooks; the rules it follows live in modules of their own, shared
with the command line:

* what to export (:mod:`deployplug.export_subject`): what ``pl_module(x)`` computes, on a CPU
  float32 eval copy of the LightningModule; the training module keeps its branches and
  BatchNorms and stays resumable, and every artifact is verified against that forward;
* the example input and real validation inputs (:mod:`deployplug.examples`), the settings,
  pre-flight and export steps (:mod:`deployplug.deploy_steps`), validation parity for every
  format (:mod:`deployplug.parity`);
* when: after fit (in ``teardown``, so after every callback's and the module's ``on_fit_end``:
  weights that an EMA callback swaps in at fit end are the ones exported, whatever the callback
  order) and, optionally, whenever the content of ModelCheckpoint's best checkpoint changes;
* where: ``<run dir>/<folder>/<tag>/`` beside the ``checkpoints`` folder, checked to be
  writable before training starts (:mod:`deployplug.export_folders`);
* who: global rank zero exports; the other ranks wait for its verdict on a dedicated gloo
  group whose timeout outlasts the export (:mod:`deployplug.rank_sync`);
* how results surface: metrics to every logger, export folders to the trackers that store
  artifacts when asked (:mod:`deployplug.logger_artifacts`), failures as a warning naming the
  report and the ``.failed`` directory by default (training results are never lost to a
  failed export), or an exception with ``fail_on_error``.
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
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from deployplug import parity
from deployplug.checkpoint_io import load_checkpoint_into, load_weights, strip_prefix
from deployplug.deploy_steps import (
    DeploySettings,
    export_subject,
    preflight_reports,
    target_for,
)
from deployplug.errors import ConfigError, DeployError, ParityError, VerificationError
from deployplug.examples import (
    Example,
    example_shapes,
    expected_shape_text,
    make_example,
    probe_forward,
    validation_samples,
)
from deployplug.export_folders import (
    FINAL_TAG,
    checkpoint_tag,
    owned_export,
    passed_export_of,
    require_writable_folder,
)
from deployplug.export_subject import ExportSubject, lightning_copy, resolve_subject
from deployplug.int8_data import train_loader
from deployplug.logger_artifacts import ArtifactLogging, LogMode
from deployplug.parity import onnx_parity
from deployplug.rank_sync import ExportSync
from deployplug.trainer_views import (
    best_checkpoint_key,
    is_fast_dev_run,
    trainer_callbacks,
    validation_loader,
)

# Helpers that used to live here stay importable from this module.
__all__ = ["DeployCallback", "example_shapes", "expected_shape_text", "load_checkpoint_into",
           "make_example", "onnx_parity", "preflight_reports", "probe_forward", "strip_prefix",
           "validation_samples"]

EXPORT_TRIGGERS = ("fit_end", "best_checkpoint")
PREFLIGHT_MODES = ("error", "warn", "off")
DEFAULT_EXPORT_TIMEOUT_S = 4 * 3600.0


class DeployCallback(Callback):
    """Fuse, export and verify what the LightningModule computes, without touching it.

    Args:
        formats: artifact formats to write (``onnx``, ``caffe``, ``msnhnet``); one name or a
            list.
        target: a target profile refining one format (``om`` for the Caffe files).
        input_shape: example input shape, batch dim included; defaults to the shape of the
            LightningModule's ``example_input_array``.
        dirpath: folder holding one sub-folder per export; defaults to ``<run dir>/<folder>``
            beside the ``checkpoints`` folder.
        folder: name of that default folder; give each DeployCallback of a run its own.
        export_on: ``fit_end`` and/or ``best_checkpoint`` (export whenever the content of
            ModelCheckpoint's best checkpoint changes, from that checkpoint's weights).
        verify: run each artifact in its runtime and compare with the LightningModule's
            forward.
        validation_parity: after the final export, run every exported format in its runtime
            over the validation set and log, per format, the worst normalized error and, for
            ``(batch, classes)`` outputs, top-1 agreement with PyTorch and accuracy
            (``<prefix>/<format>/val_agreement``, ``.../val_acc``, ``.../val_max_error``).
        parity_batches: validation batches the parity run reads; ``None`` reads them all.
        fail_on_error: raise when an export or verification fails (after the checkpoints are
            saved) instead of warning.
        preflight: at fit start, check what will be exported and that every format can take
            it: ``error`` stops before the first training step, ``warn`` only reports,
            ``off`` skips the check (the output folder is checked in every mode).
        tolerance: largest normalized error accepted by verification.
        onnx_dynamo: use the dynamo-based ONNX exporter instead of the TorchScript one.
        opset: ONNX opset version.
        dynamic_batch: export ONNX with a dynamic batch dimension (always on with
            ``validation_parity``).
        module_attr: what to export. ``None`` (default): the LightningModule's forward, or
            its ``net`` when that reproduces the forward exactly. ``""``: always the whole
            forward. A (dotted) attribute name: that submodule, which must reproduce the
            forward unless ``accept_submodule_mismatch``.
        accept_submodule_mismatch: export the named submodule even though it computes
            something other than the forward; its artifacts are then verified against the
            submodule itself, and ``validation_parity`` is refused.
        reparameterize: fuse branches and BatchNorms before export (``False`` exports the
            training form, e.g. for a BatchNorm without running statistics).
        metric_prefix: prefix of every logged key; defaults to ``folder``, so two callbacks
            of one run never log the same keys.
        trust_checkpoint: read checkpoints with full unpickling (can run code from the file)
            for checkpoint-time exports; only for checkpoints holding custom objects.
        export_timeout: seconds the other DDP ranks wait for rank zero's export.
        validation_samples: real validation inputs (of the example's shape) added to the
            verification samples; ``0`` uses the example and random inputs only.
        log_artifacts: upload export folders to the loggers that store artifacts (MLflow,
            W&B; TensorBoard gets the summary as text), like their ``log_model``: ``False``
            never, ``True`` at the end of training, ``"all"`` as soon as each export lands.
        int8: settings of the ``onnx_int8`` format (put it in ``formats``): the fields of
            :class:`deployplug.Int8Options` except the data, e.g. ``{"weights":
            "per_tensor", "repair": "auto", "max_drop": 0.01, "calibration_samples": 256}``.
            Training batches calibrate, validation batches (with their labels) judge; the
            verdict is logged as ``<prefix>/onnx_int8/val_acc``, ``.../val_agreement``.
    """

    def __init__(self, formats: str | Sequence[str] = ("onnx",), target: str | None = None,
                 input_shape: Sequence[int] | None = None, dirpath: str | None = None,
                 folder: str = "deploy",
                 export_on: str | Sequence[Literal["fit_end", "best_checkpoint"]] = ("fit_end",),
                 verify: bool = True,
                 validation_parity: bool = False, fail_on_error: bool = False,
                 preflight: Literal["error", "warn", "off"] = "error", tolerance: float = 1e-5,
                 onnx_dynamo: bool = False, opset: int = 17, dynamic_batch: bool = False,
                 module_attr: str | None = None, accept_submodule_mismatch: bool = False,
                 reparameterize: bool = True, metric_prefix: str | None = None,
                 trust_checkpoint: bool = False,
                 export_timeout: float = DEFAULT_EXPORT_TIMEOUT_S,
                 validation_samples: int = 2, parity_batches: int | None = None,
                 log_artifacts: bool | Literal["all"] = False,
                 int8: dict[str, Any] | None = None):
        super().__init__()
        self.formats = (formats,) if isinstance(formats, str) else tuple(formats)
        if not self.formats:
            raise ConfigError("DeployCallback needs at least one format")
        triggers: tuple[str, ...] = (export_on,) if isinstance(export_on, str) \
            else tuple(export_on)
        bad = [t for t in triggers if t not in EXPORT_TRIGGERS]
        if bad:
            raise ConfigError(f"unknown export_on value(s) {bad}; choose from {EXPORT_TRIGGERS}")
        if preflight not in PREFLIGHT_MODES:
            raise ConfigError(f"preflight must be one of {PREFLIGHT_MODES}, got {preflight!r}")
        if validation_parity and accept_submodule_mismatch:
            raise ConfigError("validation_parity measures the LightningModule's predictions; with "
                              "accept_submodule_mismatch the artifact computes something else")
        if input_shape is not None and (not input_shape or any(int(d) < 1 for d in input_shape)):
            raise ConfigError(f"input_shape must be positive sizes (batch first), got "
                              f"{list(input_shape)}")
        if not folder or Path(folder).name != folder:
            raise ConfigError(f"folder must be a plain folder name, got {folder!r}")
        prefix = folder if metric_prefix is None else metric_prefix.strip("/")
        if not prefix:
            raise ConfigError(f"metric_prefix must be a non-empty name, got {metric_prefix!r}")
        if validation_samples < 0:
            raise ConfigError(f"validation_samples must be >= 0, got {validation_samples}")
        if parity_batches is not None and parity_batches < 1:
            raise ConfigError(f"parity_batches must be None (all) or >= 1, got {parity_batches}")
        self.int8 = _int8_settings(int8, self.formats)
        self._wants_int8 = bool(_int8_formats(self.formats))
        self.target = target
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.dirpath = dirpath
        self.folder = folder
        self.export_on = triggers
        self.verify = verify
        self.validation_parity = validation_parity
        self.fail_on_error = fail_on_error
        self.preflight = preflight
        self.tolerance = tolerance
        self.onnx_dynamo = onnx_dynamo
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.module_attr = module_attr
        self.accept_submodule_mismatch = accept_submodule_mismatch
        self.reparameterize = reparameterize
        self.metric_prefix = prefix
        self.trust_checkpoint = trust_checkpoint
        self.export_timeout = float(export_timeout)
        self.validation_samples = int(validation_samples)
        self.parity_batches = None if parity_batches is None else int(parity_batches)
        self._artifacts = ArtifactLogging(log_artifacts, folder)
        self.log_artifacts: LogMode = self._artifacts.mode
        self._sync = ExportSync(self.export_timeout)
        # Persistent state (see state_dict): what was exported, and the best checkpoint seen.
        self.exports: dict[str, dict[str, Any]] = {}
        self.last_exported_best: str | None = None
        self.best_key: list[Any] | None = None
        # Per-fit state, resolved in on_fit_start on every rank.
        self._root: Path | None = None
        self._shapes: list[tuple[int, ...]] | None = None
        self._final_pending = False
        self._final_loader: Any = None
        self._train_loader: Any = None
        self._accept_loaded_state = True

    @property
    def state_key(self) -> str:
        return self._generate_state_key(formats=self.formats, target=self.target,
                                        dirpath=self.dirpath, folder=self.folder)

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._sync.open()  # collective: every rank runs setup, in the same order

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint resolves its dirpath in its own setup, which runs after ours, so
        # the output folder is decided here; trainer.log_dir is collective: every rank asks.
        self._root = self._resolve_root(trainer)
        self._final_pending = False
        for other in trainer_callbacks(trainer):
            if not isinstance(other, DeployCallback) or other is self:
                continue
            if other._resolve_root(trainer) == self._root:
                raise ConfigError(
                    f"two DeployCallbacks would write to {self._root}; give each its own "
                    "folder (or dirpath)")
            if other.metric_prefix == self.metric_prefix:
                raise ConfigError(
                    f"two DeployCallbacks would log under '{self.metric_prefix}/'; give each "
                    "its own metric_prefix (or folder)")
        self._shapes = example_shapes(self.input_shape,
                                      getattr(pl_module, "example_input_array", None))
        if self.target and all(target_for(f, self.target) != self.target for f in self.formats):
            # get_target already raised for an unknown name; this one is known but unused.
            rank_zero_warn(f"DeployCallback: target {self.target!r} applies to none of the "
                           f"formats {list(self.formats)}; each format uses its own profile")
        if "best_checkpoint" in self.export_on and trainer.checkpoint_callback is None:
            rank_zero_warn("DeployCallback(export_on=[..., 'best_checkpoint']) needs a "
                           "ModelCheckpoint callback; only fit-end exports will happen")
        self._refuse_unwritable_output(trainer)
        if self.preflight == "off":
            return
        error: BaseException | None = None
        if trainer.is_global_zero:
            with torch.random.fork_rng(devices=[]):  # leave training's random stream alone
                error = self._preflight(pl_module)
        message = self._broadcast(trainer, None if error is None else str(error))
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
        if is_fast_dev_run(trainer):
            rank_zero_info("DeployCallback: fast_dev_run, no artifacts written")
            return
        # The export itself waits for teardown, which runs after every callback's (and the
        # module's) on_fit_end: an averaging callback that installs its weights there, listed
        # before or after this one, is then already done. The validation loader is taken now,
        # before the datamodule's own teardown may release its data.
        self._final_pending = True
        if trainer.is_global_zero and (self.validation_parity or self.validation_samples
                                       or self._wants_int8):
            self._final_loader = validation_loader(trainer)
        if trainer.is_global_zero and self._wants_int8:
            self._train_loader = train_loader(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._accept_loaded_state = True  # a test/validate restore that had no state for us
        if stage != TrainerFn.FITTING:
            return
        try:
            if self._final_pending:
                self._final_pending = False
                if "best_checkpoint" in self.export_on:
                    self._maybe_export_best(trainer, pl_module)
                if "fit_end" in self.export_on:
                    self._collective(trainer, lambda: self._export_final(trainer, pl_module))
                if trainer.is_global_zero:
                    best = self.last_exported_best
                    self._artifacts.fit_end(trainer, self.exports,
                                            None if best is None else checkpoint_tag(best))
        finally:
            self._final_loader = None
            self._sync.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._final_pending = False
        self._final_loader = None
        self._sync.close()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning restores callback state for test/validate/predict too; only resuming a fit
        # continues this callback's record (testing the best checkpoint must not roll back
        # the exports of the run that just finished).
        self._accept_loaded_state = trainer.state.fn == TrainerFn.FITTING

    def state_dict(self) -> dict[str, Any]:
        return {"exports": copy.deepcopy(self.exports),
                "last_exported_best": self.last_exported_best,
                "best_key": None if self.best_key is None else list(self.best_key)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        accept, self._accept_loaded_state = self._accept_loaded_state, True
        if not accept:
            return
        self.exports = dict(state_dict.get("exports", {}))
        self.last_exported_best = state_dict.get("last_exported_best")
        key = state_dict.get("best_key")
        self.best_key = None if key is None else list(key)

    # ----------------------------------------------------------------- steps

    def _resolve_root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        ckpt_dir = getattr(ckpt, "dirpath", None)
        if ckpt_dir:
            return Path(ckpt_dir).parent / self.folder
        return Path(trainer.log_dir or trainer.default_root_dir) / self.folder

    def _broadcast(self, trainer: pl.Trainer, obj: Any) -> Any:
        return self._sync.broadcast(obj, fallback=trainer.strategy.broadcast)

    def _refuse_unwritable_output(self, trainer: pl.Trainer) -> None:
        """Stop before training when the fit-end export could not be written."""
        from deployplug.outdir import check_output_dir
        from deployplug.pipeline import failed_path

        assert self._root is not None
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                require_writable_folder(self._root)
                if "fit_end" in self.export_on:
                    check_output_dir(self._root / FINAL_TAG)
                    check_output_dir(failed_path(self._root / FINAL_TAG))
            except DeployError as exc:
                error = exc
        message = self._broadcast(trainer, None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise DeployError(message)

    def _example(self) -> Example:
        assert self._shapes is not None, "on_fit_start resolves the example shape"
        return make_example(self._shapes)

    def _settings(self) -> DeploySettings:
        return DeploySettings.from_object(self)

    def _subject(self, lit: nn.Module, samples: Sequence[Example]) -> ExportSubject:
        expected = expected_shape_text(lit, getattr(lit, "net", None))
        probe_forward(lit, samples[0], expected)
        return resolve_subject(lit, samples, self.module_attr, self.accept_submodule_mismatch)

    def _preflight(self, pl_module: pl.LightningModule) -> BaseException | None:
        """Rank-zero pre-flight; returns the failure instead of raising (it is broadcast)."""
        try:
            example = self._example()
            subject = self._subject(lightning_copy(pl_module), [example])
            rank_zero_info(f"DeployCallback pre-flight: exporting {subject.name}")
            failed = []
            for fmt, target, report in preflight_reports(
                    subject.model, example, self.formats, self.target, self.reparameterize,
                    self._settings().onnx_options()):
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
        # The broadcast doubles as the barrier that keeps other ranks from racing ahead; it
        # runs on the export group, whose timeout outlasts the export.
        message = self._broadcast(trainer, None if error is None else _describe(error))
        if message is None:
            return
        if not self.fail_on_error:
            rank_zero_warn(f"DeployCallback: {message}. Training finished and the checkpoints "
                           "are intact; fix the cause and export one with `deployplug export "
                           "--checkpoint CKPT --config <the fit config(s) of this run>`.")
            return
        if error is not None:
            raise error
        raise DeployError(message)

    def _export_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lit = lightning_copy(pl_module)
        example = self._example()
        assert self._shapes is not None
        real = validation_samples(self._final_loader, self._shapes, self.validation_samples)
        if self.validation_samples and self._final_loader is not None and not real:
            rank_zero_warn("DeployCallback: no validation batch matches the example shape "
                           f"{self._shapes}; verifying on the example and random inputs only")
        subject = self._subject(lit, [example, *real])
        manifest = self._export(trainer, subject, FINAL_TAG, example, real,
                                {"epoch": trainer.current_epoch,
                                 "global_step": trainer.global_step},
                                int8_data=self._int8_data(self._train_loader,
                                                          self._final_loader))
        if self.validation_parity:
            self._parity(trainer, subject, manifest)

    def _maybe_export_best(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or is_fast_dev_run(trainer) or trainer.state.fn != "fit":
            return
        # Rank zero's view decides, so ranks that track an unsynced metric cannot diverge
        # into a collective that only some of them enter.
        mine = best_checkpoint_key(trainer) if trainer.is_global_zero else None
        key = self._broadcast(trainer, mine)
        if key is None or key == self.best_key:
            if trainer.is_global_zero:
                self._prune_deleted()
            return
        self.best_key = list(key)
        best = str(key[0])
        self.last_exported_best = best

        def work() -> None:
            self._prune_deleted()
            lit = lightning_copy(pl_module)
            info = load_weights(lit, best, "", trust_checkpoint=self.trust_checkpoint)
            tag = checkpoint_tag(best)
            if self._already_exported(tag, info.sha256):
                rank_zero_info(f"DeployCallback: {best} is already exported in {self._root}/{tag}")
                return
            example = self._example()
            assert self._shapes is not None
            real = validation_samples(validation_loader(trainer), self._shapes,
                                      self.validation_samples)
            subject = self._subject(lit, [example, *real])
            data = self._int8_data(train_loader(trainer), validation_loader(trainer)) \
                if self._wants_int8 else None
            self._export(trainer, subject, tag, example, real, info.metadata(), source=best,
                         int8_data=data)

        self._collective(trainer, work)

    def _already_exported(self, tag: str, sha256: str) -> bool:
        """Whether ``tag`` holds a passed export of exactly this checkpoint content.

        Read from the folder's manifest, not from this callback's state: the state saved in a
        checkpoint predates the export of that very checkpoint, so a resumed run would
        otherwise export an unchanged best checkpoint again.
        """
        assert self._root is not None
        manifest = passed_export_of(self._root / tag, tag, sha256)
        if manifest is None:
            return False
        extra = manifest.get("extra") or {}
        self.exports.setdefault(tag, {
            "dir": str(self._root / tag), "passed": True, "formats": list(manifest.get(
                "formats") or {}), "target": self.target, "source": extra.get("source_checkpoint"),
            "checkpoint_sha256": sha256, "epoch": extra.get("epoch"),
            "global_step": extra.get("global_step"),
            "exported_module": extra.get("exported_module"), "metrics": {}})
        return True

    def _prune_deleted(self) -> None:
        """Drop checkpoint-time exports whose checkpoint ModelCheckpoint has deleted.

        The deploy folder then mirrors the checkpoints instead of outliving them. A folder is
        removed only when its manifest says this callback wrote it from that checkpoint and
        it holds nothing but the files that manifest lists.
        """
        from deployplug.pipeline import failed_path

        for tag, info in list(self.exports.items()):
            source = info.get("source")
            if not source or Path(source).exists():
                continue
            folder = Path(info["dir"])
            for candidate in (folder, failed_path(folder)):
                if owned_export(candidate, source, tag):
                    shutil.rmtree(candidate)
                elif candidate.exists():
                    rank_zero_warn(f"DeployCallback: left {candidate} in place: it holds files "
                                   "this callback did not write")
            del self.exports[tag]

    def _export(self, trainer: pl.Trainer, subject: ExportSubject, tag: str, example: Example,
                real: Sequence[Example], metadata: dict[str, Any],
                source: str | None = None, int8_data: Any = None) -> Any:
        assert self._root is not None, "on_fit_start resolves the output folder"
        out_dir = self._root / tag
        extra = {"tag": tag, "source_checkpoint": source, **metadata}
        record: dict[str, Any] = {
            "dir": str(out_dir), "passed": False, "formats": list(self.formats),
            "target": self.target, "source": source,
            "checkpoint_sha256": metadata.get("checkpoint_sha256"),
            "epoch": metadata.get("epoch"), "global_step": metadata.get("global_step"),
            "exported_module": subject.name, "metrics": {}}
        prefix = self.metric_prefix if tag == FINAL_TAG else f"{self.metric_prefix}/best"
        try:
            manifest = export_subject(subject, example, real, out_dir, self._settings(), extra,
                                      int8_data)
        except DeployError as exc:
            self._record_failure(trainer, tag, record, exc, prefix)
            raise
        rank_zero_info(f"DeployCallback export '{tag}' ({subject.name}) -> {manifest.dir}\n"
                       f"{manifest}")
        metrics = manifest.metrics(prefix=prefix)
        self._log(trainer, metrics)
        record.update(dir=str(manifest.dir), passed=bool(manifest.passed),
                      metrics={k: float(v) for k, v in metrics.items()})
        self.exports[tag] = record
        if manifest.passed:
            self._artifacts.landed(trainer, tag, manifest, best=tag != FINAL_TAG)
        return manifest

    def _int8_data(self, train: Any, val: Any) -> Any:
        """The run's calibration and evaluation batches, when ``onnx_int8`` is exported."""
        if not self._wants_int8:
            return None
        from deployplug.int8_data import gather

        assert self._shapes is not None
        return gather(train, val, self._shapes, self.int8)

    def _record_failure(self, trainer: pl.Trainer, tag: str, record: dict[str, Any],
                        exc: DeployError, prefix: str) -> None:
        """Keep what landed and where the failed files are, and log the failed numbers."""
        landed = getattr(exc, "manifest", None)
        failed_dir = getattr(exc, "failed_dir", None)
        metrics = dict(landed.metrics(prefix=prefix)) if landed is not None else {}
        report = getattr(exc, "report", None)
        if isinstance(exc, VerificationError) and report is not None:
            for fmt in report.formats():
                metrics[f"{prefix}/{fmt}/max_error"] = float(report.max_error(fmt))
                metrics[f"{prefix}/{fmt}/passed"] = 0.0
        if metrics:
            self._log(trainer, metrics)
        record.update(
            dir=str(landed.dir) if landed is not None else None,
            failed_dir=str(failed_dir) if failed_dir is not None and Path(failed_dir).exists()
            else None,
            landed_formats=list(landed.formats) if landed is not None else [],
            metrics={k: float(v) for k, v in metrics.items()})
        self.exports[tag] = record

    def _parity(self, trainer: pl.Trainer, subject: ExportSubject, manifest: Any) -> None:
        """Every landed format over the validation set; numbers to the loggers."""
        loader = self._final_loader
        if loader is None:
            rank_zero_warn("DeployCallback: validation_parity is on but there is no validation "
                           "dataloader; skipped")
            return
        try:
            result = parity.validation_parity(manifest, subject.reference, loader,
                                              max_batches=self.parity_batches)
        except Exception as exc:
            raise ParityError(
                f"{' '.join(str(exc).split())}. The artifacts themselves are exported and "
                "verified; set validation_parity=False to skip this measurement") from exc
        metrics = result.metrics(self.metric_prefix)
        self._log(trainer, metrics)
        self.exports[FINAL_TAG]["metrics"].update(metrics)
        parity.record_parity(manifest, result)
        rank_zero_info(f"DeployCallback {result}")

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        # self.log is not allowed in on_fit_end/teardown; loggers are still open, so go to
        # them directly.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


# --------------------------------------------------------------------------- helpers

def _int8_formats(formats: Sequence[str]) -> list[str]:
    """The int8 formats among ``formats`` (unknown names are left to pre-flight to report)."""
    from deployplug.exporters import formats as known
    from deployplug.exporters import statistical_formats

    return statistical_formats(f for f in formats if f in known())


def _int8_settings(int8: dict[str, Any] | None, formats: Sequence[str]) -> dict[str, Any] | None:
    """The ``int8`` mapping, checked now (a typo fails at construction, not after training).

    Its batches come from the run (training batches calibrate, validation batches judge),
    so the data fields of ``Int8Options`` are refused here.
    """
    if int8 is None:
        return None
    if not _int8_formats(formats):
        raise ConfigError("int8= configures the int8 format (onnx_int8); add it to formats")
    from deployplug.quant.options import Int8Options

    given = dict(int8)
    data = sorted({"eval_inputs", "eval_labels"} & set(given))
    if data:
        raise ConfigError(f"DeployCallback(int8=...) takes no {data}: the callback judges int8 "
                          "on the validation dataloader and calibrates on training batches")
    Int8Options.coerce(given)
    return given

def _describe(error: BaseException) -> str:
    """One paragraph for the warning (or the other ranks' exception) about a failure."""
    failed_dir = getattr(error, "failed_dir", None)
    where = f"; the failed files are in {failed_dir}" if failed_dir is not None else ""
    landed = getattr(error, "manifest", None)
    if landed is not None:
        where += f"; formats that passed are in {landed.dir}"
    if isinstance(error, ParityError):
        return f"validation parity failed with ParityError: {error}"
    if isinstance(error, VerificationError):
        return f"export verification failed with VerificationError: {error}{where}"
    return f"deployment export failed with {type(error).__name__}: {error}{where}"
