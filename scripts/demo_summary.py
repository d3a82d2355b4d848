"""Summarize a finished demo run: one row per exported format, next to PyTorch.

Usage: python scripts/demo_summary.py RUN_DIR
Reads the DeployCallback's final manifest (verification: verified, worst normalized error,
files) and the validation-parity metrics the CSV logger recorded (accuracy of each format
on the validation split, top-1 agreement with PyTorch).
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


def pct(metrics: dict[str, float], key: str) -> str:
    return f"{100 * metrics[key]:.2f} %" if key in metrics else "n/a"


def rows(manifest, metrics: dict[str, float], prefix: str = "deploy") -> list[list[str]]:
    """One row per format: format, target, verified, max error, val acc, agreement, files."""
    report = manifest.verification
    out = []
    for fmt, record in manifest.formats.items():
        verified = "n/a" if report is None else ("yes" if report.format_passed(fmt) else "NO")
        error = "n/a" if report is None else f"{report.max_error(fmt):.2e}"
        out.append([fmt, str(record["target"]), verified, error,
                    pct(metrics, f"{prefix}/{fmt}/val_acc"),
                    pct(metrics, f"{prefix}/{fmt}/val_agreement"),
                    ", ".join(record["files"])])
    return out


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    return "\n".join(lines)


def main(run_dir: str) -> int:
    root = Path(run_dir)
    manifests = sorted(root.rglob("deploy/final/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        print(f"no deploy/final/manifest.json under {root}: did the fit finish?")
        return 1
    manifest = load_manifest(manifests[-1].parent)
    metrics_files = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    metrics = last_values(metrics_files[-1]) if metrics_files else {}

    print("\n=== deployplug digits demo ===")
    print(f"PyTorch (trained multi-branch model), validation accuracy: "
          f"{pct(metrics, 'deploy/torch/val_acc')}")
    header = ["format", "target", "verified", "max error", "val acc", "agreement", "files"]
    print(table(header, rows(manifest, metrics)))
    print("(max error: worst normalized error max|a-b|/max|ref| in verification; agreement: "
          "top-1 equal to PyTorch over the validation split)")
    print(f"artifacts in {manifest.dir}")
    return 0 if manifest.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/repvgg_digits"))
