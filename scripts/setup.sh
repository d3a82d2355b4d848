#!/usr/bin/env bash
# Create .venv (if needed) and install deployplug with its test tools.
# torch is pinned through constraints.txt on every pip call: a bare "torch" requirement on
# an empty venv would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip_install() {
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt "$@" \
        2>&1 | { grep -v -E "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
pip_install torch==2.13.0
pip_install -e ".[test]"
"$VENV/bin/python" - <<'PY'
import cv2, onnxruntime, pytorch_lightning, torch
assert hasattr(cv2.dnn, "readNetFromCaffe"), "opencv-python-headless<5 is required"
print(f"environment ready: torch {torch.__version__}, lightning {pytorch_lightning.__version__}, "
      f"onnxruntime {onnxruntime.__version__}, opencv {cv2.__version__}")
PY
