"""Export folders sent to the experiment trackers, the way checkpoints are.

Lightning's MLflow and W&B loggers upload ModelCheckpoint's files according to ``log_model``:
``False`` never, ``True`` once at the end of training, ``"all"`` as soon as each is saved.
:class:`ArtifactLogging` does the same with deployplug's export folders (every file the
manifest lists, and the manifest), for the loggers that have an artifact store:

* MLflow: the folder's files under the run's artifact path ``<folder>/<tag>``;
* W&B: a ``model`` artifact named ``<folder>-<run id>``, one version per upload, aliased with
  the tag and ``latest`` (and ``best`` for a best-checkpoint export);
* TensorBoard has no artifact store: the export's summary table and its path are written as
  text (``<folder>/<tag>``), so the run shows what was exported and where the files are.

Any other logger keeps the files where they are (typically inside its run folder). An upload
that fails is a warning, never a failed training run; only exports that passed verification
are uploaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

LogMode = bool | Literal["all"]
LOG_MODES = (False, True, "all")


def check_mode(mode: Any) -> LogMode:
    """``mode`` when it is one of ``False``, ``True`` or ``"all"``; a ConfigError otherwise."""
    if isinstance(mode, bool) or mode == "all":
        return mode
    from deployplug.errors import ConfigError

    raise ConfigError(f"log_artifacts must be False, True or 'all', got {mode!r}")


class ArtifactLogging:
    """Uploads one callback's export folders to the trainer's loggers (global rank zero)."""

    def __init__(self, mode: LogMode, folder: str):
        self.mode = check_mode(mode)
        self.folder = folder
        self._uploaded: dict[str, str] = {}  # tag -> the manifest's creation time uploaded

    def landed(self, trainer: Any, tag: str, manifest: Any, best: bool) -> None:
        """An export landed: upload it now when the mode is ``"all"``."""
        if self.mode == "all":
            self._upload(trainer, tag, manifest, best)

    def fit_end(self, trainer: Any, exports: dict[str, dict[str, Any]], best_tag: str | None
                ) -> None:
        """Training ended: with ``True``, upload every passed export still on disk."""
        if self.mode is not True:
            return
        from deployplug.manifest import load_manifest

        for tag, record in exports.items():
            folder = record.get("dir")
            if not record.get("passed") or not folder or \
                    not Path(folder, "manifest.json").is_file():
                continue
            try:
                manifest = load_manifest(Path(folder))
            except Exception as exc:  # a folder changed under us: say so, do not fail the run
                rank_zero_warn(f"DeployCallback: not uploading {folder}: {exc}")
                continue
            self._upload(trainer, tag, manifest, tag == best_tag)

    def _upload(self, trainer: Any, tag: str, manifest: Any, best: bool) -> None:
        if self._uploaded.get(tag) == manifest.created:
            return
        for logger in trainer.loggers:
            try:
                sent = _send(logger, self.folder, tag, manifest, best, trainer.global_step)
            except Exception as exc:  # a tracker outage must not cost the training run
                rank_zero_warn(f"DeployCallback: uploading {manifest.dir} to "
                               f"{type(logger).__name__} failed ({type(exc).__name__}: {exc}); "
                               "the files are still on disk")
                continue
            if not sent:
                rank_zero_info(f"DeployCallback: {type(logger).__name__} has no artifact store; "
                               f"the export stays in {manifest.dir}")
        self._uploaded[tag] = manifest.created


def _send(logger: Any, folder: str, tag: str, manifest: Any, best: bool, step: int) -> bool:
    """Upload to one logger; False when it has nowhere to put files."""
    from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, MLFlowLogger):
        if logger.run_id is None:  # the run was never started: nothing to attach files to
            return False
        to_mlflow(logger.experiment, logger.run_id, folder, tag, manifest)
    elif isinstance(logger, WandbLogger):
        to_wandb(logger.experiment, folder, tag, manifest, best)
    elif isinstance(logger, TensorBoardLogger):
        to_tensorboard(logger.experiment, folder, tag, manifest, step)
    else:
        return False
    return True


def to_mlflow(client: Any, run_id: str, folder: str, tag: str, manifest: Any) -> None:
    """The folder's files under the run's artifact path ``<folder>/<tag>``."""
    client.log_artifacts(run_id, str(manifest.dir), f"{folder}/{tag}")


def to_wandb(run: Any, folder: str, tag: str, manifest: Any, best: bool) -> None:
    """A ``model`` artifact version holding the folder, aliased with the tag."""
    import wandb

    artifact = wandb.Artifact(name=_wandb_name(f"{folder}-{run.id}"), type="model",
                              metadata=summary(manifest))
    artifact.add_dir(str(manifest.dir))
    run.log_artifact(artifact, aliases=["latest", _wandb_name(tag)] + (["best"] if best else []))


def to_tensorboard(writer: Any, folder: str, tag: str, manifest: Any, step: int) -> None:
    """The export's table and path as a text summary (TensorBoard stores no files)."""
    writer.add_text(f"{folder}/{tag}", summary_markdown(manifest), global_step=step)


def summary(manifest: Any) -> dict[str, Any]:
    """Small, JSON-friendly facts about an export, for artifact metadata."""
    report = manifest.verification
    extra = manifest.extra or {}
    return {
        "passed": bool(manifest.passed),
        "formats": {fmt: {"target": rec.get("target"),
                          "passed": None if report is None else bool(report.format_passed(fmt)),
                          "max_error": None if report is None else float(report.max_error(fmt))}
                    for fmt, rec in manifest.formats.items()},
        **{k: extra.get(k) for k in ("tag", "source_checkpoint", "checkpoint_sha256", "epoch",
                                     "global_step", "exported_module") if k in extra},
    }


def summary_markdown(manifest: Any) -> str:
    """The export's table as Markdown (TensorBoard renders text summaries as Markdown)."""
    report = manifest.verification
    lines = [f"`{manifest.dir}`", "", "| format | target | verified | max error | files |",
             "|---|---|---|---|---|"]
    for fmt, rec in manifest.formats.items():
        ok = "-" if report is None else ("yes" if report.format_passed(fmt) else "NO")
        err = "-" if report is None else f"{report.max_error(fmt):.3e}"
        lines.append(f"| {fmt} | {rec.get('target')} | {ok} | {err} | "
                     f"{', '.join(rec.get('files', []))} |")
    return "\n".join(lines)


def _wandb_name(text: str) -> str:
    """W&B artifact names and aliases take letters, digits, ``-``, ``_`` and ``.``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
