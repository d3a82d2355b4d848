"""The ``deployplug`` command.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands driven by YAML
configs naming any LightningModule and LightningDataModule (``class_path`` + ``init_args``;
see :mod:`deployplug.cli_config`), e.g. ``deployplug fit --config my_fit.yaml --config
configs/deploy.yaml``. Three more work without training, because exporting an existing
checkpoint should not require retraining:

* ``export``  - export a checkpoint exactly as the config's DeployCallback would have;
* ``verify``  - re-check an artifact directory against its recorded PyTorch outputs;
* ``check``   - pre-flight: can the configured formats/targets take this model at all?

Exit codes: 0 success, 1 a verification or compatibility check failed, 2 an error prevented
the command from finishing, reported as one ``error:`` line on stderr that names the flag to
change. For ``verify``: 1 when the directory does not match its manifest (integrity), when an
artifact's outputs differ from the recorded ones, or when an artifact cannot run in its
runtime; 2 when the directory cannot be checked at all: no or malformed ``manifest.json`` or
``reference.npz``, a file over the size or tensor limits, bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from deployplug.cli_config import LIGHTNING_COMMANDS, one_line

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
#: How the command line spells the example-shape setting in messages.
SHAPE_OPTION = "--input-shape"


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``error:`` line and exit code 2, not the usage text."""

    def error(self, message: str) -> NoReturn:
        from deployplug.errors import ConfigError

        raise ConfigError(f"{self.prog}: {message}")


def _error(exc: BaseException) -> int:
    print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
    return EXIT_ERROR


#: What ends a command with exit code 2 (anything else is a bug and keeps its traceback).
def _command_errors() -> tuple[type[BaseException], ...]:
    from deployplug.errors import DeployError

    return (DeployError, OSError, KeyError, ValueError, RuntimeError)


# --------------------------------------------------------------------------- shared pieces

def _settings(callback: Any, opts: argparse.Namespace) -> Any:
    """Command-line values win; otherwise the config's DeployCallback; otherwise its defaults."""
    from deployplug.callback import DeployCallback
    from deployplug.deploy_steps import DeploySettings
    from deployplug.errors import ConfigError

    shape = getattr(opts, "input_shape", None)
    if shape is not None and any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape must be positive sizes, batch first; got {shape}")
    batches = getattr(opts, "parity_batches", None)
    if batches is not None and batches < 1:
        raise ConfigError(f"--parity-batches must be at least 1, got {batches}")
    source = callback if callback is not None else DeployCallback()
    return DeploySettings.from_object(source, vars(opts))


def _add_deploy_options(parser: argparse.ArgumentParser) -> None:
    from deployplug.exporters import formats
    from deployplug.profiles import targets

    parser.add_argument("--config", "-c", action="append", default=[],
                        help="fit config(s) naming the model, the data and the DeployCallback "
                             "settings (repeatable, later files override earlier ones)")
    parser.add_argument("--formats", nargs="+", choices=formats(),
                        help="formats, e.g. onnx caffe msnhnet")
    parser.add_argument("--target", choices=sorted(t.name for t in targets()),
                        help="target profile refining a format, e.g. om")
    parser.add_argument("--input-shape", dest="input_shape", type=int, nargs="+",
                        help="example input shape with the batch dim, e.g. 1 3 224 224")
    parser.add_argument("--no-reparameterize", dest="reparameterize", action="store_const",
                        const=False, help="export the training form: no branch/BatchNorm fusion")
    parser.add_argument("--module-attr", dest="module_attr",
                        help="export this submodule instead of the LightningModule's forward "
                             "('' = always the whole forward)")
    parser.add_argument("--accept-submodule-mismatch", dest="accept_submodule_mismatch",
                        action="store_const", const=True,
                        help="export --module-attr even though it computes something other "
                             "than the forward")


def _subject(module: Any, samples: Sequence[Any], settings: Any) -> Any:
    """What to export from ``module`` (a CPU copy) and the forward it is checked against."""
    from deployplug.errors import ConfigError
    from deployplug.examples import expected_shape_text, probe_forward
    from deployplug.export_subject import resolve_subject

    probe_forward(module, samples[0], expected_shape_text(module, getattr(module, "net", None)),
                  option=SHAPE_OPTION)
    try:
        return resolve_subject(module, samples, settings.module_attr,
                               bool(settings.accept_submodule_mismatch))
    except ValueError as exc:  # a submodule path that does not exist
        raise ConfigError(f"--module-attr {settings.module_attr!r}: {exc}") from exc


def _default_out(ckpt: Path, callback: Any) -> Path:
    """Where the callback would have put this checkpoint's export."""
    from deployplug.export_folders import checkpoint_tag

    tag = checkpoint_tag(str(ckpt))
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath) / tag
    folder = callback.folder if callback is not None else "deploy"
    return ckpt.resolve().parent.parent / folder / tag


def _val_loader(datamodule: Any) -> Any:
    """The datamodule's validation loader, prepared the way ``trainer.validate`` would."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule.val_dataloader()


# --------------------------------------------------------------------------- export

def _export_parser() -> _Parser:
    parser = _Parser(
        prog="deployplug export",
        description="Export a Lightning checkpoint without retraining, verify the files and "
                    "write them with a manifest, exactly as the config's first DeployCallback "
                    "would have. What is exported is what the LightningModule's forward "
                    "computes, with the checkpoint's weights; without --config, the module "
                    "(and data) are rebuilt from what LightningCLI stored in the checkpoint.")
    parser.add_argument("--checkpoint", "--ckpt", required=True, help="the .ckpt file")
    _add_deploy_options(parser)
    parser.add_argument("--out", help="artifact directory (default: where the callback puts "
                                      "this checkpoint's export: <run dir>/deploy/<ckpt name>)")
    parser.add_argument("--tolerance", type=float)
    parser.add_argument("--opset", type=int)
    parser.add_argument("--dynamo", dest="onnx_dynamo", action="store_const", const=True,
                        help="use the dynamo-based ONNX exporter")
    parser.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_const",
                        const=True, help="give the ONNX model a dynamic batch dimension")
    parser.add_argument("--no-verify", dest="verify", action="store_const", const=False)
    parser.add_argument("--parity", dest="validation_parity", action="store_const", const=True,
                        help="also run every exported format over the validation data and "
                             "compare it with PyTorch")
    parser.add_argument("--parity-batches", dest="parity_batches", type=int,
                        help="validation batches --parity reads (default: all)")
    parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                        help="read the checkpoint with full unpickling; this runs any code the "
                             "file contains, so only for files you trust")
    parser.add_argument("--int8-weights", dest="int8_weights",
                        choices=("per_channel", "per_tensor"),
                        help="onnx_int8: weight granularity the target takes")
    parser.add_argument("--int8-repair", dest="int8_repair",
                        choices=("none", "equalize", "keep_float", "equalize+keep_float", "auto"),
                        help="onnx_int8: repair to apply (auto: the cheapest that meets the "
                             "drop limit)")
    parser.add_argument("--int8-max-drop", dest="int8_max_drop", type=float,
                        help="onnx_int8: largest accepted accuracy drop, as a fraction "
                             "(default 0.01)")
    return parser


def _int8_formats(settings: Any) -> list[str]:
    """The int8 formats asked for: they need the config's training and validation data."""
    from deployplug.exporters import statistical_formats

    return statistical_formats(settings.formats)


def _int8_overrides(settings: Any, opts: argparse.Namespace) -> None:
    """Fold the --int8-* flags into the config's int8 settings (flags win)."""
    from deployplug.errors import ConfigError

    flags = {"weights": opts.int8_weights, "repair": opts.int8_repair,
             "max_drop": opts.int8_max_drop}
    given = {k: v for k, v in flags.items() if v is not None}
    if given and not _int8_formats(settings):
        raise ConfigError("--int8-* flags configure the onnx_int8 format: add it to --formats")
    if given:
        settings.int8 = {**(settings.int8 or {}), **given}


def _export(argv: Sequence[str]) -> int:
    opts = _export_parser().parse_args(argv)

    from deployplug import pipeline
    from deployplug.errors import VerificationError
    from deployplug.outdir import check_output_dir

    try:
        if opts.out:  # refuse a foreign directory before spending time on anything else
            check_output_dir(opts.out)
            check_output_dir(pipeline.failed_path(Path(opts.out)))
        manifest, settings = _run_export(opts)
    except VerificationError as exc:
        if exc.manifest is not None:
            print(exc.manifest)
        print(exc.report)
        print(f"error: verification failed: the failed files are in {exc.failed_dir}",
              file=sys.stderr)
        return EXIT_FAILED
    except _command_errors() as exc:
        return _error(exc)
    return EXIT_OK if manifest.passed or not settings.verify else EXIT_FAILED


def _run_export(opts: argparse.Namespace) -> tuple[Any, Any]:
    from deployplug.checkpoint_io import apply_weights, read_checkpoint
    from deployplug.cli_config import (
        datamodule_from_checkpoint,
        load_config,
        module_from_checkpoint,
    )
    from deployplug.deploy_steps import export_subject
    from deployplug.errors import CheckpointLoadError, ConfigError
    from deployplug.examples import example_shapes, make_example, validation_samples
    from deployplug.export_subject import lightning_copy
    from deployplug.outdir import check_output_dir
    from deployplug.pipeline import failed_path

    ckpt = Path(opts.checkpoint)
    if not ckpt.is_file():
        raise CheckpointLoadError(f"--checkpoint {ckpt}: no such file")
    module, callback, datamodule = load_config(opts.config) if opts.config else (
        None, None, None)
    settings = _settings(callback, opts)
    _int8_overrides(settings, opts)
    out_dir = Path(opts.out) if opts.out else _default_out(ckpt, callback)
    check_output_dir(out_dir)  # before the checkpoint is read or anything is exported
    check_output_dir(failed_path(out_dir))
    state, info = read_checkpoint(ckpt, trust_checkpoint=opts.trust_checkpoint)
    if module is None:
        module = module_from_checkpoint(state, ckpt)
        try:
            datamodule = datamodule_from_checkpoint(state, ckpt)
        except CheckpointLoadError as exc:
            if settings.validation_parity or _int8_formats(settings):
                raise
            print(f"note: verifying without validation inputs: {one_line(exc)}",
                  file=sys.stderr)
    lit = lightning_copy(module)
    apply_weights(lit, state, ckpt)
    shapes = example_shapes(settings.input_shape, getattr(module, "example_input_array", None),
                            option=SHAPE_OPTION)
    example = make_example(shapes)
    wants_data = settings.validation_parity or settings.validation_samples > 0
    loader = _val_loader(datamodule) if datamodule is not None and wants_data else None
    real = validation_samples(loader, shapes, settings.validation_samples)
    subject = _subject(lit, [example, *real], settings)
    if settings.validation_parity:
        if loader is None:
            raise ConfigError("--parity needs validation data: give the fit config whose data "
                              "section makes it (--config)")
        if not subject.reproduces_forward:
            raise ConfigError("--parity measures the LightningModule's predictions; the "
                              "exported submodule (--accept-submodule-mismatch) computes "
                              "something else")
    int8_data = None
    if _int8_formats(settings):
        int8_data = _int8_data(datamodule, loader, shapes, settings)
    manifest = export_subject(subject, example, real, out_dir, settings, info.metadata(),
                              int8_data)
    print(manifest)
    if settings.validation_parity:
        from deployplug.parity import record_parity

        result = _parity(manifest, subject.reference, loader, settings.parity_batches)
        record_parity(manifest, result)
        print(result)
    return manifest, settings


def _int8_data(datamodule: Any, val_loader: Any, shapes: Any, settings: Any) -> Any:
    """Training batches to calibrate on and validation batches to judge on, from the data."""
    from deployplug.errors import ConfigError
    from deployplug.int8_data import gather

    if datamodule is None:
        raise ConfigError("--formats onnx_int8 needs training data to calibrate on: give the "
                          "fit config whose data section makes it (--config)")
    datamodule.prepare_data()
    datamodule.setup("fit")
    if val_loader is None:
        val_loader = datamodule.val_dataloader()
    return gather(datamodule.train_dataloader(), val_loader, shapes, settings.int8)


def _parity(manifest: Any, reference: Any, loader: Any, batches: int | None) -> Any:
    from deployplug.errors import ParityError
    from deployplug.parity import validation_parity

    try:
        return validation_parity(manifest, reference, loader, max_batches=batches)
    except Exception as exc:
        raise ParityError(f"--parity: {one_line(exc)}; the artifacts in {manifest.dir} are "
                          "exported and verified (drop --parity to skip this measurement)"
                          ) from exc


# --------------------------------------------------------------------------- verify

def _verify(argv: Sequence[str]) -> int:
    parser = _Parser(
        prog="deployplug verify",
        description="Check DIR against its manifest (file names, file types, sizes, sha256), "
                    "then re-run every artifact and compare it with the PyTorch outputs "
                    "recorded at export time. Every file is read as untrusted input.",
        epilog="exit codes: 0 passed; 1 the integrity check or a comparison failed (or an "
               "artifact could not run in its runtime); 2 DIR could not be checked (no or "
               "malformed manifest.json / reference.npz, a file over the limits, bad "
               "arguments).")
    parser.add_argument("dir", help="artifact directory (holds manifest.json)")
    parser.add_argument("--tolerance", type=float,
                        help="normalized error allowed (default 1e-5). The tolerance recorded "
                             "in the manifest is only reported, never used: a file cannot "
                             "loosen its own check")
    parser.add_argument("--max-bytes", dest="max_bytes", type=int,
                        help="tensor bytes the readers may allocate (default 2 GiB, or "
                             "$DEPLOYPLUG_MAX_TENSOR_BYTES)")
    parser.add_argument("--layers", action="store_true",
                        help="also print each format's per-layer error profile, as recorded "
                             "at export on the example input (module path, op, artifact "
                             "layer, shape, normalized error, the rule or lowering that made "
                             "it, and the culprit of a failed format)")
    opts = parser.parse_args(argv)

    from deployplug.errors import IntegrityError
    from deployplug.verification import verify

    try:
        report = verify(opts.dir, tolerance=opts.tolerance, max_bytes=opts.max_bytes)
    except IntegrityError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # any file, however damaged, ends in one line and exit code 2
        return _error(exc)
    print(report)
    if opts.layers and not report.integrity:
        print()
        print(report.format_layers())
        if not report.passed and report.layers:
            print("note: these profiles were recorded at export, when the files passed; to "
                  "find the layer that fails now, verify with the model: "
                  "dp.verify(DIR, model=...) compares every layer again")
    if report.passed:
        return EXIT_OK
    if report.integrity:
        why = f"integrity check failed, nothing was run: {report.integrity[0]}"
        more = len(report.integrity) - 1
    else:
        reasons = [f"{fmt} could not run: {msg}" for fmt, msg in report.failures.items()]
        reasons += [f"{c.format} output {c.output} on sample {c.sample} ({c.source}): "
                    f"normalized error {c.normalized:.3g} > {report.tolerance:g}"
                    for c in report.comparisons if not c.passed]
        why = f"verification failed: {reasons[0] if reasons else 'nothing was compared'}"
        more = max(len(reasons) - 1, 0)
    suffix = f" (and {more} more, see the report above)" if more else ""
    print(f"error: {one_line(why)}{suffix}", file=sys.stderr)
    return EXIT_FAILED


# --------------------------------------------------------------------------- check

def _check(argv: Sequence[str]) -> int:
    parser = _Parser(
        prog="deployplug check",
        description="Pre-flight without training or writing files, exactly as the config's "
                    "first DeployCallback runs it at fit start: report every op the "
                    "configured formats/targets cannot take.")
    _add_deploy_options(parser)
    parser.add_argument("--model", help="zoo model name, instead of a config")
    parser.add_argument("--num-classes", dest="num_classes", type=int, default=10)
    parser.add_argument("--in-channels", dest="in_channels", type=int, default=3)
    opts = parser.parse_args(argv)
    if not opts.config and not opts.model:
        parser.error("give --config (a fit config) or --model (a zoo model name)")

    from deployplug.cli_config import load_config
    from deployplug.deploy_steps import preflight_reports
    from deployplug.examples import example_shapes, make_example
    from deployplug.export_subject import lightning_copy

    try:
        if opts.config:
            module, callback, _ = load_config(opts.config)
            declared = getattr(module, "example_input_array", None)
        else:
            from deployplug import models

            module = models.build(opts.model, num_classes=opts.num_classes,
                                  in_channels=opts.in_channels)
            callback, declared = None, None
            if opts.input_shape is None:
                opts.input_shape = list(cast(tuple[int, ...], module.default_input_shape))
        settings = _settings(callback, opts)
        example = make_example(example_shapes(settings.input_shape, declared,
                                              option=SHAPE_OPTION))
        subject = _subject(lightning_copy(module), [example], settings)
        print(f"exported module: {subject.name}")
        reports = preflight_reports(subject.model, example, settings.formats, settings.target,
                                    reparameterize=settings.reparameterize,
                                    onnx_options=settings.onnx_options())
    except _command_errors() as exc:
        return _error(exc)
    for fmt, target, report in reports:
        print(f"[{fmt} -> {target}]")
        print(report)
    return EXIT_OK if all(r.passed for _, _, r in reports) else EXIT_FAILED


# --------------------------------------------------------------------------- training

def _train(args: Sequence[str]) -> int:
    """``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI.

    Config mistakes and deployplug's own failures (a pre-flight that stops the fit, an
    output folder it may not write) are one line; errors raised by the user's training code
    keep their traceback.
    """
    from deployplug.cli_config import lightning_cli

    lightning_cli(args)
    return EXIT_OK


# --------------------------------------------------------------------------- dispatch

COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "export": _export, "verify": _verify, "check": _check}

USAGE = """usage: deployplug <command> [options]

training (LightningCLI, any LightningModule / DataModule by class_path; see `deployplug fit
--help`):
  fit        train with a config, e.g. deployplug fit --config my_fit.yaml \\
                 --config configs/deploy.yaml
  validate   run the validation loop
  test       run the test loop
  predict    run prediction

deployment:
  export     export a checkpoint as the config's DeployCallback would:
             deployplug export --checkpoint CKPT [--config CFG] [--parity]
  verify     re-check an artifact directory (integrity, then numbers):
             deployplug verify DIR [--tolerance T] [--max-bytes N] [--layers]
  check      pre-flight a config or zoo model: deployplug check --config CFG
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deployplug`` console script; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK if args else EXIT_ERROR
    command = args[0]
    from deployplug.errors import ConfigError, DeployError

    try:
        if command in COMMANDS:
            return COMMANDS[command](args[1:])
        if command in LIGHTNING_COMMANDS:
            return _train(args)
        raise ConfigError(f"unknown command {command!r}; choose from "
                          f"{', '.join([*LIGHTNING_COMMANDS, *COMMANDS])} (deployplug --help)")
    except DeployError as exc:
        return _error(exc)
    except SystemExit as exc:  # --help of a subcommand
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
