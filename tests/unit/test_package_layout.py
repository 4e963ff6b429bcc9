"""The pack is imported by ComfyUI under its folder name (e.g. ``comfyui-mpod3d``),
so the library must import itself relatively and the package must import
without ComfyUI; the core must never import ComfyUI."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMFY_IMPORT = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|comfy_api|folder_paths|server|nodes)\b", re.M)


PROBE = """
import importlib, importlib.util, pkgutil, sys
spec = importlib.util.spec_from_file_location("comfyui-mpod3d-probe", {init!r},
                                              submodule_search_locations=[{repo!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
assert pack.WEB_DIRECTORY == "./web/js" and callable(pack.comfy_entrypoint)
core = importlib.import_module(spec.name + ".mpod_core")
names = [m.name for m in pkgutil.walk_packages(core.__path__, core.__name__ + ".")]
assert names, "no core modules found"
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_core_imports_under_the_pack_folder_name(tmp_path):
    # A fresh interpreter in another folder, without the repo on sys.path: an absolute
    # `import mpod_core...` inside the library fails there, as it would in ComfyUI.
    code = PROBE.format(init=str(REPO / "__init__.py"), repo=str(REPO))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) >= 2


def test_core_never_imports_comfyui():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "mpod_core").rglob("*.py")
                 if COMFY_IMPORT.search(p.read_text())]
    assert not offenders, offenders


def test_registry_reads_without_comfyui():
    from nodes.registry import NODE_DISPLAY_NAMES
    assert NODE_DISPLAY_NAMES["MPOD3D_LoadMesh"] == "Load Mesh"
    assert len(set(NODE_DISPLAY_NAMES.values())) == len(NODE_DISPLAY_NAMES)
