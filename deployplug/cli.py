"""The ``deployplug`` command.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands driven by YAML
configs (``deployplug fit --config configs/repvgg_digits.yaml``). Three more work without
training, because exporting an existing checkpoint should not require retraining:

* ``export``  - export a checkpoint with the settings of the config's DeployCallback;
* ``verify``  - re-check an artifact directory against its recorded PyTorch outputs;
* ``check``   - pre-flight: can the configured formats/targets take this model at all?

Exit codes: 0 success, 1 a verification or compatibility check failed, 2 an error prevented
the command from finishing.
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


# --------------------------------------------------------------------------- export

def _export(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deployplug export",
        description="Export a Lightning checkpoint without retraining, verify the files and "
                    "write them with a manifest.")
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
    opts = parser.parse_args(argv)

    from deployplug import pipeline
    from deployplug.callback import (
        example_shapes,
        expected_shape_text,
        load_checkpoint_into,
        make_example,
        onnx_parity,
        probe_forward,
        resolve_network,
    )
    from deployplug.errors import DeployError

    ckpt = Path(opts.checkpoint)
    if not ckpt.is_file():
        print(f"error: checkpoint {ckpt} does not exist", file=sys.stderr)
        return EXIT_ERROR
    try:
        if opts.config:
            module, callback, datamodule = _load_config(opts.config)
        else:
            from deployplug.lit import ClassifierModule

            module = ClassifierModule.load_from_checkpoint(str(ckpt), map_location="cpu")
            callback, datamodule = None, None
        s = _settings(callback, opts, (
            "formats", "target", "input_shape", "tolerance", "opset", "onnx_dynamo",
            "dynamic_batch", "verify", "validation_parity", "module_attr"))
        network, prefix = resolve_network(module, s["module_attr"])
        network = load_checkpoint_into(pipeline.deploy_copy(network), ckpt, prefix)
        example = make_example(example_shapes(s["input_shape"],
                                              getattr(module, "example_input_array", None)))
        probe_forward(network, example, expected_shape_text(module, network))
        if opts.out:
            out_dir = Path(opts.out)
        elif callback is not None and callback.dirpath:
            out_dir = Path(callback.dirpath) / ckpt.stem
        else:
            out_dir = ckpt.resolve().parent.parent / "deploy" / ckpt.stem
        parity = bool(s["validation_parity"]) and datamodule is not None
        manifest = pipeline.export(
            network, example, out_dir, formats=s["formats"], target=s["target"],
            verify=s["verify"], tolerance=s["tolerance"],
            onnx_options={"dynamo": s["onnx_dynamo"], "opset": s["opset"],
                          "dynamic_batch": bool(s["dynamic_batch"]) or parity},
            metadata={"source_checkpoint": str(ckpt)})
        print(manifest)
        if parity and "onnx" in manifest.formats:
            datamodule.setup("validate")
            metrics = onnx_parity(manifest.artifact("onnx"), network, datamodule.val_dataloader())
            print("validation parity: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    except (DeployError, OSError, KeyError, ValueError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if manifest.passed or not s["verify"] else EXIT_FAILED


# --------------------------------------------------------------------------- verify

def _verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deployplug verify",
        description="Re-run every artifact in DIR and compare with the PyTorch outputs "
                    "recorded at export time.")
    parser.add_argument("dir", help="artifact directory (holds manifest.json)")
    parser.add_argument("--tolerance", type=float, help="override the manifest's tolerance")
    opts = parser.parse_args(argv)

    from deployplug.errors import DeployError
    from deployplug.verification import verify

    try:
        report = verify(opts.dir, tolerance=opts.tolerance)
    except (DeployError, OSError, KeyError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(report)
    return EXIT_OK if report.passed else EXIT_FAILED


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

    from deployplug.callback import (
        example_shapes,
        expected_shape_text,
        make_example,
        preflight_reports,
        probe_forward,
        resolve_network,
    )
    from deployplug.errors import DeployError
    from deployplug.pipeline import deploy_copy

    try:
        if opts.config:
            module, callback, _ = _load_config(opts.config)
            network, _ = resolve_network(module, getattr(callback, "module_attr", None))
            declared = getattr(module, "example_input_array", None)
        else:
            from deployplug import models

            module = network = models.build(opts.model, num_classes=opts.num_classes,
                                            in_channels=opts.in_channels)
            callback, declared = None, None
            if opts.input_shape is None:
                opts.input_shape = list(network.default_input_shape)
        s = _settings(callback, opts, ("formats", "target", "input_shape"))
        network = deploy_copy(network)
        example = make_example(example_shapes(s["input_shape"], declared))
        probe_forward(network, example, expected_shape_text(module, network))
        reports = preflight_reports(network, example, s["formats"], s["target"])
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
  verify     re-check an artifact directory: deployplug verify DIR
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
