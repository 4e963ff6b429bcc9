"""The mesh nodes in a live ComfyUI server: the bundled round-trip workflow, the
conversions to core MESH, render parity with trimesh's ray casting, bad input."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from harness.comfy_server import ExecutionError, PromptRejected
from harness.gltf import validate_gltf
from harness.workflow_convert import ui_to_api
from mpod_core import cameras as cam
from mpod_core import mesh as meshlib

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / "mesh_roundtrip.json"


def colored_mesh() -> trimesh.Trimesh:
    """An asymmetric, vertex-coloured mesh (an icosphere stretched and shifted)."""
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    mesh.apply_scale([1.0, 0.7, 0.5])
    mesh.apply_translation([0.1, -0.05, 0.0])
    colors = np.concatenate([(mesh.vertices - mesh.vertices.min(0)) / np.ptp(mesh.vertices, 0),
                             np.ones((len(mesh.vertices), 1))], axis=1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=(colors * 255).round().astype(np.uint8))
    return mesh


def textured_mesh() -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=(0.8, 0.6, 0.4))
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mesh.visual = trimesh.visual.TextureVisuals(uv=rng.random((len(mesh.vertices), 2)), image=image)
    return mesh


@pytest.fixture(scope="module")
def roundtrip_api(comfy_server):
    ui = json.loads(WORKFLOW.read_text())
    return ui_to_api(ui, comfy_server.object_info())


def _upload_mesh(server, mesh, name, tmp_path) -> str:
    local = tmp_path / name
    meshlib.save_mesh(mesh, local)
    info = server.upload(local, subfolder="3d")
    return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]


def load_then_save(mesh_file: str, filename_prefix: str = "x", fmt: str = "glb") -> dict:
    """API prompt: Load Mesh -> Save Mesh."""
    return {"1": {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": mesh_file, "normalize": False}},
            "2": {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["1", 0], "filename_prefix": filename_prefix,
                                                            "format": fmt}}}


def _put_input_file(server, name: str, data: bytes) -> str:
    (server.input_dir / "3d").mkdir(parents=True, exist_ok=True)
    (server.input_dir / "3d" / name).write_bytes(data)
    return f"3d/{name}"


def _node_id(api: dict, class_type: str) -> str:
    ids = [k for k, v in api.items() if v["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def _saved_mesh(server, entry, api) -> Path:
    files = [p for p in server.output_files(entry, kinds=("3d",)) if p.suffix in (".glb", ".obj", ".ply")]
    assert len(files) == 1, files
    return files[0]


def test_roundtrip_workflow_preserves_geometry_and_colours(comfy_server, roundtrip_api, tmp_path):
    source = colored_mesh()
    name = _upload_mesh(comfy_server, source, "example.glb", tmp_path)
    assert name == "3d/example.glb"  # the file the bundled workflow names
    api = copy.deepcopy(roundtrip_api)
    assert api[_node_id(api, "MPOD3D_LoadMesh")]["inputs"]["mesh_file"] == name
    entry = comfy_server.run(api, timeout=300)

    saved = _saved_mesh(comfy_server, entry, api)
    assert saved.is_file() and saved.parent.name == "mesh" and saved.name.startswith("mpod3d_")
    report = validate_gltf(saved)
    assert report["issues"]["numErrors"] == 0, json.dumps(report["issues"], indent=1)[:3000]

    # Preview3D got the saved file's path relative to output/
    preview = entry["outputs"][_node_id(api, "Preview3D")]
    assert preview["result"][0] == saved.relative_to(comfy_server.output_dir).as_posix()

    back = meshlib.load_mesh(saved)
    assert len(back.vertices) == len(source.vertices) and len(back.faces) == len(source.faces)
    np.testing.assert_allclose(back.bounds, source.bounds, atol=1e-6)
    np.testing.assert_allclose(back.vertices, source.vertices, atol=1e-6)
    np.testing.assert_array_equal(back.visual.vertex_colors[:, :3], source.visual.vertex_colors[:, :3])

    # the render branch produced 4 views each of colour, normals and depth, with the object visible
    images = [p for p in comfy_server.output_files(entry, kinds=("images",))]
    assert len(images) == 12, images
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        assert pixels.shape == (256, 256, 3)
        assert pixels.std() > 0.05, f"{path.name} looks blank"


def test_textured_mesh_survives_save(comfy_server, roundtrip_api, tmp_path):
    source = textured_mesh()
    name = _upload_mesh(comfy_server, source, "textured.glb", tmp_path)
    api = copy.deepcopy(roundtrip_api)
    api[_node_id(api, "MPOD3D_LoadMesh")]["inputs"]["mesh_file"] = name
    api[_node_id(api, "MPOD3D_SaveMesh")]["inputs"]["filename_prefix"] = "mesh/textured"
    entry = comfy_server.run(api, timeout=300)
    saved = _saved_mesh(comfy_server, entry, api)
    assert validate_gltf(saved)["issues"]["numErrors"] == 0
    got = meshlib.mesh_to_tensors(meshlib.load_mesh(saved))
    want = np.asarray(source.visual.material.image, dtype=np.float32) / 255
    np.testing.assert_allclose(got.texture.numpy(), want, atol=1e-6)
    np.testing.assert_allclose(got.uv.numpy(), source.visual.uv, atol=1e-6)


@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_save_formats(comfy_server, tmp_path, fmt):
    name = _upload_mesh(comfy_server, colored_mesh(), "fmt.glb", tmp_path)
    api = load_then_save(name, f"fmt/{fmt}", fmt)
    saved = _saved_mesh(comfy_server, comfy_server.run(api, timeout=120), api)
    assert saved.suffix == f".{fmt}"
    back = meshlib.load_mesh(saved)
    assert len(back.faces) == len(colored_mesh().faces)


def test_core_mesh_conversions_and_save_glb(comfy_server, tmp_path):
    source = colored_mesh()
    name = _upload_mesh(comfy_server, source, "convert.glb", tmp_path)
    api = {
        "1": {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": name, "normalize": False}},
        "2": {"class_type": "MPOD3D_MeshToComfyMesh", "inputs": {"mesh": ["1", 0]}},
        "3": {"class_type": "SaveGLB", "inputs": {"mesh": ["2", 0], "filename_prefix": "core/core"}},
        "4": {"class_type": "MPOD3D_ComfyMeshToMesh", "inputs": {"MESH": ["2", 0], "batch_index": 0}},
        "5": {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["4", 0], "filename_prefix": "core/back",
                                                           "format": "glb"}},
    }
    entry = comfy_server.run(api, timeout=120)
    files = comfy_server.output_files(entry, kinds=("3d",))
    assert len(files) == 2, files
    for path in files:
        assert validate_gltf(path)["issues"]["numErrors"] == 0
        back = trimesh.load(path, force="mesh", process=False)
        np.testing.assert_allclose(back.vertices, source.vertices, atol=1e-6)
        np.testing.assert_array_equal(back.faces, source.faces)

    api["4"]["inputs"]["batch_index"] = 3
    with pytest.raises(ExecutionError, match="batch_index 3 out of range"):
        comfy_server.run(api, timeout=120)


def test_render_node_matches_trimesh_ray_casting(comfy_server, tmp_path):
    """The node's silhouette and depth agree with trimesh's ray casting of the same cameras."""
    source = colored_mesh()
    name = _upload_mesh(comfy_server, source, "parity.glb", tmp_path)
    azimuths, elevations, size = [0.0, 135.0], [20.0, -30.0], 96
    api = {
        "1": {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": name, "normalize": False}},
        "2": {"class_type": "MPOD3D_RenderMeshViews", "inputs": {
            "mesh": ["1", 0], "azimuths": "0, 135", "elevations": "20, -30", "distance": 2.5, "fov": 40.0,
            "width": size, "height": size, "frame_mesh": False, "background": 0.0, "antialias": False,
            "backend": "torch"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 3]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "parity/mask"}},
    }
    entry = comfy_server.run(api, timeout=180)
    masks = sorted(comfy_server.output_files(entry, kinds=("images",)))
    assert len(masks) == 2
    cameras = cam.orbit_cameras(elevations, azimuths, 2.5, 40.0, dtype=torch.float64)
    origins, dirs = cam.get_rays(cameras, size, size)
    intersector = trimesh.ray.ray_triangle.RayMeshIntersector(source)
    for view, path in enumerate(masks):
        rendered = np.asarray(Image.open(path).convert("L")) > 127
        hit = intersector.intersects_any(origins[view].reshape(-1, 3).numpy(), dirs[view].reshape(-1, 3).numpy())
        agreement = (rendered.reshape(-1) == hit).mean()
        assert agreement >= 0.99, f"view {view}: silhouette agreement {agreement:.4f}"
        assert hit.sum() > 500  # the object fills a real part of the view


# ---------------------------------------------------------------- bad input
def test_missing_mesh_file_is_a_clear_error(comfy_server):
    with pytest.raises(PromptRejected, match="no_such_mesh.glb' not found in ComfyUI's input folder"):
        comfy_server.queue(load_then_save("3d/no_such_mesh.glb"))


def test_unsupported_extension_is_a_clear_error(comfy_server):
    name = _put_input_file(comfy_server, "model.fbx", b"\0" * 64)
    with pytest.raises(PromptRejected, match="unsupported mesh file '3d/model.fbx'"):
        comfy_server.queue(load_then_save(name))


def test_empty_mesh_is_a_clear_error(comfy_server):
    # a valid binary STL with zero triangles
    name = _put_input_file(comfy_server, "empty.stl", b"\0" * 80 + (0).to_bytes(4, "little"))
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(load_then_save(name), timeout=60)
    assert info.value.node_type == "MPOD3D_LoadMesh"
    assert "empty.stl" in info.value.exception_message


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/escape", "mesh/../../escape", ""])
def test_filename_prefix_cannot_leave_output(comfy_server, tmp_path, prefix):
    name = _upload_mesh(comfy_server, colored_mesh(), "prefix.glb", tmp_path)
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(load_then_save(name, prefix), timeout=60)
    assert info.value.node_type == "MPOD3D_SaveMesh"
    assert "filename_prefix" in info.value.exception_message
    escaped = comfy_server.base_dir.parent / "escape_00001_.glb"
    assert not escaped.exists() and not Path("/tmp/escape_00001_.glb").exists()


@pytest.mark.parametrize("field,value,where", [
    ("distance", 0.0, "run"), ("fov", 0.0, "run"), ("distance", -1.0, "queue"), ("fov", -10.0, "queue"),
    ("azimuths", "0, left", "run"), ("elevations", "0, 10", "run"),
])
def test_bad_camera_values_are_clear_errors(comfy_server, tmp_path, field, value, where):
    name = _upload_mesh(comfy_server, colored_mesh(), "cam.glb", tmp_path)
    inputs = {"mesh": ["1", 0], "azimuths": "0, 90, 180", "elevations": "0", "distance": 2.5, "fov": 40.0,
              "width": 32, "height": 32, "frame_mesh": True, "background": 1.0, "antialias": True,
              "backend": "auto"}
    inputs[field] = value
    api = {"1": {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": name, "normalize": False}},
           "2": {"class_type": "MPOD3D_RenderMeshViews", "inputs": inputs},
           "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    if where == "queue":  # below the widget minimum: ComfyUI's own validation names the input
        with pytest.raises(PromptRejected, match=field):
            comfy_server.queue(api)
        return
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(api, timeout=60)
    assert info.value.node_type == "MPOD3D_RenderMeshViews"
    assert field in info.value.exception_message


@pytest.mark.parametrize("azimuths,size", [("0, 120, 240", 4096),                      # 3 x 4096^2
                                           (", ".join(["0"] * 513), 256)])           # 513 x 256^2
def test_render_sizes_past_the_memory_limit_are_refused_in_validation(comfy_server, tmp_path, azimuths, size):
    from mpod_core.render.mesh_renderer import MAX_RENDER_PIXELS
    name = _upload_mesh(comfy_server, colored_mesh(), "big.glb", tmp_path)
    inputs = {"mesh": ["1", 0], "azimuths": azimuths, "elevations": "0", "distance": 2.5, "fov": 40.0,
              "width": size, "height": size, "frame_mesh": True, "background": 1.0, "antialias": True,
              "backend": "auto"}
    api = {"1": {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": name, "normalize": False}},
           "2": {"class_type": "MPOD3D_RenderMeshViews", "inputs": inputs},
           "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    errors = comfy_server.rejection(api, "2")
    views = len(azimuths.split(","))
    assert "Render Mesh Views" in errors and f"= {views * size * size} exceeds {MAX_RENDER_PIXELS}" in errors, errors


# ---------------------------------------------------------------- several meshes: lists and scenes
def _two_meshes_prompt(server, tmp_path) -> tuple[dict, list[trimesh.Trimesh]]:
    """API prompt: Load Mesh x 2 -> Mesh List (node 3)."""
    sources = [colored_mesh(), textured_mesh()]
    names = [_upload_mesh(server, m, f"multi_{i}.glb", tmp_path) for i, m in enumerate(sources)]
    api = {str(i + 1): {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": n, "normalize": False}}
           for i, n in enumerate(names)}
    api["3"] = {"class_type": "MPOD3D_MeshList", "inputs": {"mesh_1": ["1", 0], "mesh_2": ["2", 0]}}
    return api, sources


def test_mesh_list_saves_one_file_per_mesh(comfy_server, tmp_path):
    api, sources = _two_meshes_prompt(comfy_server, tmp_path)
    api["4"] = {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["3", 0], "filename_prefix": "list/obj",
                                                         "format": "glb"}}
    entry = comfy_server.run(api, timeout=120)
    listed = entry["outputs"]["4"]["3d"]
    counters = [int(item["filename"][len("obj_"):-len("_.glb")]) for item in listed]  # obj_00001_.glb
    assert len(listed) == 2 and counters[1] == counters[0] + 1, listed
    files = comfy_server.output_files(entry, kinds=("3d",))
    assert len(files) == 2 and all(p.is_file() for p in files)
    for path, source in zip(files, sources):
        report = validate_gltf(path)
        assert report["issues"]["numErrors"] == 0, json.dumps(report["issues"], indent=1)[:3000]
        back = meshlib.load_mesh(path)
        np.testing.assert_allclose(back.vertices, source.vertices, atol=1e-6)
        np.testing.assert_array_equal(back.faces, source.faces)


def test_compose_scene_saves_one_glb_with_named_objects(comfy_server, tmp_path):
    import pygltflib

    api, sources = _two_meshes_prompt(comfy_server, tmp_path)
    api["4"] = {"class_type": "MPOD3D_ComposeScene", "inputs": {"meshes": ["3", 0], "names": "ball, crate"}}
    api["5"] = {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["4", 0], "filename_prefix": "scene/pair",
                                                         "format": "glb"}}
    # the nodes that need one mesh take the scene flattened
    api["6"] = {"class_type": "MPOD3D_RenderMeshViews", "inputs": {
        "mesh": ["4", 0], "azimuths": "0", "elevations": "0", "distance": 2.5, "fov": 40.0, "width": 32,
        "height": 32, "frame_mesh": True, "background": 1.0, "antialias": True, "backend": "torch"}}
    api["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    api["8"] = {"class_type": "MPOD3D_MeshToComfyMesh", "inputs": {"mesh": ["4", 0]}}
    api["9"] = {"class_type": "SaveGLB", "inputs": {"mesh": ["8", 0], "filename_prefix": "scene/core"}}
    entry = comfy_server.run(api, timeout=180)

    saved = [p for p in comfy_server.output_files({"outputs": {"5": entry["outputs"]["5"]}}, kinds=("3d",))]
    assert len(saved) == 1, saved
    report = validate_gltf(saved[0])
    assert report["issues"]["numErrors"] == 0, json.dumps(report["issues"], indent=1)[:3000]
    gltf = pygltflib.GLTF2().load(str(saved[0]))
    roots = [gltf.nodes[i] for i in gltf.scenes[gltf.scene or 0].nodes]
    assert [(n.name, gltf.meshes[n.mesh].name) for n in roots] == [("ball", "ball"), ("crate", "crate")]
    objects = meshlib.scene_objects(meshlib.load_mesh(saved[0], keep_objects=True))
    for obj, source in zip(objects, sources):
        np.testing.assert_allclose(obj.mesh.vertices, source.vertices, atol=1e-6)
    np.testing.assert_array_equal(objects[0].mesh.visual.vertex_colors, sources[0].visual.vertex_colors)

    core = comfy_server.output_files({"outputs": {"9": entry["outputs"]["9"]}}, kinds=("3d",))
    assert len(core) == 1
    flat = trimesh.load(core[0], force="mesh", process=False)
    assert len(flat.vertices) == sum(len(m.vertices) for m in sources)
    images = comfy_server.output_files({"outputs": {"7": entry["outputs"]["7"]}}, kinds=("images",))
    assert len(images) == 1
    assert np.asarray(Image.open(images[0]).convert("L")).min() < 200  # the objects are in the view


def test_compose_scene_name_count_mismatch_is_a_clear_error(comfy_server, tmp_path):
    api, _ = _two_meshes_prompt(comfy_server, tmp_path)
    api["4"] = {"class_type": "MPOD3D_ComposeScene", "inputs": {"meshes": ["3", 0], "names": "a, b, c"}}
    api["5"] = {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["4", 0], "filename_prefix": "scene/bad",
                                                         "format": "glb"}}
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(api, timeout=120)
    assert info.value.node_type == "MPOD3D_ComposeScene"
    assert "3 object names given for 2 meshes" in info.value.exception_message
