#!/usr/bin/env bash
# Set everything up from scratch (idempotent), train the digits demo with the DeployCallback,
# and print a summary: PyTorch vs ONNX accuracy, top-1 agreement, worst error, artifact paths.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
RUN_DIR="runs/repvgg_digits"
rm -rf "$RUN_DIR"
"$VENV/bin/deployplug" fit --config configs/repvgg_digits.yaml
"$VENV/bin/python" scripts/demo_summary.py "$RUN_DIR"
