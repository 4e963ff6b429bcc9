"""The README's quick start, followed literally (issue 11):

1. ``bash scripts/start.sh`` starts ComfyUI with the pack (here on a free
   ``PORT``; set-up is already done, by ``scripts/setup.sh --test`` in CI);
2. open ``workflows/mesh_roundtrip.json`` as shipped and queue it: it loads
   ``input/3d/example.glb`` (the bundled example, copied there by set-up),
   renders 4 views to colour, normals and depth previews and saves a GLB
   under ``output/mesh/``.

It runs the launcher's own server on the launcher's own folders
(``.comfyui/base``), not the shared ``comfy_server`` fixture, and removes
what the run wrote there (the GLB, the previews) afterwards. The server's
log is kept in ``artifacts/quickstart_server.log``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.comfy_server import ComfyServer, free_port
from harness.gltf import error_messages, validate_gltf, validator_unavailable_reason
from harness.paths import ARTIFACTS_DIR, PACK_LINK_NAME, REPO_ROOT, python_missing_modules
from harness.require import require_or_skip
from harness.workflow_convert import ui_to_api

STATE = REPO_ROOT / ".comfyui"
COMFY = STATE / "ComfyUI"
BASE = STATE / "base"
WORKFLOW = REPO_ROOT / "workflows" / "mesh_roundtrip.json"
BUNDLED_EXAMPLE = REPO_ROOT / "workflows" / "inputs" / "example.glb"
BOOT_TIMEOUT = 300.0  # start.sh runs setup.sh first: about 1 s when it is done, more if a step is redone
RUN_TIMEOUT = 180.0


def _new_saved_meshes(before: set[Path]) -> set[Path]:
    folder = BASE / "output" / "mesh"
    now = set(folder.glob("mpod3d_*")) if folder.is_dir() else set()
    return now - before


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to start.sh's process group (bash exec's ComfyUI, so the group
    holds the server), SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _images(entry: dict, node_id: str, client: ComfyServer) -> list[Path]:
    roots = {"output": client.output_dir, "temp": client.temp_dir}
    items = (entry.get("outputs") or {}).get(node_id, {}).get("images") or []
    return [roots[i.get("type", "output")] / i.get("subfolder", "") / i["filename"] for i in items]


def test_quickstart_start_sh_then_mesh_roundtrip():
    if os.environ.get("COMFYUI_PATH"):
        pytest.skip("the quick start runs the embedded ComfyUI; COMFYUI_PATH names another one")
    if not (COMFY / "main.py").is_file():
        require_or_skip("MPOD3D_REQUIRE_COMFYUI",
                        f"no embedded ComfyUI at {COMFY}: run `bash scripts/setup.sh --test`")
    python = os.environ.get("PYTHON") or str(REPO_ROOT / ".venv" / "bin" / "python")
    missing = python_missing_modules(python)
    if missing:
        require_or_skip("MPOD3D_REQUIRE_COMFYUI", f"{python} lacks {missing}: run `bash scripts/setup.sh --test`")
    reason = validator_unavailable_reason()
    if reason:
        require_or_skip("MPOD3D_REQUIRE_COMFYUI", f"{reason}: run `bash scripts/setup.sh --test`")

    port = free_port()
    env = dict(os.environ, PORT=str(port), PYTHONUNBUFFERED="1")
    env.setdefault("TQDM_DISABLE", "1")
    for var in ("PYTHONPATH", "LISTEN"):  # the quick start sets neither
        env.pop(var, None)
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS_DIR / "quickstart_server.log"
    meshes_before = _new_saved_meshes(set())
    mesh_dir = BASE / "output" / "mesh"
    mesh_dir_existed = mesh_dir.is_dir()
    written: list[Path] = []

    # A client for the launcher's server: ComfyServer's HTTP helpers, pointed at
    # .comfyui/base (given a base_dir it creates nothing and never deletes it).
    client = ComfyServer(comfyui_dir=COMFY, python=python, base_dir=BASE)
    client.port = port
    client.log_path = log_path
    client.pack_link = STATE / "packs" / PACK_LINK_NAME  # where setup.sh links the pack

    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "start.sh")], cwd=str(REPO_ROOT), env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    client.proc = proc
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"scripts/start.sh exited with code {proc.returncode} before ComfyUI answered. "
                            f"Log tail:\n{client.log_tail()}", pytrace=False)
            try:
                stats = client.get_json("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() - t0 > BOOT_TIMEOUT:
                pytest.fail(f"ComfyUI from scripts/start.sh did not answer on port {port} within "
                            f"{BOOT_TIMEOUT:.0f} s. Log tail:\n{client.log_tail()}", pytrace=False)
            time.sleep(0.5)
        boot = time.monotonic() - t0
        print(f"start.sh answered on port {port} after {boot:.1f} s "
              f"(ComfyUI {stats.get('system', {}).get('comfyui_version')})")
        log_text = client.log_text()
        assert "[start] ComfyUI" in log_text and f":{port}" in log_text
        errors = client.pack_import_errors()
        assert not errors, "ComfyUI failed to import the pack:\n\n" + "\n\n".join(errors)

        # set-up put the bundled example where the workflow looks for it
        example = BASE / "input" / "3d" / "example.glb"
        assert example.is_file(), f"scripts/setup.sh did not provide {example}"

        # the workflow exactly as shipped, converted as the frontend's Queue button does
        workflow = json.loads(WORKFLOW.read_text())
        api = ui_to_api(workflow, client.object_info())
        by_type = {}
        for nid, node in api.items():
            by_type.setdefault(node["class_type"], []).append(nid)
        assert api[by_type["MPOD3D_LoadMesh"][0]]["inputs"]["mesh_file"] == "3d/example.glb"

        t1 = time.monotonic()
        prompt_id = client.queue(api)
        entry = client.wait(prompt_id, timeout=RUN_TIMEOUT)
        written += client.output_files(entry)
        client.raise_for_status(entry)
        print(f"mesh_roundtrip ran in {time.monotonic() - t1:.1f} s")
        assert (entry.get("status") or {}).get("status_str") == "success", entry.get("status")

        # a GLB under output/mesh/, valid glTF, the example's geometry, shown by Preview3D
        saved = [p for p in client.output_files(entry, kinds=("3d",)) if p.suffix == ".glb"]
        assert len(saved) == 1, saved
        glb = saved[0]
        assert glb.is_file() and glb.parent == BASE / "output" / "mesh", glb
        report = validate_gltf(glb)
        assert report["issues"]["numErrors"] == 0, "\n".join(error_messages(report))
        if example.read_bytes() == BUNDLED_EXAMPLE.read_bytes():
            want = validate_gltf(BUNDLED_EXAMPLE)["info"]
            assert report["info"]["totalTriangleCount"] == want["totalTriangleCount"]
            assert report["info"]["totalVertexCount"] == want["totalVertexCount"]
        preview3d = entry["outputs"][by_type["Preview3D"][0]]
        assert preview3d["result"][0] == glb.relative_to(BASE / "output").as_posix()

        # the previews: colour, normals and depth, 4 views each, the object visible
        previews = by_type["PreviewImage"]
        assert len(previews) == 3, by_type
        for nid in previews:
            images = _images(entry, nid, client)
            assert len(images) == 4, (nid, images)
            for path in images:
                assert path.is_file(), path
                pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
                assert pixels.shape == (256, 256, 3), (path.name, pixels.shape)
                assert pixels.std() > 0.05, f"{path.name} looks blank"
    finally:
        _stop(proc)
        for path in set(written) | _new_saved_meshes(meshes_before):
            if path.is_file() and BASE in path.parents:
                path.unlink()
        if not mesh_dir_existed and mesh_dir.is_dir() and not any(mesh_dir.iterdir()):
            mesh_dir.rmdir()
