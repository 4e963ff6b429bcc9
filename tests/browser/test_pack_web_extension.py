"""The pack's frontend extension in the real frontend: Load Mesh's upload button
puts a file in input/3d and selects it; the round-trip workflow queued from the
page runs; Save Mesh's download button fetches the file it saved."""
from __future__ import annotations

import json
import time

import numpy as np
import trimesh

from harness.paths import ARTIFACTS_DIR, WORKFLOWS_DIR
from mpod_core import mesh as meshlib

FIND_NODE = "(type) => window.app.graph.nodes.find(n => n.comfyClass === type)"


def _wait_for(page, script, arg=None, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.evaluate(script, arg)
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"timed out waiting for: {script}")


def _press_button(page, node_type: str, label: str):
    page.evaluate(
        """([type, label]) => {
             const node = window.app.graph.nodes.find(n => n.comfyClass === type);
             node.widgets.find(w => w.name === label).callback();
           }""", [node_type, label])


def test_upload_queue_and_download_from_the_page(comfy_server, comfy_page, tmp_path):
    page = comfy_page.page
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    mesh.visual = trimesh.visual.ColorVisuals(
        mesh, vertex_colors=np.tile(np.array([[200, 40, 30, 255]], np.uint8), (len(mesh.vertices), 1)))
    local = tmp_path / "browser_upload.glb"
    meshlib.save_mesh(mesh, local)

    workflow = json.loads((WORKFLOWS_DIR / "mesh_roundtrip.json").read_text())
    comfy_page.load_workflow(workflow)
    colors = page.evaluate(
        "() => window.app.graph.nodes.filter(n => n.comfyClass?.startsWith('MPOD3D_')).map(n => n.bgcolor)")
    assert colors and all(c == "#2e4057" for c in colors), colors  # the extension ran on our nodes

    with page.expect_file_chooser() as chooser:
        _press_button(page, "MPOD3D_LoadMesh", "upload mesh")
    chooser.value.set_files(str(local))
    _wait_for(page, f"""() => ({FIND_NODE})('MPOD3D_LoadMesh')
                          .widgets.find(w => w.name === 'mesh_file').value === '3d/browser_upload.glb'""")
    uploaded = comfy_server.input_dir / "3d" / "browser_upload.glb"
    assert uploaded.read_bytes() == local.read_bytes()

    # The upload button is not part of what the workflow saves.
    saved_graph = comfy_page.serialize_graph()
    load_node = next(n for n in saved_graph["nodes"] if n["type"] == "MPOD3D_LoadMesh")
    assert load_node["widgets_values"] == ["3d/browser_upload.glb", False]

    # Queue from the page, as a user pressing Run.
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    saved = _wait_for(page, f"() => ({FIND_NODE})('MPOD3D_SaveMesh').mpod3dLastSaved", timeout=300)
    assert saved["type"] == "output" and saved["filename"].endswith(".glb")
    on_disk = comfy_server.output_dir / saved["subfolder"] / saved["filename"]
    assert on_disk.is_file()

    with page.expect_download() as download:
        _press_button(page, "MPOD3D_SaveMesh", "download")
    target = tmp_path / download.value.suggested_filename
    download.value.save_as(target)
    assert target.read_bytes() == on_disk.read_bytes()

    deadline = time.monotonic() + 300
    while comfy_server.get_json("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.5)  # let the previews arrive before the screenshot
    comfy_page.settle()
    shots = ARTIFACTS_DIR / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    comfy_page.screenshot(shots / "mesh_roundtrip_after_run.png")
