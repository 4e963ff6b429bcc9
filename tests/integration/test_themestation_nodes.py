"""ThemeStation's Render Exemplars in a live ComfyUI: Load Mesh x 2 -> Mesh List -> Render Exemplars ->
Save Image and the captions; a scene's objects as exemplars; sizes past the memory bound refused."""
from __future__ import annotations

import numpy as np
import trimesh
from PIL import Image

NODE = "MPOD3D_RenderExemplars"
WIDGETS = {"views": 2, "resolution": 32, "elevation_min": -5, "elevation_max": 30, "distance": 1.5, "fov": 49.1,
           "object": "chair", "token": "sks", "caption": "a 3d model of {object}, in the style of {token}",
           "normal_maps": True, "seed": 0, "backend": "auto"}


def _upload_meshes(server, tmp_path) -> list[str]:
    box = trimesh.creation.box(extents=(1.0, 2.0, 0.5))
    box.visual.vertex_colors = np.tile([200, 60, 40, 255], (len(box.vertices), 1))
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    names = []
    for name, mesh in (("exemplar_box.glb", box), ("exemplar_ball.glb", ball)):
        mesh.export(tmp_path / name)
        names.append("3d/" + server.upload(tmp_path / name, subfolder="3d")["name"])
    return names


def _prompt(mesh_files, **widgets):
    prompt = {f"l{k}": {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": name, "normalize": False}}
              for k, name in enumerate(mesh_files)}
    prompt["list"] = {"class_type": "MPOD3D_MeshList",
                      "inputs": {f"mesh_{k + 1}": [f"l{k}", 0] for k in range(len(mesh_files))}}
    prompt["r"] = {"class_type": NODE, "inputs": {**WIDGETS, **widgets, "meshes": ["list", 0]}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["r", 0], "filename_prefix": "exemplars"}}
    prompt["text"] = {"class_type": "PreviewAny", "inputs": {"source": ["r", 1]}}
    return prompt


def test_render_exemplars_of_a_mesh_list(comfy_server, tmp_path):
    entry = comfy_server.run(_prompt(_upload_meshes(comfy_server, tmp_path)), timeout=300)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in comfy_server.output_files(entry, kinds=("images",))]
    captions = "\n".join(entry["outputs"]["text"]["text"]).split("\n")
    colour = "a 3d model of chair, in the style of sks"
    assert len(images) == 8 and all(i.shape == (32, 32, 3) for i in images)
    assert captions == [colour, colour, colour + ", normal map", colour + ", normal map"] * 2, captions
    # Colour renders of the red box are red, its normal maps and the ball's are not grey; the corners are white.
    assert images[0][16, 16, 0] > 150 and images[0][16, 16, 2] < 100
    for k in (2, 3, 6, 7):
        assert np.ptp(images[k].reshape(-1, 3).astype(int), axis=0).max() > 60, k
    assert all((i[0, 0] == 255).all() for i in images)


def test_a_scene_stands_for_its_objects_and_huge_sizes_are_refused(comfy_server, tmp_path):
    files = _upload_meshes(comfy_server, tmp_path)
    prompt = _prompt(files, views=1)
    prompt["scene"] = {"class_type": "MPOD3D_ComposeScene", "inputs": {"meshes": ["list", 0], "names": ""}}
    prompt["r"]["inputs"]["meshes"] = ["scene", 0]
    entry = comfy_server.run(prompt, timeout=300)
    assert len(comfy_server.output_files(entry, kinds=("images",))) == 4           # 2 objects x (colour + normal)
    errors = comfy_server.rejection(_prompt(files, views=360, resolution=2048), "r")
    assert str(2 ** 26) in errors, errors
