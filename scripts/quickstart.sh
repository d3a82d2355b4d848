#!/usr/bin/env bash
# Set everything up from scratch (idempotent), train the digits demo with the DeployCallback,
# and print a summary: a row per exported format (ONNX, Caffe, MsnhNet) with verification,
# worst error, validation accuracy, top-1 agreement with PyTorch and files.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
# Each run adds a new logs/version_N (nothing earlier is deleted); the summary reads the newest.
RUN_DIR="runs/repvgg_digits"
"$VENV/bin/deployplug" fit --config configs/repvgg_digits.yaml
"$VENV/bin/python" scripts/demo_summary.py "$RUN_DIR"
