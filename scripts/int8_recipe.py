"""The INT8 numbers of the README, measured: RepVGG-A0 on the digits recipe, plain and QARepVGG.

Trains the digits recipe (``configs/repvgg_digits.yaml``: the same module, data and trainer
settings ``deployplug fit`` uses, without the deploy callback) with ``--model.model
repvgg_a0`` for 6 epochs, once with plain RepVGG blocks and once with ``quant_friendly=True``,
then, for each, on the validation split with its labels:

* the readiness report on 256 training images, timed (with the load of other processes);
* plain post-training quantization (onnxruntime static QDQ), per-tensor and per-channel;
* the repairs: equalization, the report's top-5 layers kept in float, the top-5 layers
  chosen by measuring real int8 files (``float_layers=5``, what ``keep_float`` by count
  does), the top-5 layers by largest weight kept in float (for comparison), and
  ``int8_repair="auto"``;
* the share of the per-tensor drop each keep-float ranking recovers.

Then the onnxruntime latency of int8 vs fp32 for RepVGG-A0 at 1x3x224x224 (interleaved).

    python scripts/int8_recipe.py [--seeds 0 1 2] [--threads 1] [--lr 0.02] [--json out.json]

Trained weights are cached in ``--work`` (default: a directory under the system temp dir),
so a second run only re-measures. ``--checkpoint-plain`` / ``--checkpoint-qa`` take ``.ckpt``
files of ``deployplug fit`` runs instead of training here. ``--lr`` overrides the recipe's
learning rate for both blocks. On cores shared with other jobs ``--threads 1`` trains this
small model several times faster than two contending threads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import LoadProbe, interleaved, ort_session, ratio_text  # noqa: E402

import deployplug as dp  # noqa: E402
from deployplug.data import DigitsDataModule  # noqa: E402
from deployplug.int8 import int8_report  # noqa: E402
from deployplug.lit import ClassifierModule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "repvgg_digits.yaml"
CALIBRATION = 256
VARIANTS = {"plain": {}, "quant_friendly": {"quant_friendly": True}}


def recipe(config: Path) -> dict[str, Any]:
    return yaml.safe_load(config.read_text())


def datamodule(cfg: dict[str, Any]) -> DigitsDataModule:
    dm = DigitsDataModule(**cfg["data"]["init_args"])
    dm.setup()
    return dm


def lit_module(cfg: dict[str, Any], model: str, kwargs: dict[str, Any],
               lr: float | None = None) -> ClassifierModule:
    args = dict(cfg["model"]["init_args"], model=model, model_kwargs=kwargs or None)
    if lr is not None:
        args["lr"] = lr
    return ClassifierModule(**args)


def train(cfg: dict[str, Any], model: str, kwargs: dict[str, Any], epochs: int,
          seed: int, lr: float | None, callbacks: Sequence[Any] = (),
          **trainer_options: Any) -> ClassifierModule:
    """``deployplug fit`` with the recipe's settings, minus checkpoints, loggers and export.

    ``trainer_options`` (``gradient_clip_val``, ...) and ``callbacks`` go to the Trainer.
    """
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True)
    module = lit_module(cfg, model, kwargs, lr)
    t = cfg["trainer"]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs,
                         deterministic=t.get("deterministic", True), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks),
                         **trainer_options)
    trainer.fit(module, datamodule=datamodule(cfg))
    return module


def load_checkpoint(cfg: dict[str, Any], model: str, kwargs: dict[str, Any],
                    path: Path) -> ClassifierModule:
    module = lit_module(cfg, model, kwargs)
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return module


def trained(cfg: dict[str, Any], args: argparse.Namespace, variant: str,
            seed: int) -> torch.nn.Module:
    kwargs = VARIANTS[variant]
    ckpt = args.checkpoint_plain if variant == "plain" else args.checkpoint_qa
    if ckpt is not None:
        return load_checkpoint(cfg, args.model, kwargs, ckpt).net.eval()
    lr = "" if args.lr is None else f"_lr{args.lr:g}"
    cache = args.work / f"{args.model}_{variant}_seed{seed}_e{args.epochs}{lr}.pt"
    module = lit_module(cfg, args.model, kwargs, args.lr)
    if cache.is_file():
        module.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
    else:
        started = time.perf_counter()
        module = train(cfg, args.model, kwargs, args.epochs, seed, args.lr)
        print(f"  trained {variant} seed {seed} in {time.perf_counter() - started:.0f} s",
              flush=True)
        torch.save(module.state_dict(), cache)
    return module.net.eval()


def batches(x: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def measure(net: torch.nn.Module, dm: DigitsDataModule, work: Path, tag: str,
            oracle: bool = False) -> dict[str, Any]:
    assert dm.train_set is not None and dm.val_set is not None
    calib = batches(dm.train_set.tensors[0][:CALIBRATION])
    xv, yv = dm.val_set.tensors
    val = batches(xv)
    with torch.no_grad():
        fp32 = float((net(xv).argmax(1) == yv).float().mean())

    with LoadProbe() as probe:
        started = time.perf_counter()
        report = int8_report(net, calib, weights="per_tensor")
        seconds = time.perf_counter() - started
    by_weight = sorted(report.layers, key=lambda r: -r.weight_max)[:5]
    runs = {
        "ptq_per_tensor": {"weights": "per_tensor"},
        "ptq_per_channel": {"weights": "per_channel"},
        "equalize_per_tensor": {"weights": "per_tensor", "repair": "equalize"},
        "report_top5_float": {"weights": "per_tensor", "repair": "keep_float",
                              "float_layers": report.ranking()[:5]},
        "weight_max_top5_float": {"weights": "per_tensor", "repair": "keep_float",
                                  "float_layers": [r.path for r in by_weight]},
        "measured_top5_float": {"weights": "per_tensor", "repair": "keep_float",
                                "float_layers": 5},
        "auto_per_tensor": {"weights": "per_tensor", "repair": "auto"},
    }
    results: dict[str, Any] = {"fp32_acc": fp32, "report_seconds": seconds,
                               "report_load_cores": probe.others,
                               "report_top5": report.ranking()[:5],
                               "weight_max_top5": [r.path for r in by_weight],
                               "report_text": str(report)}
    for name, options in runs.items():
        out = work / f"{tag}_{name}"
        manifest = dp.export(net, calib[0][:1], out, formats="onnx_int8", calibration=calib,
                             int8={"eval_inputs": val, "eval_labels": yv, **options},
                             strict=False)
        j = manifest.verification.judgements["onnx_int8"]
        info = manifest.formats["onnx_int8"]["info"]
        results[name] = {"acc": j["int8_accuracy"], "agreement": j["agreement"],
                         "drop": j["accuracy_drop"], "passed": j["passed"],
                         "repair": info["repair"], "float_layers": info["float_layers"]}
    if oracle:
        results["oracle_top5_float"] = oracle_top5(net, calib, xv, yv, work)
    drop = results["ptq_per_tensor"]["drop"]
    for name in ("report_top5_float", "weight_max_top5_float", "measured_top5_float",
                 "equalize_per_tensor"):
        results[name]["recovered"] = (None if not drop else
                                      (drop - results[name]["drop"]) / drop)
    return results


class Int8Files:
    """Per-tensor int8 files of one fused net with chosen layers kept in float.

    Each set of float layers is quantized (calibration ranges cached) and run once on every
    named input array; the class scores are kept per set.
    """

    def __init__(self, fused: torch.nn.Module, calib: list[torch.Tensor],
                 inputs: dict[str, np.ndarray], work: Path):
        from deployplug.onnx_model import load_checked
        from deployplug.quant.build import _export_fp32
        from deployplug.quant.calibration import collect_batches
        from deployplug.quant.ort_quant import scope_nodes

        self.batches = collect_batches(calib, None)
        self.work, self.inputs = work, inputs
        work.mkdir(exist_ok=True)
        self.fp32, self.names = _export_fp32(fused, self.batches.first_sample(), work,
                                             None, None)
        self.proto = load_checked(self.fp32)[0]
        self.layers = sorted(scope_nodes(self.proto))
        self.cache: dict[tuple[str, ...], dict[str, np.ndarray]] = {}

    def scores(self, keep: Sequence[str]) -> dict[str, np.ndarray]:
        """Class scores on each named input array, with the layers ``keep`` in float."""
        from deployplug.quant.ort_quant import nodes_for, quantize
        from deployplug.runtimes.onnxruntime import make_session

        key = tuple(sorted(keep))
        if key not in self.cache:
            out = self.work / "candidate.onnx"
            quantize(self.fp32, out, self.batches, self.names, per_channel=False,
                     exclude_nodes=nodes_for(self.proto, list(key)),
                     cache_path=self.work / "ranges")
            session = make_session(out)
            self.cache[key] = {name: session.run(None, {self.names[0]: x})[0]
                               for name, x in self.inputs.items()}
        return self.cache[key]


def oracle_top5(net: torch.nn.Module, calib: list[torch.Tensor], xv: torch.Tensor,
                yv: torch.Tensor, work: Path, pool: int = 12) -> dict[str, Any]:
    """Five float layers chosen by validation accuracy itself, which no method can do (it
    reads the answers), as a ceiling for the label-free rankings: picked greedily, and the
    best of every five-layer set among the ``pool`` layers that help most alone."""
    import deployplug as dp

    fused = dp.reparameterize(net)
    files = Int8Files(fused, calib, {"val": xv.numpy()}, work / "oracle")
    layers = files.layers
    labels = yv.numpy()

    def accuracy(keep: list[str]) -> float:
        return float((files.scores(keep)["val"].argmax(1) == labels).mean())

    with torch.no_grad():
        fp32_acc = float((fused(xv).argmax(1) == yv).float().mean())
    base = accuracy([])
    picked: list[str] = []
    for _ in range(5):
        scores = {p: accuracy([*picked, p]) for p in layers if p not in picked}
        picked.append(max(scores, key=lambda p: (scores[p], p)))
    best = accuracy(picked)
    alone = {p: accuracy([p]) for p in layers}
    candidates = sorted(layers, key=lambda p: (-alone[p], p))[:pool]
    search = max((accuracy(list(c)), c) for c in itertools.combinations(candidates, 5))
    drop = fp32_acc - base

    def share(acc: float) -> float | None:
        return None if drop <= 0 else (acc - base) / drop

    return {"layers": picked, "acc": best, "recovered": share(best),
            "exhaustive_layers": list(search[1]), "exhaustive_acc": search[0],
            "exhaustive_recovered": share(search[0]), "exhaustive_pool": pool}


def latency(work: Path, rounds: int) -> dict[str, Any]:
    """onnxruntime latency of RepVGG-A0 at 224, fp32 vs per-tensor int8 (same fused graph)."""
    import deployplug as dp
    from deployplug.quant.build import _export_fp32
    from deployplug.quant.calibration import collect_batches
    from deployplug.quant.ort_quant import quantize

    torch.manual_seed(0)
    fused = dp.reparameterize(dp.models.build("repvgg_a0"))
    calib = collect_batches([torch.randn(4, 3, 224, 224) for _ in range(2)], None)
    directory = work / "latency"
    directory.mkdir(exist_ok=True)
    fp32_path, names = _export_fp32(fused, calib.first_sample(), directory, None, None)
    int8_path = directory / "model_int8.onnx"
    quantize(fp32_path, int8_path, calib, names, per_channel=False)
    x = {names[0]: torch.randn(1, 3, 224, 224).numpy()}
    sessions = {"fp32": ort_session(fp32_path, log_severity=3),
                "int8": ort_session(int8_path, log_severity=3)}
    fns = {k: (lambda s=s: s.run(None, x)) for k, s in sessions.items()}
    res = interleaved(fns, rounds=rounds, warmup=3, max_load=0.5, attempts=2,
                      quiet_timeout_s=60.0)
    return {"int8_over_fp32": ratio_text(res, "int8", "fp32"), "load": res.load_text(),
            "fp32_ms": sorted(res.times["fp32"])[len(res.times["fp32"]) // 2] * 1e3,
            "int8_ms": sorted(res.times["int8"])[len(res.times["int8"]) // 2] * 1e3}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def summary(seed: int, variant: str, r: dict[str, Any]) -> str:
    lines = [f"seed {seed} {variant}: fp32 {_pct(r['fp32_acc'])} %, report "
             f"{r['report_seconds']:.1f} s (others used {r['report_load_cores']:.2f} cores)"]
    for name in ("ptq_per_tensor", "ptq_per_channel", "equalize_per_tensor",
                 "report_top5_float", "weight_max_top5_float", "measured_top5_float",
                 "auto_per_tensor"):
        x = r[name]
        extra = f", recovered {_pct(x['recovered'])} %" if x.get("recovered") is not None else ""
        lines.append(f"  {name:<22} acc {_pct(x['acc'])} %  drop {_pct(x['drop'])} pts  "
                     f"agreement {_pct(x['agreement'])} %  repair {x['repair']}{extra}")
    if "oracle_top5_float" in r:
        o = r["oracle_top5_float"]
        lines.append(f"  oracle_top5_float      acc {_pct(o['acc'])} %  recovered "
                     f"{_pct(o['recovered'])} %  ({', '.join(o['layers'])})")
        lines.append(f"  best 5 of top {o['exhaustive_pool']}        acc "
                     f"{_pct(o['exhaustive_acc'])} %  recovered "
                     f"{_pct(o['exhaustive_recovered'])} %  "
                     f"({', '.join(o['exhaustive_layers'])})")
    lines.append(f"  report top-5: {', '.join(r['report_top5'])}")
    lines.append(f"  largest-weight top-5: {', '.join(r['weight_max_top5'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=None,
                        help="override the recipe's learning rate, for both variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "deployplug-int8-recipe")
    parser.add_argument("--checkpoint-plain", type=Path)
    parser.add_argument("--checkpoint-qa", type=Path)
    parser.add_argument("--latency-rounds", type=int, default=30)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--oracle", action="store_true",
                        help="also choose five float layers by validation accuracy itself, "
                             "greedily and by trying every five-layer set among the 12 layers "
                             "that help most alone (a ceiling for label-free rankings; slow)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own); on busy shared "
                             "cores 1 is faster than 2 for this model size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = recipe(args.config)
    dm = datamodule(cfg)
    results: dict[str, Any] = {"runs": {}, "threads": torch.get_num_threads(), "lr": args.lr}
    for seed in args.seeds:
        for variant in args.variants:
            net = trained(cfg, args, variant, seed)
            scratch = Path(tempfile.mkdtemp(prefix="int8-", dir=args.work))
            r = measure(net, dm, scratch, f"{variant}_s{seed}", args.oracle)
            results["runs"][f"{variant}/seed{seed}"] = r
            print(summary(seed, variant, r), flush=True)
    if not args.skip_latency:
        results["latency"] = latency(Path(tempfile.mkdtemp(dir=args.work)),
                                     args.latency_rounds)
        print(f"onnxruntime RepVGG-A0 1x3x224x224, int8 / fp32 latency: "
              f"{results['latency']['int8_over_fp32']} ({results['latency']['load']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
