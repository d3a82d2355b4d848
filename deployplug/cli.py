"""The ``deployplug`` command.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands driven by YAML
configs (``deployplug fit --config configs/repvgg_digits.yaml``). Three more work without
training, because exporting an existing checkpoint should not require retraining:

* ``export``  - export a checkpoint with the settings of the config's DeployCallback;
* ``verify``  - re-check an artifact directory against its recorded PyTorch outputs;
* ``check``   - pre-flight: can the configured formats/targets take this model at all?

Exit codes: 0 success, 1 a verification or compatibility check failed, 2 an error prevented
the command from finishing. For ``verify``: 1 when the directory does not match its manifest
(integrity), when an artifact's outputs differ from the recorded ones, or when an artifact
cannot run in its runtime; 2 (with a one-line ``error:`` message) when the directory cannot be
checked at all: no or malformed ``manifest.json`` or ``reference.npz``, a file over the size or
tensor limits, bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def lightning_cli(args: Sequence[str] | None, run: bool = True) -> Any:
    """The LightningCLI behind ``fit``/``validate``/``test`` and config loading elsewhere.

    The model is :class:`deployplug.lit.ClassifierModule`; the data may be any
    LightningDataModule given by ``class_path`` (e.g. ``deployplug.data.DigitsDataModule``).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    from deployplug.lit import ClassifierModule

    return LightningCLI(
        ClassifierModule, pl.LightningDataModule, subclass_mode_data=True,
        args=list(args) if args is not None else None, run=run,
        save_config_kwargs={"overwrite": True},
    )


# --------------------------------------------------------------------------- shared pieces

def _deploy_callback(trainer: Any) -> Any:
    """The first DeployCallback configured on ``trainer`` (or None)."""
    from deployplug.callback import DeployCallback

    return next((cb for cb in trainer.callbacks if isinstance(cb, DeployCallback)), None)


def _load_config(configs: Sequence[str]) -> tuple[Any, Any, Any]:
    """(LightningModule, DeployCallback or None, datamodule) built from fit-style configs."""
    args: list[str] = []
    for cfg in configs:
        args += ["--config", cfg]
    cli = lightning_cli(args, run=False)
    return cli.model, _deploy_callback(cli.trainer), cli.datamodule


def _settings(callback: Any, opts: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """Command-line values win; otherwise the config's DeployCallback; otherwise its defaults."""
    from deployplug.callback import DeployCallback

    source = callback if callback is not None else DeployCallback()
    out = {}
    for name in names:
        value = getattr(opts, name, None)
        out[name] = value if value is not None else getattr(source, name)
    return out


def _add_deploy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", action="append", default=[],
                        help="fit config(s) naming the model and the DeployCallback settings "
                             "(repeatable, later files override earlier ones)")
    parser.add_argument("--formats", nargs="+", help="formats, e.g. onnx caffe msnhnet")
    parser.add_argument("--target", help="target profile refining a format, e.g. om")
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


def _subject(module: Any, example: Any, settings: dict[str, Any]) -> Any:
    """What to export from ``module`` (a CPU copy) and the forward it is checked against."""
    from deployplug.callback import expected_shape_text, probe_forward
    from deployplug.export_subject import resolve_subject

    probe_forward(module, example, expected_shape_text(module, getattr(module, "net", None)))
    return resolve_subject(module, [example], settings["module_attr"],
                           bool(settings["accept_submodule_mismatch"]))


def _checkpoint_module(ckpt: Any, path: Path) -> Any:
    """The ClassifierModule a checkpoint's stored hyperparameters describe (no config given)."""
    from deployplug.checkpoint_io import hyperparameters
    from deployplug.errors import CheckpointLoadError
    from deployplug.lit import ClassifierModule

    try:
        return ClassifierModule(**hyperparameters(ckpt, path))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointLoadError(
            f"checkpoint {path}: its hyperparameters do not build a ClassifierModule "
            f"({type(exc).__name__}: {exc}); pass the fit config with --config") from exc


def _default_out(ckpt: Path, callback: Any) -> Path:
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath) / ckpt.stem
    return ckpt.resolve().parent.parent / "deploy" / ckpt.stem


# --------------------------------------------------------------------------- export

EXPORT_SETTINGS = ("formats", "target", "input_shape", "tolerance", "opset", "onnx_dynamo",
                   "dynamic_batch", "verify", "validation_parity", "module_attr",
                   "accept_submodule_mismatch", "reparameterize")


def _export(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deployplug export",
        description="Export a Lightning checkpoint without retraining, verify the files and "
                    "write them with a manifest. What is exported is what the LightningModule's "
                    "forward computes, with the checkpoint's weights.")
    parser.add_argument("--checkpoint", "--ckpt", required=True, help="the .ckpt file")
    _add_deploy_options(parser)
    parser.add_argument("--out", help="artifact directory (default: <run dir>/deploy/<ckpt "
                                      "name>, beside the checkpoints folder)")
    parser.add_argument("--tolerance", type=float)
    parser.add_argument("--opset", type=int)
    parser.add_argument("--dynamo", dest="onnx_dynamo", action="store_const", const=True,
                        help="use the dynamo-based ONNX exporter")
    parser.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_const",
                        const=True, help="give the ONNX model a dynamic batch dimension")
    parser.add_argument("--no-verify", dest="verify", action="store_const", const=False)
    parser.add_argument("--parity", dest="validation_parity", action="store_const", const=True,
                        help="also compare ONNX and PyTorch on the config's validation data")
    parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                        help="read the checkpoint with full unpickling; this runs any code the "
                             "file contains, so only for files you trust")
    opts = parser.parse_args(argv)

    from deployplug import pipeline
    from deployplug.callback import example_shapes, make_example, onnx_parity
    from deployplug.checkpoint_io import apply_weights, read_checkpoint
    from deployplug.errors import DeployError, ParityError, VerificationError
    from deployplug.export_subject import lightning_copy
    from deployplug.outdir import check_output_dir

    ckpt = Path(opts.checkpoint)
    try:
        if opts.out:  # refuse a foreign directory before spending time on anything else
            check_output_dir(opts.out)
            check_output_dir(pipeline.failed_path(Path(opts.out)))
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        module, callback, datamodule = _load_config(opts.config) if opts.config else (
            None, None, None)
        out_dir = Path(opts.out) if opts.out else _default_out(ckpt, callback)
        check_output_dir(out_dir)  # before the checkpoint is read or anything is exported
        check_output_dir(pipeline.failed_path(out_dir))
        state, info = read_checkpoint(ckpt, trust_checkpoint=opts.trust_checkpoint)
        if module is None:
            module = _checkpoint_module(state, ckpt)
        s = _settings(callback, opts, EXPORT_SETTINGS)
        lit = lightning_copy(module)
        apply_weights(lit, state, ckpt)
        example = make_example(example_shapes(s["input_shape"],
                                              getattr(module, "example_input_array", None)))
        subject = _subject(lit, example, s)
        parity = bool(s["validation_parity"]) and datamodule is not None
        if parity and not subject.reproduces_forward:
            raise ValueError("--parity measures the LightningModule's predictions; the exported "
                             "submodule computes something else")
        manifest = pipeline.export(
            subject.model, example, out_dir, formats=s["formats"], target=s["target"],
            reparameterize=s["reparameterize"], verify=s["verify"], tolerance=s["tolerance"],
            onnx_options={"dynamo": s["onnx_dynamo"], "opset": s["opset"],
                          "dynamic_batch": bool(s["dynamic_batch"]) or parity},
            strict=True, metadata={**info.metadata(), **subject.metadata()},
            reference_model=subject.reference)
        print(manifest)
        if parity and "onnx" in manifest.formats:
            datamodule.setup("validate")
            try:
                metrics = onnx_parity(manifest.artifact("onnx"), subject.reference,
                                      datamodule.val_dataloader())
            except Exception as exc:
                raise ParityError(f"running {manifest.artifact('onnx')} over the validation set "
                                  f"failed with {type(exc).__name__}: {exc}") from exc
            print("validation parity: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    except VerificationError as exc:
        if exc.manifest is not None:
            print(exc.manifest)
        print(exc.report)
        print(f"verification failed: the failed files are in {exc.failed_dir}", file=sys.stderr)
        return EXIT_FAILED
    except (DeployError, OSError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if manifest.passed or not s["verify"] else EXIT_FAILED


# --------------------------------------------------------------------------- verify

def _verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
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
    opts = parser.parse_args(argv)

    from deployplug.errors import IntegrityError
    from deployplug.verification import verify

    try:
        report = verify(opts.dir, tolerance=opts.tolerance, max_bytes=opts.max_bytes)
    except IntegrityError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # any file, however damaged, ends in one line and exit code 2
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    print(report)
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
    print(f"error: {' '.join(why.split())}{suffix}", file=sys.stderr)
    return EXIT_FAILED


# --------------------------------------------------------------------------- check

def _check(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deployplug check",
        description="Pre-flight without training or writing files: report every op the "
                    "configured formats/targets cannot take.")
    _add_deploy_options(parser)
    parser.add_argument("--model", help="zoo model name, instead of a config")
    parser.add_argument("--num-classes", dest="num_classes", type=int, default=10)
    parser.add_argument("--in-channels", dest="in_channels", type=int, default=3)
    opts = parser.parse_args(argv)
    if not opts.config and not opts.model:
        parser.error("give --config (a fit config) or --model (a zoo model name)")

    from deployplug.callback import example_shapes, make_example, preflight_reports
    from deployplug.errors import DeployError
    from deployplug.export_subject import lightning_copy

    try:
        if opts.config:
            module, callback, _ = _load_config(opts.config)
            declared = getattr(module, "example_input_array", None)
        else:
            from deployplug import models

            module = models.build(opts.model, num_classes=opts.num_classes,
                                  in_channels=opts.in_channels)
            callback, declared = None, None
            if opts.input_shape is None:
                opts.input_shape = list(module.default_input_shape)
        s = _settings(callback, opts, ("formats", "target", "input_shape", "module_attr",
                                       "accept_submodule_mismatch", "reparameterize"))
        example = make_example(example_shapes(s["input_shape"], declared))
        subject = _subject(lightning_copy(module), example, s)
        print(f"exported module: {subject.name}")
        reports = preflight_reports(subject.model, example, s["formats"], s["target"],
                                    reparameterize=s["reparameterize"])
    except (DeployError, OSError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for fmt, target, report in reports:
        print(f"[{fmt} -> {target}]")
        print(report)
    return EXIT_OK if all(r.passed for _, _, r in reports) else EXIT_FAILED


# --------------------------------------------------------------------------- dispatch

COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "export": _export, "verify": _verify, "check": _check}

USAGE = """usage: deployplug <command> [options]

training (LightningCLI; see `deployplug fit --help`):
  fit        train with a config, e.g. deployplug fit --config configs/repvgg_digits.yaml
  validate   run the validation loop
  test       run the test loop
  predict    run prediction

deployment:
  export     export a checkpoint: deployplug export --checkpoint CKPT [--config CFG]
  verify     re-check an artifact directory (integrity, then numbers):
             deployplug verify DIR [--tolerance T] [--max-bytes N]
  check      pre-flight a config or zoo model: deployplug check --config CFG
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deployplug`` console script; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK if args else EXIT_ERROR
    if args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    # From the console script LightningCLI reads sys.argv itself (passing it too is warned about).
    lightning_cli(None if argv is None else args)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
