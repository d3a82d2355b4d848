"""How stable training is decides both INT8 numbers of the digits recipe: a measurement.

Trains RepVGG-A0 on the digits recipe (``configs/repvgg_digits.yaml``, 6 epochs) with plain
and with quant-friendly (QARepVGG) blocks, under the recipe as written and under variants of
it that only change how gently the first steps go (learning rate, warm-up, gradient
clipping, epochs), for several seeds. For every run it prints:

* fp32 accuracy on the validation split, and on the training split (underfitting shows here);
* the accuracy drop of plain per-tensor post-training quantization (onnxruntime static QDQ,
  256 training images calibrate), the number the quant-friendly block is meant to shrink;
* the largest ``gamma / sigma`` of an identity-branch BatchNorm (plain block), the factor
  that lands on a fused kernel's centre tap;
* the largest training loss after the warm-up, which shows the loss spikes.

    python scripts/int8_stability.py [--seeds 0 1 2] [--variants recipe clip1 warmup1]
                                     [--threads 1] [--json out.json]

Each variant trains both blocks from the same seeds, so the pairs are comparable; every
figure comes from this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_recipe import CALIBRATION, CONFIG, batches, datamodule, recipe, train  # noqa: E402

import deployplug as dp  # noqa: E402
from deployplug.blocks import RepVGGBlock  # noqa: E402

#: recipe variants: keyword changes to the recipe's module (lr, warmup_epochs) and trainer
#: (gradient_clip_val, max_epochs) settings
RECIPES: dict[str, dict[str, Any]] = {
    "recipe": {},
    "lr0.02": {"lr": 0.02},
    "warmup1": {"warmup_epochs": 1.0},
    "warmup2": {"warmup_epochs": 2.0},
    "clip1": {"gradient_clip_val": 1.0},
    "epochs15": {"max_epochs": 15},
}
BLOCKS = {"plain": {}, "quant_friendly": {"quant_friendly": True}}
TRAINER_KEYS = ("gradient_clip_val", "max_epochs")
EPOCHS = 6  # the digits recipe's length for RepVGG-A0 (README, INT8)


def train_logged(cfg: dict[str, Any], changes: dict[str, Any], block: str, seed: int,
                 losses: list[float]) -> torch.nn.Module:
    """:func:`int8_recipe.train` under the variant's ``changes``, appending each step's loss."""
    import pytorch_lightning as pl

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss))

    module_changes = {k: v for k, v in changes.items() if k not in TRAINER_KEYS}
    local = dict(cfg, model=dict(cfg["model"], init_args={**cfg["model"]["init_args"],
                                                          **module_changes}))
    module = train(local, "repvgg_a0", BLOCKS[block], changes.get("max_epochs", EPOCHS), seed,
                   None, callbacks=[Record()],
                   gradient_clip_val=changes.get("gradient_clip_val"))
    return module.net.eval()


@torch.no_grad()
def largest_identity_scale(net: torch.nn.Module) -> float | None:
    scales = [float((bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max())
              for block in net.modules() if isinstance(block, RepVGGBlock)
              for bn in [block.identity] if isinstance(bn, torch.nn.BatchNorm2d)]
    return max(scales) if scales else None


def measure(net: torch.nn.Module, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    dm = datamodule(cfg)
    assert dm.train_set is not None and dm.val_set is not None
    xt, yt = dm.train_set.tensors
    xv, yv = dm.val_set.tensors
    with torch.no_grad():
        fp32 = float((net(xv).argmax(1) == yv).float().mean())
        train_acc = float((net(xt).argmax(1) == yt).float().mean())
    calib = batches(xt[:CALIBRATION])
    manifest = dp.export(net, calib[0][:1], work, formats="onnx_int8", calibration=calib,
                         int8={"weights": "per_tensor", "eval_inputs": batches(xv),
                               "eval_labels": yv}, strict=False)
    judged = manifest.verification.judgements["onnx_int8"]
    return {"fp32": fp32, "train": train_acc, "ptq_drop": judged["accuracy_drop"],
            "identity_scale": largest_identity_scale(net)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = recipe(CONFIG)
    recipe_warmup = float(cfg["model"]["init_args"].get("warmup_epochs", 0.0))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            for block in BLOCKS:
                rows = []
                for seed in args.seeds:
                    losses: list[float] = []
                    net = train_logged(cfg, RECIPES[name], block, seed, losses)
                    row = measure(net, cfg, Path(tmp) / f"{name}_{block}_{seed}")
                    steps_per_epoch = len(losses) // RECIPES[name].get("max_epochs", EPOCHS)
                    warm = int(RECIPES[name].get("warmup_epochs", recipe_warmup) * steps_per_epoch)
                    row["seed"] = seed
                    row["largest_loss_after_warmup"] = max(losses[warm + 1:])
                    rows.append(row)
                    scale = row["identity_scale"]
                    print(f"{name:9s} {block:14s} seed {seed}: fp32 {100 * row['fp32']:.1f} % "
                          f"(train {100 * row['train']:.1f} %), per-tensor PTQ drop "
                          f"{100 * row['ptq_drop']:+.1f} pts, largest loss after warm-up "
                          f"{row['largest_loss_after_warmup']:.2f}"
                          + ("" if scale is None else f", identity-BN scale {scale:.1f}"),
                          flush=True)
                results[f"{name}/{block}"] = rows
            print(summary_line(name, results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def summary_line(name: str, results: dict[str, Any]) -> str:
    plain, qa = results[f"{name}/plain"], results[f"{name}/quant_friendly"]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return 100 * statistics.fmean(r[key] for r in rows)

    # the quant-friendly block may not cost more than a point; being better is fine
    within = sum(q["fp32"] >= p["fp32"] - 0.01 - 1e-9 for p, q in zip(plain, qa, strict=True))
    small = sum(q["ptq_drop"] <= 0.01 + 1e-9 for q in qa)
    return (f"{name}: fp32 plain {mean(plain, 'fp32'):.1f} % / quant-friendly "
            f"{mean(qa, 'fp32'):.1f} % (at most 1 point below in {within} of {len(qa)} seeds); "
            f"mean per-tensor drop plain {mean(plain, 'ptq_drop'):.1f} / quant-friendly "
            f"{mean(qa, 'ptq_drop'):.1f} pts (quant-friendly within 1 point in {small} of "
            f"{len(qa)})")


if __name__ == "__main__":
    main()
