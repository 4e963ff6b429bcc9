#!/usr/bin/env bash
# Build the test environment (scripts/setup.sh --test), then run the whole
# suite with the venv's python. Integration and browser tests FAIL here,
# instead of skipping, when ComfyUI or Chromium is missing. Slow tests run
# too; --durations=25 lists the slowest at the end of the log (see tests/README.md
# for the developer loop without them: pytest tests -m "not slow and not comfyui").
#
# Usage: bash scripts/test.sh [pytest arguments...]
#   e.g. bash scripts/test.sh tests/unit -x
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh" --test

PY="${PYTHON:-$REPO/.venv/bin/python}"
export MPOD3D_REQUIRE_COMFYUI=1
export MPOD3D_REQUIRE_BROWSER=1
cd "$REPO"
echo "[test] $PY -m pytest --durations=25 ${*:-tests}"
if [ "$#" -gt 0 ]; then
  exec "$PY" -m pytest --durations=25 "$@"
fi
exec "$PY" -m pytest --durations=25 tests
