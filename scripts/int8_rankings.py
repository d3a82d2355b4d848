"""Which label-free ranking picks the five float layers that recover most of the int8 drop.

For one trained RepVGG-A0 of the digits recipe (a ``deployplug fit`` checkpoint, or trained
here from a seed), every layer of the fused net is kept in float once, alone, in a real
per-tensor int8 file (onnxruntime static QDQ, 256 training images calibrate); each file is
scored against fp32 on the calibration images by three label-free measures:

* ``kl``: mean KL divergence of the class scores (what ``keep_float`` by count uses);
* ``mse``: squared error of the scores, relative to their power;
* ``disagree``: share of changed top-1 decisions.

For each measure, two rankings: the five best layers alone, and five picked greedily (each
together with those already picked, as ``keep_float`` does). Each set of five is then judged
by how much of the per-tensor accuracy drop on the labelled validation split it recovers,
next to the five that help most alone by validation accuracy itself (which reads the
labels, so no method can use it).

    python scripts/int8_rankings.py --checkpoint runs/.../last.ckpt
    python scripts/int8_rankings.py --seed 1 [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_recipe import (  # noqa: E402
    CALIBRATION,
    CONFIG,
    Int8Files,
    batches,
    datamodule,
    load_checkpoint,
    recipe,
    train,
)

import deployplug as dp  # noqa: E402
from deployplug.quant.build import _kl  # noqa: E402  (the measure keep_float ranks by)

PICKS = 5


def measures(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Label-free distances of int8 class scores from the fp32 ones (lower is closer)."""
    return {
        "kl": _kl(scores, reference),
        "mse": float(((scores - reference) ** 2).mean() / (reference ** 2).mean()),
        "disagree": float((scores.argmax(1) != reference.argmax(1)).mean()),
    }


def greedy(layers: list[str], score: Callable[[list[str]], float]) -> list[str]:
    picked: list[str] = []
    for _ in range(PICKS):
        scores = {p: score([*picked, p]) for p in layers if p not in picked}
        picked.append(min(scores, key=lambda p: (scores[p], p)))
    return picked


def compare(net: torch.nn.Module, work: Path) -> None:
    cfg = recipe(CONFIG)
    dm = datamodule(cfg)
    assert dm.train_set is not None and dm.val_set is not None
    calib = batches(dm.train_set.tensors[0][:CALIBRATION])
    xv, yv = dm.val_set.tensors
    fused = dp.reparameterize(net)
    xc = torch.cat(calib)
    files = Int8Files(fused, calib, {"calib": xc.numpy(), "val": xv.numpy()}, work)
    with torch.no_grad():
        reference = fused(xc).numpy()
        fp32_acc = float((fused(xv).argmax(1) == yv).float().mean())
    labels = yv.numpy()

    def accuracy(keep: list[str]) -> float:
        return float((files.scores(keep)["val"].argmax(1) == labels).mean())

    def closeness(keep: list[str]) -> dict[str, float]:
        return measures(files.scores(keep)["calib"], reference)

    base = accuracy([])
    drop = fp32_acc - base
    print(f"fp32 {100 * fp32_acc:.1f} %, per-tensor int8 {100 * base:.1f} % "
          f"(drop {100 * drop:.1f} pts, {round(drop * len(labels))} of {len(labels)} images)")
    if drop <= 0:
        print("no drop to recover")
        return
    alone = {p: closeness([p]) for p in files.layers}
    picks: dict[str, list[str]] = {}
    for key in ("kl", "mse", "disagree"):
        picks[f"{key}, alone"] = sorted(files.layers, key=lambda p: (alone[p][key], p))[:PICKS]
        picks[f"{key}, greedy"] = greedy(files.layers,
                                         lambda keep, key=key: closeness(keep)[key])
    by_accuracy = {p: accuracy([p]) for p in files.layers}
    picks["validation accuracy, alone (reads labels)"] = sorted(
        files.layers, key=lambda p: (-by_accuracy[p], p))[:PICKS]
    for name, layers in picks.items():
        recovered = (accuracy(layers) - base) / drop
        print(f"  {name:<44} recovers {100 * recovered:5.1f} %  ({', '.join(layers)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a .ckpt of a deployplug fit run")
    source.add_argument("--seed", type=int, help="train the recipe here with this seed")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = recipe(CONFIG)
    if args.checkpoint is not None:
        net = load_checkpoint(cfg, "repvgg_a0", {}, args.checkpoint).net.eval()
    else:
        net = train(cfg, "repvgg_a0", {}, args.epochs, args.seed, None).net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        compare(net, Path(tmp))


if __name__ == "__main__":
    main()
