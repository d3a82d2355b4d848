#!/usr/bin/env bash
# Set everything up from scratch (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
"$VENV/bin/ruff" check deployplug tests scripts
# the import contract in pyproject.toml ([tool.importlinter]): imports run one way
"$VENV/bin/lint-imports"
# static types ([tool.mypy] in pyproject.toml)
"$VENV/bin/mypy"
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout=900 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
