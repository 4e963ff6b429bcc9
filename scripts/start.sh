#!/usr/bin/env bash
# Start ComfyUI with this pack on http://127.0.0.1:8188 (PORT overrides),
# after scripts/setup.sh has built (or checked) everything it needs.
#
# Usage: bash scripts/start.sh [extra ComfyUI arguments...]
# Env:   PORT=8188  LISTEN=127.0.0.1
#        COMFYUI_PATH=/path/to/ComfyUI  run your own ComfyUI (its own models,
#                                       input and output folders) with the pack
#        PYTHON=/path/to/python         the interpreter for it (default <repo>/.venv)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"

STATE="$REPO/.comfyui"
PY="${PYTHON:-$REPO/.venv/bin/python}"
PORT="${PORT:-8188}"
LISTEN="${LISTEN:-127.0.0.1}"

ARGS=(--listen "$LISTEN" --port "$PORT" --extra-model-paths-config "$STATE/extra_model_paths.yaml")
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
else
  COMFY="$STATE/ComfyUI"
  # The embedded tree keeps its files in .comfyui/base (models/, input/,
  # output/, user/), its database included.
  ARGS+=(--base-directory "$STATE/base" --database-url "sqlite:///$STATE/base/user/comfyui.db")
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  ARGS+=(--cpu)
fi

cd "$COMFY"
echo "[start] ComfyUI $COMFY with the pack, on http://$LISTEN:$PORT"
exec "$PY" main.py "${ARGS[@]}" "$@"
