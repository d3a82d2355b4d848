"""End-to-end export time: RepVGG-A0 to ONNX + Caffe + MsnhNet, fused, written and verified.

One export captures each target-legal model once (``torch.export`` is the slowest step) and
makes one CPU copy of the model. This script times the whole ``dp.export`` call and, in the
same run, its stages, so a regression shows where it came from:

    python scripts/bench_export.py [--rounds 5] [--threads 2]

Printed: median and quartiles of the full export, the number of ``torch.export`` captures
one export makes, and the median time of each stage measured on its own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import deployplug as dp
from deployplug import capture as capture_module
from deployplug.pipeline import deploy_copy

FORMATS = ("onnx", "caffe", "msnhnet")


def _median_ms(times: list[float]) -> str:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return f"{statistics.median(times) * 1e3:8.0f} ms  (p25 {q[0] * 1e3:.0f}, p75 {q[2] * 1e3:.0f})"


def _count_captures(run) -> int:
    calls = 0
    real = capture_module.export_program

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    capture_module.export_program = counting
    try:
        run()
    finally:
        capture_module.export_program = real
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dp.models.build("repvgg_a0", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    root = Path(tempfile.mkdtemp(prefix="bench-export-"))

    def export(i: int) -> None:
        dp.export(model, x, root / f"e{i}", formats=FORMATS)

    export(-1)  # warm-up: imports, onnxruntime and OpenCV initialisation
    captures = _count_captures(lambda: export(-2))
    totals = []
    for i in range(args.rounds):
        start = time.perf_counter()
        export(i)
        totals.append(time.perf_counter() - start)

    stages: dict[str, list[float]] = {"deploy copy": [], "fuse (with self-check)": [],
                                      "one torch.export capture": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        copy = deploy_copy(model)
        stages["deploy copy"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fused = dp.reparameterize(copy, inplace=True, example_input=x)
        stages["fuse (with self-check)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        capture_module.capture(fused, (x,))
        stages["one torch.export capture"].append(time.perf_counter() - start)

    print(f"RepVGG-A0 1x3x224x224 -> {', '.join(FORMATS)}, verified; "
          f"{args.threads} threads, {args.rounds} rounds")
    print(f"  full export            {_median_ms(totals)}   goal <= 1500 ms")
    print(f"  torch.export captures per export: {captures}")
    for name, times in stages.items():
        print(f"  {name:<23}{_median_ms(times)}")


if __name__ == "__main__":
    main()
