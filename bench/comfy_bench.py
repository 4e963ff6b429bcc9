"""Shared set-up of the benchmarks that run inside ComfyUI's python: random checkpoints, ComfyUI, the pack."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = str(REPO / ".comfyui" / "ComfyUI")


def random_checkpoints(kinds, cache, comfyui: str) -> dict:
    """{kind: path} of full-size random-weight checkpoints ("sd15", "zero123") in the real single-file
    formats, written once into ``cache`` (a temp dir when None)."""
    sys.path.insert(0, str(REPO / "tests"))
    from harness.checkpoints import write_sd15_checkpoint, write_stable_zero123_checkpoint
    writers = {"sd15": write_sd15_checkpoint, "zero123": write_stable_zero123_checkpoint}
    folder = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="mpod3d-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in sorted(set(kinds)):
        path = folder / f"random_{kind}.safetensors"
        if not path.is_file():
            t0 = time.perf_counter()
            writers[kind](path, comfyui=comfyui, python=sys.executable)
            print(f"wrote {path.name} in {time.perf_counter() - t0:.1f} s")
        files[kind] = path
    return files


def start_comfyui(comfyui: str) -> None:
    """Make ComfyUI importable on the CPU, as ``main.py --cpu`` would."""
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfyui)
    import comfy.options
    comfy.options.enable_args_parsing()


def import_pack(name: str = "comfyui_mpod3d_bench") -> str:
    """Import the pack as ComfyUI does (a package named after its folder); returns the package name."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return name


def pack_module(relative: str):
    """A module of the pack, e.g. ``pack_module("nodes.comfy_bridge.diffusion")``."""
    return importlib.import_module(f"{import_pack()}.{relative}")
