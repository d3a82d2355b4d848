"""Summarize a finished demo run: accuracy of PyTorch vs the exported model, and the files.

Usage: python scripts/demo_summary.py RUN_DIR
Reads the DeployCallback's final manifest and the metrics the CSV logger recorded.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from deployplug.manifest import load_manifest


def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every column (CSVLogger writes one row per log call)."""
    values: dict[str, float] = {}
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def main(run_dir: str) -> int:
    root = Path(run_dir)
    manifests = sorted(root.rglob("deploy/final/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        print(f"no deploy/final/manifest.json under {root}: did the fit finish?")
        return 1
    manifest = load_manifest(manifests[-1].parent)
    metrics_files = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    metrics = last_values(metrics_files[-1]) if metrics_files else {}

    def pct(key: str) -> str:
        return f"{100 * metrics[key]:.2f} %" if key in metrics else "n/a"

    print("\n=== deployplug digits demo ===")
    rows = [
        ("validation accuracy, PyTorch (trained multi-branch model)", "deploy/torch/val_acc"),
        ("validation accuracy, ONNX (fused, in onnxruntime)", "deploy/onnx/val_acc"),
        ("top-1 agreement ONNX vs PyTorch on the validation set", "deploy/onnx/val_agreement"),
    ]
    for label, key in rows:
        print(f"{label:<58} {pct(key)}")
    for fmt in manifest.formats:
        err = manifest.verification.max_error(fmt) if manifest.verification else float("nan")
        print(f"{fmt}: max normalized error vs PyTorch {err:.2e}, "
              f"verified: {'yes' if manifest.passed else 'NO'}")
    print("artifacts:")
    for entry in manifest.files + [{"name": "manifest.json"}]:
        print(f"  {manifest.dir / entry['name']}")
    return 0 if manifest.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/repvgg_digits"))
