"""glTF validation with the Khronos glTF validator (npm ``gltf-validator``,
installed into tests/node_modules by ``scripts/setup.sh --test``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("validate_gltf.mjs")
NODE_MODULES = TESTS_DIR / "node_modules"


class GltfValidatorUnavailable(RuntimeError):
    """node or the gltf-validator package is missing."""


def validator_unavailable_reason() -> str | None:
    if shutil.which(os.environ.get("NODE", "node")) is None:
        return "node is not installed"
    if not (NODE_MODULES / "gltf-validator" / "package.json").is_file():
        return f"gltf-validator is not installed in {NODE_MODULES} (cd tests && npm ci)"
    return None


def validate_gltf(path, max_issues: int = 200, timeout: float = 120.0) -> dict:
    """Validate a .glb (or .gltf) file; returns the validator's report.

    The report is the Khronos validator's JSON: ``report["issues"]`` has
    ``numErrors``, ``numWarnings``, ``numInfos``, ``numHints`` and
    ``messages`` (each with ``code``, ``message``, ``severity`` (0 = error),
    ``pointer``/``offset``); ``report["info"]`` summarises the asset
    (``drawCallCount``, ``totalVertexCount``, ``totalTriangleCount``, ...).

    Raises:
        GltfValidatorUnavailable: node or the npm package is missing.
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the validator could not run on the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    reason = validator_unavailable_reason()
    if reason:
        raise GltfValidatorUnavailable(reason + "; run `bash scripts/setup.sh --test`")
    proc = subprocess.run(
        [os.environ.get("NODE", "node"), str(SCRIPT), str(path), str(max_issues)],
        capture_output=True, text=True, timeout=timeout, cwd=str(TESTS_DIR),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gltf-validator failed on {path} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def error_messages(report: dict) -> list[str]:
    """The report's error-severity messages as ``"CODE at POINTER: text"``."""
    out = []
    for m in (report.get("issues") or {}).get("messages") or []:
        if m.get("severity") == 0:
            where = m.get("pointer") or m.get("offset") or ""
            out.append(f"{m.get('code')} at {where}: {m.get('message')}")
    return out
