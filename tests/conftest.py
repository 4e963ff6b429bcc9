"""Shared test setup.

* puts ``tests/`` on sys.path so ``import harness`` works;
* marks tests under ``integration/`` with ``comfyui`` and under ``browser/``
  with ``browser`` and ``comfyui``;
* the session fixture ``comfy_server``: ONE real ComfyUI server per test
  session, shared by the integration and the browser tests.

Environment:
    COMFYUI_PATH   a ComfyUI tree to use instead of <repo>/.comfyui/ComfyUI
    PYTHON         the interpreter that runs it (default <repo>/.venv/bin/python)
    MPOD3D_REQUIRE_COMFYUI=1  fail (not skip) when no ComfyUI can be run
    MPOD3D_REQUIRE_BROWSER=1  fail (not skip) when Chromium/Playwright are missing
    MPOD3D_KEEP_SERVER_DIR=1  keep the server's temporary base directory
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from harness.comfy_server import ComfyServer, ComfyServerError  # noqa: E402
from harness.paths import REPO_ROOT, find_comfyui, find_python, python_missing_modules  # noqa: E402
from harness.require import require_or_skip  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS_DIR).parts
        if parts and parts[0] == "integration":
            item.add_marker(pytest.mark.comfyui)
        elif parts and parts[0] == "browser":
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(scope="session")
def comfy_server():
    """A running ComfyUI (CPU, temporary base dir) with this pack loaded."""
    comfy = find_comfyui()
    if comfy is None:
        require_or_skip(
            "MPOD3D_REQUIRE_COMFYUI",
            "no ComfyUI found: run `bash scripts/setup.sh` or set COMFYUI_PATH "
            f"(looked for {REPO_ROOT / '.comfyui' / 'ComfyUI' / 'main.py'})")
    python = find_python()
    missing = python_missing_modules(python)
    if missing:
        require_or_skip(
            "MPOD3D_REQUIRE_COMFYUI",
            f"the python for ComfyUI ({python}) lacks {missing}: run `bash scripts/setup.sh` or set PYTHON")
    server = ComfyServer(comfy, python)
    try:
        server.start()
    except ComfyServerError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("torch_one_thread")``):
    tiny models run 5-50x faster on one thread than on two when the other core is busy."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
