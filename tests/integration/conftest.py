"""Integration tests: a real ComfyUI server (the session fixture
``comfy_server`` from tests/conftest.py) with the pack loaded. Every test
here carries the ``comfyui`` marker (added in tests/conftest.py)."""

from __future__ import annotations

import json

import pytest

from harness.paths import WORKFLOWS_DIR


@pytest.fixture
def load_workflow():
    """``load_workflow(name)`` -> the UI-format JSON of ``workflows/<name>``
    (``.json`` may be left out)."""

    def _load(name: str) -> dict:
        path = WORKFLOWS_DIR / name
        if path.suffix != ".json":
            path = path.with_name(path.name + ".json")
        if not path.is_file():
            available = sorted(p.name for p in WORKFLOWS_DIR.glob("*.json"))
            raise FileNotFoundError(f"no workflow {path}; available: {available}")
        return json.loads(path.read_text())

    return _load
