"""Integration tests: a real ComfyUI server (the session fixture
``comfy_server`` from tests/conftest.py) with the pack loaded. Every test
here carries the ``comfyui`` marker (added in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

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


def _random_checkpoint(comfy_server, name: str, writer) -> str:
    """Write (or reuse) a random-weight checkpoint in the server's
    ``models/checkpoints`` and return its file name for the loader widget.

    ``MPOD3D_CHECKPOINT_CACHE=<dir>`` keeps the files between sessions (they
    are linked into the server's folder); otherwise each session writes them."""
    import os

    target = comfy_server.models_dir / "checkpoints" / name
    if target.exists():
        return name
    cache = os.environ.get("MPOD3D_CHECKPOINT_CACHE")
    if cache:
        cached = Path(cache) / name
        if not cached.is_file():
            writer(cached)
        target.symlink_to(cached.resolve())
    else:
        writer(target)
    return name


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_server) -> str:
    """File name (under models/checkpoints) of a random-weight SD 1.5 checkpoint."""
    from harness.checkpoints import write_sd15_checkpoint
    return _random_checkpoint(comfy_server, "mpod3d_random_sd15.safetensors", write_sd15_checkpoint)


@pytest.fixture(scope="session")
def zero123_checkpoint(comfy_server) -> str:
    """File name (under models/checkpoints) of a random-weight Stable Zero123 checkpoint."""
    from harness.checkpoints import write_stable_zero123_checkpoint
    return _random_checkpoint(comfy_server, "mpod3d_random_stable_zero123.safetensors",
                              write_stable_zero123_checkpoint)


@pytest.fixture(scope="session")
def sd15_inpaint_checkpoint(comfy_server, sd15_checkpoint) -> str:
    """File name (under models/checkpoints) of a random-weight SD 1.5 inpainting checkpoint (9-channel UNet
    input; CheckpointLoaderSimple loads it as an inpainting model), made from the random SD 1.5 file by
    widening its UNet's input convolution (a copy, not a second minute-long fill)."""
    from harness.checkpoints import write_sd15_inpaint_checkpoint
    base = (comfy_server.models_dir / "checkpoints" / sd15_checkpoint).resolve()
    return _random_checkpoint(comfy_server, "mpod3d_random_sd15_inpaint.safetensors",
                              lambda path: write_sd15_inpaint_checkpoint(path, base=base))
