"""REPARO in a live ComfyUI.

* The bundled workflow (Load Image -> SAM -> Crop Objects -> Zero123 SDS NeRF per crop -> Field to
  Mesh -> OT Layout Align -> Save Mesh), converted from its UI file, with a random-weight SAM and
  Stable Zero123 and every long step shrunk for the CPU: it runs end to end and saves one GLB per
  object plus one scene GLB, all valid.
* A known answer: meshes shipped as GLB files in their own frames, the reference rendered from a
  known layout: OT Layout Align recovers the layout.
* Bad inputs give node errors that name the problem.
"""
from __future__ import annotations

import json

import numpy as np
import pygltflib
import pytest
import torch
import trimesh
from PIL import Image

from harness.comfy_server import ExecutionError
from harness.gltf import validate_gltf
from harness.loss_graph import add_loss_graph, check_loss_graph
from harness.paths import WORKFLOWS_DIR
from harness.progress import interrupt_after
from harness.sam import write_sam_checkpoint
from harness.workflow_convert import ui_to_api
from mpod_core.layout.scene import LayoutScene, render_scene
from mpod_core.layout.synthetic import make_scene

ALIGN = "MPOD3D_OTLayoutAlign"
pytestmark = pytest.mark.filterwarnings("ignore:mpod_core.render")


def _validated(path):
    report = validate_gltf(path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"][:5]
    return path


def _glbs(server, entry, node_id):
    return [server.output_dir / i.get("subfolder", "") / i["filename"] for i in entry["outputs"][node_id]["3d"]]


def test_bundled_reparo_workflow_runs_end_to_end(comfy_server, zero123_checkpoint, load_workflow):
    sam_name = "mpod3d_random_sam_tiny.pth"
    if not (comfy_server.models_dir / "sams" / sam_name).exists():
        write_sam_checkpoint(comfy_server.models_dir / "sams" / sam_name)
    example = comfy_server.upload(WORKFLOWS_DIR / "inputs" / "reparo_example.png")["name"]
    api = ui_to_api(load_workflow("reparo"), comfy_server.object_info(refresh=True))
    kinds = {n["class_type"]: k for k, n in api.items()}
    assert {"MPOD3D_LoadSAM", "MPOD3D_SAMSegmentObjects", "MPOD3D_CropObjects", "MPOD3D_Zero123SDSNeRF",
            "MPOD3D_FieldToMesh", ALIGN, "MPOD3D_SaveMesh", "Preview3D"} <= set(kinds)
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadImage":
            inputs["image"] = example
        elif kind == "MPOD3D_LoadSAM":
            inputs["sam_file"] = sam_name
        elif kind == "ImageOnlyCheckpointLoader":
            inputs["ckpt_name"] = zero123_checkpoint
        elif kind == "MPOD3D_CropObjects":
            inputs["size"] = 64
        elif kind == "MPOD3D_Zero123SDSNeRF":
            assert inputs["iterations"] == 5000 and inputs["invert_mask"] is False  # crop masks: 1 = object
            inputs.update(iterations=2, resolution=32, guidance_resolution=64, samples_per_ray=64, turntable_frames=1)
        elif kind == "MPOD3D_FieldToMesh":
            inputs.update(resolution=24, threshold=5.0)
        elif kind == ALIGN:
            assert inputs["iterations"] == 500 and inputs["learning_rate"] == 0.02 and inputs["resolution"] == 256
            inputs.update(iterations=4, resolution=64)
    entry = comfy_server.run(api, timeout=1800)
    saves = [k for k, n in api.items() if n["class_type"] == "MPOD3D_SaveMesh"]
    per_object = next(k for k in saves if api[k]["inputs"]["mesh"][1] == 0)
    whole = next(k for k in saves if api[k]["inputs"]["mesh"][1] == 1)
    objects = _glbs(comfy_server, entry, per_object)
    assert len(objects) == 3 and len(set(objects)) == 3  # one file per object of the example
    for path in objects:
        _validated(path)
    (scene_file,) = _glbs(comfy_server, entry, whole)
    gltf = pygltflib.GLTF2().load(str(_validated(scene_file)))
    assert sorted(n.name for n in gltf.nodes if n.mesh is not None) == ["object_00", "object_01", "object_02"]
    # The scene's objects sit where the per-object files put them.
    loaded = trimesh.load(scene_file, force="scene")
    for name, path in zip(["object_00", "object_01", "object_02"], objects):
        placed = trimesh.load(path, force="mesh")
        world = loaded.graph[name][0]
        geometry = loaded.geometry[loaded.graph[name][1]]
        bounds = trimesh.transform_points(geometry.bounds, world)
        assert np.allclose(np.sort(bounds, 0), placed.bounds, atol=1e-4)


@pytest.fixture(scope="module")
def known_scene(comfy_server, tmp_path_factory):
    """A 3-object scene with a known layout (depth 0), its reference render and masks as PNG files, and
    the three meshes as GLB files in their own frames (moved and enlarged: the node must not rely on them)."""
    folder = tmp_path_factory.mktemp("reparo_known")
    scene = make_scene(3, seed=4, resolution=96)
    scene.translations[:, 2] = 0.0
    with torch.no_grad():
        render = render_scene(LayoutScene(scene.objects, scene.translations, scene.scales), scene.camera, 128, 96)
    names = {}
    Image.fromarray((render.color.numpy() * 255).round().astype(np.uint8)).save(folder / "known_scene.png")
    names["image"] = comfy_server.upload(folder / "known_scene.png")["name"]
    for k, obj in enumerate(scene.objects):
        mask = ((render.object_id == k).numpy() * 255).astype(np.uint8)
        zero = np.zeros_like(mask)  # red only: the blue channel is an empty mask
        Image.fromarray(np.stack([mask, zero, zero], -1)).save(folder / f"known_mask_{k}.png")
        names[f"mask{k}"] = comfy_server.upload(folder / f"known_mask_{k}.png")["name"]
        colours = np.concatenate([(obj.colors.numpy() * 255).round(), np.full((len(obj.colors), 1), 255)], 1)
        mesh = trimesh.Trimesh(obj.vertices.numpy() * 2.0 + np.array([3.0, 1.0, -2.0]), obj.faces.numpy(),
                               vertex_colors=colours.astype(np.uint8), process=False)
        mesh.export(folder / f"known_object_{k}.glb")
        names[f"mesh{k}"] = comfy_server.upload(folder / f"known_object_{k}.glb", subfolder="3d")["name"]
    return scene, names


def _align_prompt(names, iterations=200, masks=(0, 1, 2), meshes=(0, 1, 2)):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": names["image"]}}}
    for k in masks:
        prompt[f"m{k}"] = {"class_type": "LoadImage", "inputs": {"image": names[f"mask{k}"]}}
    batch = [f"m{masks[0]}", 0]
    for i, k in enumerate(masks[1:]):
        prompt[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [f"m{k}", 0]}}
        batch = [f"b{i}", 0]
    prompt["masks"] = {"class_type": "ImageToMask", "inputs": {"image": batch, "channel": "red"}}
    slots = {}
    for i, k in enumerate(meshes):
        prompt[f"l{k}"] = {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": f"3d/{names[f'mesh{k}']}",
                                                                      "normalize": False}}
        slots[f"mesh_{i + 1}"] = [f"l{k}", 0]
    prompt["list"] = {"class_type": "MPOD3D_MeshList", "inputs": slots}
    prompt["align"] = {"class_type": ALIGN, "inputs": {
        "image": ["1", 0], "masks": ["masks", 0], "meshes": ["list", 0], "iterations": iterations,
        "learning_rate": 0.02, "optimise_translation": True, "optimise_depth": False, "optimise_scale": True,
        "uniform_scale": True, "loss": "ot", "alpha": 1.0, "beta": 1.0, "gamma": 1.0,
        "pixel_weight": 1.0, "lambda_appearance": 0.5, "semantic_every": 1, "match_interval": 5,
        "resolution": 128, "fov": 40.0,
        "distance": 2.5, "seed": 0, "backend": "auto"}}
    prompt["save"] = {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["align", 0], "filename_prefix":
                                                                   "reparo_known/object", "format": "glb"}}
    prompt["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["align", 3]}}
    return prompt


def test_layout_align_recovers_a_known_layout_from_shipped_meshes(comfy_server, known_scene):
    scene, names = known_scene
    prompt = _align_prompt(names)
    add_loss_graph(prompt, "align", 4)
    entry = comfy_server.run(prompt, timeout=900)
    check_loss_graph(comfy_server, entry, steps=200)
    files = _glbs(comfy_server, entry, "save")
    assert len(files) == 3
    boxes = LayoutScene(scene.objects, scene.translations, scene.scales).object_boxes().detach()
    for k, path in enumerate(files):
        placed = trimesh.load(_validated(path), force="mesh")
        error = np.abs(placed.bounds - boxes[k].numpy()).max() / scene.extent
        assert error < 0.02, (k, placed.bounds, boxes[k])
    layout = json.loads(entry["outputs"]["show"]["text"][0])
    assert [o["name"] for o in layout] == ["object_00", "object_01", "object_02"]
    assert np.allclose([o["translation"] for o in layout], scene.translations.numpy(), atol=0.02 * scene.extent)


def _error(server, prompt) -> str:
    with pytest.raises(ExecutionError) as info:
        server.run(prompt, timeout=600)
    return info.value.exception_message


def test_layout_align_bad_inputs_name_the_problem(comfy_server, known_scene):
    _, names = known_scene
    assert "got 2 masks and 3 meshes" in _error(comfy_server, _align_prompt(names, iterations=2, masks=(0, 1)))
    empty = _align_prompt(names, iterations=2)
    empty["masks"]["inputs"]["channel"] = "blue"
    assert "object_00: its mask is empty" in _error(comfy_server, empty)


def test_layout_align_shows_previews_and_stops_on_cancel(comfy_server, known_scene):
    _, names = known_scene
    prompt = _align_prompt(names, iterations=5000)
    saved = comfy_server.output_dir / "reparo_known"
    before = sorted(saved.glob("*")) if saved.is_dir() else []
    entry, done, stopped_after, previews = interrupt_after(comfy_server, prompt, "align", steps=12)
    with pytest.raises(ExecutionError) as info:
        comfy_server.raise_for_status(entry)
    assert info.value.interrupted and done < 5000
    assert stopped_after < 10, stopped_after
    assert previews >= 2, previews  # the first step's overlay and every 10th step's
    assert (sorted(saved.glob("*")) if saved.is_dir() else []) == before  # nothing saved, nothing half-written
