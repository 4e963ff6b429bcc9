"""DSD Refine through /prompt in a real ComfyUI, on the full-size random-weight SD 1.5 checkpoint (SDS here: the
VSD route runs in test_themestation_workflow.py):

* a mesh initial model that is not watertight (a box without its top) is converted, said so in the report, and
  refined into a GLB with 0 glTF-validator errors;
* bad input is an error naming what is wrong, before any model is copied: no initial model, a prompt without the
  theme token, priors of different model families (a Stable Zero123 MODEL as the reference prior), an open sheet
  with no inside;
* Cancel stops the run within an iteration and nothing is written.
"""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from harness.comfy_server import ExecutionError
from harness.gltf import validate_gltf
from harness.progress import interrupt_after

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

DSD = "MPOD3D_DSDRefine"
WIDGETS = {"object": "chair", "token": "sks", "concept_prompt": "a 3d model of {token} {object}",
           "reference_prompt": "a 3d model of {object}, in the style of {token}", "iterations": 2, "resolution": 64,
           "guidance_resolution": 64, "grid_cells": 8, "learning_rate": 1e-3, "density_threshold": 10.0,
           "score": "sds", "guidance_scale": 7.5, "concept_min_step": 0.5, "concept_max_step": 0.75,
           "concept_weight": 0.2, "reference_min_step": 0.1, "reference_max_step": 0.25, "reference_weight": 1.0,
           "lora_rank": 4, "lora_learning_rate": 1e-4, "lambda_normal_consistency": 400.0, "lambda_sparsity": 10.0,
           "lambda_opaque": 1000.0, "opaque_start": 2501, "elevation_min": -5.0, "elevation_max": 30.0,
           "fallback": "texture", "texture_size": 64, "texture_fit_steps": 3, "seed": 0, "backend": "torch"}


def _upload_mesh(server, tmp_path, name: str, mesh: trimesh.Trimesh) -> str:
    path = tmp_path / name
    mesh.export(path)
    server.upload(path, subfolder="3d")
    server.object_info(refresh=True)  # Load Mesh lists the new file
    return f"3d/{name}"


def _open_box() -> trimesh.Trimesh:
    """A coloured box without its top face (two triangles): not watertight, but with an inside."""
    box = trimesh.creation.box(extents=(0.8, 0.6, 0.5))
    top = box.face_normals[:, 1] > 0.9
    mesh = trimesh.Trimesh(box.vertices, box.faces[~top], process=False)
    mesh.visual.vertex_colors = np.tile([200, 80, 40, 255], (len(mesh.vertices), 1))
    return mesh


def _prompt(ckpt, mesh_file=None, prefix="mesh/dsd_live", **widgets):
    inputs = {"concept_model": ["1", 0], "concept_clip": ["1", 1], "reference_model": ["1", 0],
              "reference_clip": ["1", 1], "vae": ["1", 2], **WIDGETS, **widgets}
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
              "3": {"class_type": DSD, "inputs": inputs},
              "4": {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["3", 0], "filename_prefix": prefix,
                                                                "format": "glb"}},
              "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}}}
    if mesh_file is not None:
        prompt["2"] = {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": mesh_file, "normalize": False}}
        inputs["mesh"] = ["2", 0]
    return prompt


def test_an_open_mesh_is_converted_refined_and_saved(comfy_server, sd15_checkpoint, tmp_path):
    mesh_file = _upload_mesh(comfy_server, tmp_path, "dsd_open_box.glb", _open_box())
    entry = comfy_server.run(_prompt(sd15_checkpoint, mesh_file), timeout=900)
    report = "\n".join(entry["outputs"]["5"]["text"])
    assert "not watertight: 4 boundary edges" in report, report
    assert "score: sds; iterations: 2 in total" in report and "'a 3d model of sks chair'" in report, report
    glbs = [p for p in comfy_server.output_files(entry, kinds=("3d",)) if p.suffix == ".glb"]
    assert len(glbs) == 1
    check = validate_gltf(glbs[0])
    assert check["issues"]["numErrors"] == 0, check["issues"]["messages"][:5]
    out = trimesh.load(glbs[0], force="mesh")
    extent = out.bounds[1] - out.bounds[0]
    assert np.allclose(extent, (0.8, 0.6, 0.5), atol=0.25), extent  # refined where the box was, at its size


@pytest.mark.parametrize("case", ["no initial model", "prompt without token", "different families", "open sheet"])
def test_bad_input_is_an_error_naming_it(comfy_server, sd15_checkpoint, zero123_checkpoint, tmp_path, case):
    box = _upload_mesh(comfy_server, tmp_path, "dsd_box.glb", _open_box())
    if case == "no initial model":
        prompt, expected = _prompt(sd15_checkpoint), "connect exactly one initial model"
    elif case == "prompt without token":
        prompt = _prompt(sd15_checkpoint, box, reference_prompt="a 3d model of {object}")
        expected = "reference_prompt 'a 3d model of chair' lacks the theme token 'sks'"
    elif case == "different families":
        prompt = _prompt(sd15_checkpoint, box)
        prompt["6"] = {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": zero123_checkpoint}}
        prompt["3"]["inputs"]["reference_model"] = ["6", 0]
        expected = "different model families"
    else:
        sheet = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False)
        prompt = _prompt(sd15_checkpoint, _upload_mesh(comfy_server, tmp_path, "dsd_sheet.glb", sheet))
        expected = "is inside the mesh"
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(prompt, timeout=600)
    assert info.value.node_type == DSD and expected in info.value.exception_message, info.value.exception_message


def test_cancel_stops_within_an_iteration_and_writes_nothing(comfy_server, sd15_checkpoint, tmp_path):
    box = _upload_mesh(comfy_server, tmp_path, "dsd_cancel_box.glb", _open_box())
    prompt = _prompt(sd15_checkpoint, box, prefix="mesh/dsd_cancelled", iterations=200, texture_fit_steps=0)
    entry, done, stopped_after, _ = interrupt_after(comfy_server, prompt, "3", 2)
    assert entry["status"]["status_str"] != "success"
    assert done < 200 and stopped_after < 60, (done, stopped_after)
    assert not list((comfy_server.output_dir / "mesh").glob("dsd_cancelled*"))
