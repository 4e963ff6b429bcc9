"""ThemeStation's metric nodes in a live ComfyUI: Mesh Diversity on two copies of a mesh (exactly 0) against
two different meshes (well above 0), the figures read through core Preview Any and checked against the core
computed locally, and renders past the memory bound refused in validation; Concept CLIP Similarity through
the random-weight Stable Zero123 checkpoint's CLIP_VISION (a finite cosine in [-1, 1]) and a bad concept
image refused with a message."""
from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from harness.comfy_server import ExecutionError
from mpod_core.metrics import MetricConfig, mesh_diversity

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
