"""ThemeStation's metric nodes in a live ComfyUI: Mesh Diversity on two copies of a mesh (exactly 0) against
two different meshes (well above 0), the figures read through core Preview Any and checked against the core
computed locally, and renders past the memory bound refused in validation; Concept CLIP Similarity through
the random-weight Stable Zero123 checkpoint's CLIP_VISION (a finite cosine in [-1, 1]) and a bad concept
image refused with a message; REPARO's Scene Evaluation of a scene against itself (PSNR at the cap, SSIM 1,
LPIPS 0 through a random AlexNet backbone file in models/lpips, CLIP 1 through the random CLIP_VISION: 2 views,
as each view costs two ViT-L forwards on the CPU) with its plot written, and at 4 views without the backbone
file (LPIPS left out, the report says where to put it)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from harness.comfy_server import ExecutionError
from mpod_core.mesh import compose_scene
from mpod_core.metrics import MetricConfig, mesh_diversity
from mpod_core.scene_evaluation import LPIPS_BACKBONE_FILE, PSNR_CAP_DB

pytestmark = pytest.mark.comfyui

WIDGETS = {"voxel_resolution": 32, "views": 2, "resolution": 64}


def _meshes():
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    box.visual.vertex_colors = np.tile([200, 60, 40, 255], (len(box.vertices), 1))
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    return {"metric_box.glb": box, "metric_ball.glb": ball}


def _upload(server, tmp_path) -> dict:
    names = {}
    for name, mesh in _meshes().items():
        mesh.export(tmp_path / name)
        names[name] = "3d/" + server.upload(tmp_path / name, subfolder="3d")["name"]
    return names


def _load(name: str) -> dict:
    return {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": name, "normalize": False}}


def _diversity_prompt(first: str, second: str) -> dict:
    prompt = {"a": _load(first), "b": _load(second),
              "d": {"class_type": "MPOD3D_MeshDiversity", "inputs": {**WIDGETS, "mesh_1": ["a", 0],
                                                                     "mesh_2": ["b", 0]}}}
    for k in range(3):  # the three FLOAT outputs, shown as text by core Preview Any
        prompt[f"p{k}"] = {"class_type": "PreviewAny", "inputs": {"source": ["d", k]}}
    return prompt


def _figures(entry) -> list[float]:
    return [float(entry["outputs"][f"p{k}"]["text"][0]) for k in range(3)]


def test_mesh_diversity_of_copies_is_zero_and_of_different_meshes_is_not(comfy_server, tmp_path):
    files = _upload(comfy_server, tmp_path)
    box, ball = files["metric_box.glb"], files["metric_ball.glb"]
    same = comfy_server.run(_diversity_prompt(box, box), timeout=120)
    assert _figures(same) == [0.0, 0.0, 0.0]
    different = comfy_server.run(_diversity_prompt(box, ball), timeout=120)
    figures = _figures(different)
    assert figures[0] > 0.3 and figures[1] > 0.01 and figures[2] > 0.05, figures
    # The node computes what the core computes locally on the same meshes.
    meshes = _meshes()
    local = mesh_diversity([meshes["metric_box.glb"], meshes["metric_ball.glb"]], MetricConfig(**WIDGETS),
                           backend="torch")
    assert figures[0] == pytest.approx(local.voxel_diversity, abs=1e-9)
    assert figures[1] == pytest.approx(local.image_distance, rel=1e-3)
    assert figures[2] == pytest.approx(local.ssim_distance, rel=1e-3)
    report = "\n".join(different["outputs"]["d"]["text"])  # shown on the node (an output node)
    assert "mesh_1" in report and "mesh_2" in report and f"{local.voxel_diversity:.4f}" in report
    # Renders past the memory bound are refused before anything runs.
    huge = _diversity_prompt(box, ball)
    huge["d"]["inputs"].update(views=64, resolution=1024)
    assert str(2 ** 25) in comfy_server.rejection(huge, "d")


def test_concept_similarity_with_a_random_clip_vision(comfy_server, zero123_checkpoint, tmp_path):
    box = _upload(comfy_server, tmp_path)["metric_box.glb"]
    prompt = {"ckpt": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": zero123_checkpoint}},
              "img": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 80, "batch_size": 1,
                                                             "color": 0xC83C28}},
              "m": _load(box),
              "s": {"class_type": "MPOD3D_ConceptSimilarity",
                    "inputs": {"clip_vision": ["ckpt", 1], "concept_image": ["img", 0], "mesh": ["m", 0], "views": 2}},
              "p": {"class_type": "PreviewAny", "inputs": {"source": ["s", 0]}}}
    entry = comfy_server.run(prompt, timeout=300)
    score = float(entry["outputs"]["p"]["text"][0])
    assert math.isfinite(score) and -1.0 <= score <= 1.0, score
    report = "\n".join(entry["outputs"]["s"]["text"])
    assert report.startswith("CLIP score") and report.count("azimuth") == 2, report

    prompt["img"]["inputs"]["batch_size"] = 2
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(prompt, timeout=300)
    assert info.value.node_type == "MPOD3D_ConceptSimilarity", str(info.value)
    assert "expected one image, got a batch of 2" in (info.value.exception_message or "")
    assert comfy_server.alive


EVAL_WIDGETS = {"resolution": 64, "elevation": 15.0, "backend": "torch"}


def _upload_scene(server, tmp_path) -> str:
    box = trimesh.creation.box(extents=(0.4, 0.5, 0.4))
    box.visual.vertex_colors = np.tile([200, 50, 50, 255], (len(box.vertices), 1))
    box.apply_translation((-0.3, 0.0, 0.0))
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.25)
    ball.visual.vertex_colors = np.tile([40, 60, 200, 255], (len(ball.vertices), 1))
    ball.apply_translation((0.3, 0.0, 0.0))
    compose_scene([box, ball], ["box", "ball"]).export(tmp_path / "eval_scene.glb")
    return "3d/" + server.upload(tmp_path / "eval_scene.glb", subfolder="3d")["name"]


def _evaluation_prompt(scene: str, lpips_weights: str, clip_checkpoint=None, views: int = 4) -> dict:
    prompt = {"m": {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": scene, "normalize": False}},
              "e": {"class_type": "MPOD3D_SceneEvaluation",
                    "inputs": {**EVAL_WIDGETS, "views": views, "scene": ["m", 0], "reference_scene": ["m", 0],
                               "lpips_weights": lpips_weights}},
              "j": {"class_type": "PreviewAny", "inputs": {"source": ["e", 1]}},
              "size": {"class_type": "GetImageSize", "inputs": {"image": ["e", 3]}},
              "w": {"class_type": "PreviewAny", "inputs": {"source": ["size", 0]}}}
    if clip_checkpoint:
        prompt["ckpt"] = {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": clip_checkpoint}}
        prompt["e"]["inputs"]["clip_vision"] = ["ckpt", 1]
    return prompt


def test_scene_evaluation_of_a_scene_against_itself(comfy_server, zero123_checkpoint, tmp_path):
    scene = _upload_scene(comfy_server, tmp_path)
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    (comfy_server.models_dir / "lpips").mkdir(exist_ok=True)
    torch.save(torchvision.models.alexnet().state_dict(), comfy_server.models_dir / "lpips" / "random_alexnet.pth")
    entry = comfy_server.run(_evaluation_prompt(scene, "random_alexnet.pth", zero123_checkpoint, views=2), timeout=300)
    figures = json.loads(entry["outputs"]["j"]["text"][0])
    mean = figures["mean"]
    assert mean["psnr"] == PSNR_CAP_DB and abs(mean["ssim"] - 1) < 1e-6, mean
    assert abs(mean["lpips"]) < 1e-6 and abs(mean["clip"] - 1) < 1e-6, mean
    assert len(figures["per_view"]) == 2 and figures["notes"] == []
    assert int(entry["outputs"]["w"]["text"][0]) == 2 * 64 + 2          # each view's two renders side by side
    report = "\n".join(entry["outputs"]["e"]["text"])                    # shown on the node
    assert report.startswith("Scene evaluation") and "LPIPS" in report and "left out" not in report
    plot = entry["outputs"]["e"]["images"][0]                             # the plot, written and shown on the node
    with Image.open(comfy_server.temp_dir / plot["subfolder"] / plot["filename"]) as image:
        assert image.width == 960 and image.height > 400
        assert np.asarray(image.convert("L")).std() > 10                  # charts, not a blank page


def test_scene_evaluation_without_the_lpips_file_leaves_lpips_out(comfy_server, tmp_path):
    scene = _upload_scene(comfy_server, tmp_path)
    assert not (comfy_server.models_dir / "lpips" / LPIPS_BACKBONE_FILE).exists()
    entry = comfy_server.run(_evaluation_prompt(scene, LPIPS_BACKBONE_FILE), timeout=300)
    figures = json.loads(entry["outputs"]["j"]["text"][0])
    assert figures["mean"]["lpips"] is None and figures["mean"]["clip"] is None
    assert figures["mean"]["psnr"] == PSNR_CAP_DB and abs(figures["mean"]["ssim"] - 1) < 1e-6
    assert len(figures["per_view"]) == 4 and figures["per_view"][0]["lpips"] is None
    lpips_note, clip_note = figures["notes"]
    assert lpips_note.startswith("LPIPS left out") and f"'{LPIPS_BACKBONE_FILE}' not found" in lpips_note
    assert "models/lpips" in lpips_note and "download.pytorch.org" in lpips_note, lpips_note
    assert clip_note.startswith("CLIP score left out")
    assert lpips_note in "\n".join(entry["outputs"]["e"]["text"])
    # Bad settings are refused before anything runs, named.
    bad = _evaluation_prompt(scene, "none")
    bad["e"]["inputs"]["views"] = 0
    assert "views must be >= 1" in comfy_server.rejection(bad, "e")
