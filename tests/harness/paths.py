"""Where things are: the repository, the ComfyUI tree, the python that runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The pack repository (= the pack folder)."""

PACK_LINK_NAME = "comfyui-mpod3d"
"""Name under which the pack is linked into a custom_nodes folder."""

WORKFLOWS_DIR = REPO_ROOT / "workflows"
TEST_WORKFLOWS_DIR = REPO_ROOT / "tests" / "data" / "workflows"
ARTIFACTS_DIR = REPO_ROOT / "artifacts"


def find_comfyui() -> Path | None:
    """The ComfyUI tree to run: ``$COMFYUI_PATH``, else the embedded
    ``<repo>/.comfyui/ComfyUI``. None when neither holds a ``main.py``."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env).expanduser()] if env else [REPO_ROOT / ".comfyui" / "ComfyUI"]
    for c in candidates:
        if (c / "main.py").is_file():
            return c.resolve()
    return None


def find_python() -> str:
    """The interpreter that runs ComfyUI: ``$PYTHON``, else the repo's venv,
    else the interpreter running the tests."""
    env = os.environ.get("PYTHON")
    if env:
        return env
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    return sys.executable


def python_missing_modules(python: str, modules=("torch", "aiohttp", "yaml", "PIL", "numpy")) -> list[str]:
    """Modules ComfyUI needs that ``python`` cannot find (cheap: find_spec only).
    Returns ``["<python>: not runnable"]`` when the interpreter itself fails."""
    code = (
        "import importlib.util, sys\n"
        f"mods = {list(modules)!r}\n"
        "print(' '.join(m for m in mods if importlib.util.find_spec(m) is None))\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"{python}: not runnable ({e})"]
    if out.returncode != 0:
        return [f"{python}: not runnable ({out.stderr.strip()[-300:]})"]
    return out.stdout.split()
