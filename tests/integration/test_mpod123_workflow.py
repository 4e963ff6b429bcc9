"""The whole of MPOD123 in a live ComfyUI: workflows/mpod123.json (stage 1 -> Opacity Mask -> Textual
Inversion -> CLIP Text Encode -> MRCA Attention Patch -> DMTet Refine -> Save Mesh -> Preview3D) on
random-weight SD 1.5 and Stable Zero123 checkpoints at tiny settings; resuming DMTet Refine from a saved
state; DMTet Refine's bad inputs and interrupt."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import trimesh

from harness.comfy_server import ExecutionError
from harness.gltf import validate_gltf
from harness.images import two_colour_disc_png
from harness.loss_graph import add_loss_graph, check_loss_graph
from harness.progress import interrupt_after
from harness.workflow_convert import ui_to_api
from harness.workflows import set_inputs
from mpod_core.pipelines.refine_state_io import load_refine_state

REFINE = "MPOD3D_DMTetRefine"
#: Tiny DMTet Refine settings: six iterations (reference and SD views), 32^2 renders, 64^2 guidance, a
#: learning rate at which a few reference steps colour the texture (a 3-iteration stage-1 field's albedo
#: is still one grey: per-vertex std 3/255 after 3 such steps, 25/255 after 6, measured in-process).
TINY_REFINE = {"iterations": 6, "resolution": 32, "guidance_resolution": 64, "grid_cells": 12, "texture_size": 64,
               "density_threshold": 5.0, "reference_probability": 0.5, "learning_rate": 0.05}


def _kinds(api: dict) -> dict:
    return {node["class_type"]: nid for nid, node in api.items()}


@pytest.fixture(scope="module")
def mpod123_run(comfy_server, sd15_checkpoint, zero123_checkpoint, tmp_path_factory):
    """The bundled workflow, converted from its UI file and shrunk for the CPU, run once."""
    from harness.paths import WORKFLOWS_DIR
    import json
    image = comfy_server.upload(two_colour_disc_png(tmp_path_factory.mktemp("mpod123") / "mpod123_object.png"))["name"]
    api = ui_to_api(json.loads((WORKFLOWS_DIR / "mpod123.json").read_text()), comfy_server.object_info())
    kinds = _kinds(api)
    refine = api[kinds[REFINE]]["inputs"]
    shipped = {k: refine[k] for k in ("iterations", "resolution", "guidance_resolution", "learning_rate",
                                      "guidance_scale", "timestep_preset", "grid_cells", "fallback")}
    embedding = "mpod123_workflow_token"
    set_inputs(api, {
        "ImageOnlyCheckpointLoader": {"ckpt_name": zero123_checkpoint},
        "CheckpointLoaderSimple": {"ckpt_name": sd15_checkpoint},
        "LoadImage": {"image": image},
        "MPOD3D_Zero123SDSNeRF": {"iterations": 3, "resolution": 32, "guidance_resolution": 64, "samples_per_ray": 64,
                                  "turntable_frames": 1},
        "MPOD3D_OpacityMask": {"resolution": 32},
        "MPOD3D_TextualInversion": {"steps": 1, "resolution": 64, "batch_size": 1, "embedding_name": embedding},
        REFINE: TINY_REFINE,
        "MPOD3D_SaveRadianceField": {"filename_prefix": "fields/mpod123_wf"},
        "MPOD3D_SaveDMTetState": {"filename_prefix": "dmtet/mpod123_wf"},
        "MPOD3D_SaveMesh": {"filename_prefix": "mesh/mpod123_wf"}})
    add_loss_graph(api, kinds[REFINE], 3)
    saved_embedding = comfy_server.models_dir / "embeddings" / f"{embedding}.safetensors"
    try:
        entry = comfy_server.run(api, timeout=1500)
    finally:
        saved_embedding.unlink(missing_ok=True)
    return {"api": api, "kinds": kinds, "entry": entry, "shipped": shipped, "image": image}


def test_the_workflow_ships_the_papers_settings_and_wires_every_step(mpod123_run):
    kinds = mpod123_run["kinds"]
    assert {"LoadImage", "InvertMask", "ImageOnlyCheckpointLoader", "MPOD3D_Zero123SDSNeRF", "MPOD3D_OpacityMask",
            "CheckpointLoaderSimple", "MPOD3D_TextualInversion", "CLIPTextEncode", "MPOD3D_MRCAAttentionPatch",
            REFINE, "MPOD3D_SaveMesh", "Preview3D", "MPOD3D_SaveDMTetState"} <= set(kinds)
    assert mpod123_run["shipped"] == {"iterations": 5000, "resolution": 1024, "guidance_resolution": 512,
                                      "learning_rate": 0.001, "guidance_scale": 100.0,
                                      "timestep_preset": "magic123-refine", "grid_cells": 64, "fallback": "texture"}
    refine = mpod123_run["api"][kinds[REFINE]]["inputs"]
    assert refine["model"] == [kinds["MPOD3D_MRCAAttentionPatch"], 0]       # the MRCA-patched MODEL
    assert refine["field"] == [kinds["MPOD3D_Zero123SDSNeRF"], 0]           # the stage-1 field
    positive = mpod123_run["api"][refine["positive"][0]]["inputs"]
    assert positive["text"] == [kinds["MPOD3D_TextualInversion"], 1]        # the prompt with the learned token


def test_it_saves_a_valid_textured_glb_and_the_state(comfy_server, mpod123_run):
    entry, kinds = mpod123_run["entry"], mpod123_run["kinds"]
    check_loss_graph(comfy_server, entry, steps=TINY_REFINE["iterations"])
    glbs = [p for p in comfy_server.output_files(entry, kinds=("3d",)) if p.suffix == ".glb"]
    assert len(glbs) == 1 and glbs[0].name.startswith("mpod123_wf")
    report = validate_gltf(glbs[0])
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"][:5]
    mesh = trimesh.load(glbs[0], force="mesh")
    assert len(mesh.faces) > 100
    material = mesh.visual.material
    texture = np.asarray(material.baseColorTexture.convert("RGB"), dtype=np.float32)
    assert texture.shape == (64, 64, 3)
    states = sorted((comfy_server.output_dir / "dmtet").glob("mpod123_wf*.safetensors"))
    assert len(states) == 1
    state = load_refine_state(states[0], backend="torch")
    assert state.steps_done == TINY_REFINE["iterations"]
    # The texture holds the refined texture field's colours: the texel under each vertex's UV (trimesh's
    # convention, v = 0 at the bottom row) against the saved state's albedo at that vertex.
    uv = np.asarray(mesh.visual.uv)
    rows = np.clip(((1 - uv[:, 1]) * 64).astype(int), 0, 63)
    cols = np.clip((uv[:, 0] * 64).astype(int), 0, 63)
    with torch.no_grad():
        albedo = state.albedo(torch.tensor(mesh.vertices, dtype=torch.float32)).numpy() * 255
    error = np.abs(texture[rows, cols] - albedo).max(1)
    print(f"\nbaked texture: per-vertex albedo std {albedo.std(0)} (of 255), texel error median "
          f"{np.median(error):.2f}, 90% {np.percentile(error, 90):.2f}")
    assert albedo.std(0).max() > 5.0, "the refined texture field is one colour"
    assert np.median(error) < 3.0 and np.percentile(error, 90) < 10.0
    uv = mesh.visual.uv
    assert uv.min() >= 0 and uv.max() <= 1 and len(uv) == len(mesh.vertices)
    report_text = "\n".join(entry["outputs"][kinds["PreviewAny"]]["text"])
    assert "16 cross-attention layers patched" in report_text and "UV texture 64x64" in report_text, report_text
    assert not list(comfy_server.output_dir.rglob("*.part")) and not list(comfy_server.output_dir.rglob(".*.tmp*"))


def _refine_prompt(server, sd15_checkpoint, image, field_file, mrca=True, **widgets):
    """API prompt: Load Radiance Field + SD 1.5 (+ MRCA) + prompt -> DMTet Refine -> Save DMTet State."""
    inputs = {"invert_mask": True, "learning_rate": 0.001, "guidance_scale": 100.0,
              "timestep_preset": "magic123-refine", "min_step": 0.02,
              "max_step": 0.5, "elevation_min": -45.0, "elevation_max": 45.0, "lambda_sds": 0.001,
              "lambda_rgb": 10.0, "lambda_mask": 1.0, "lambda_nvm": 1.0, "lambda_normal_consistency": 100.0,
              "lambda_laplacian": 100.0, "mrca_masks": True, "fallback": "vertex_colors", "seed": 0,
              "backend": "auto", **TINY_REFINE, "iterations": 1, **widgets,
              "field": ["1", 0], "model": ["6", 0] if mrca else ["2", 0], "vae": ["2", 2], "positive": ["3", 0],
              "image": ["4", 0], "mask": ["4", 1]}
    return {"1": {"class_type": "MPOD3D_LoadRadianceField", "inputs": {"field_file": field_file, "backend": "auto"}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of an object", "clip": ["2", 1]}},
            "4": {"class_type": "LoadImage", "inputs": {"image": image}},
            "5": {"class_type": REFINE, "inputs": inputs},
            "6": {"class_type": "MPOD3D_MRCAAttentionPatch",
                  "inputs": {"model": ["2", 0], "clip": ["2", 1], "prompt": "a photo of an object", "token": "object",
                             "invert_mask": False, "confine_end_tokens": False, "mask_resize": "area"}},
            "7": {"class_type": "MPOD3D_SaveDMTetState", "inputs": {"state": ["5", 1], "filename_prefix": "dmtet/x"}},
            "8": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}}


@pytest.fixture(scope="module")
def stage1_field(comfy_server, mpod123_run):
    fields = sorted((comfy_server.output_dir / "fields").glob("mpod123_wf*.safetensors"))
    assert len(fields) == 1
    return f"fields/{fields[0].name} [output]"


def test_resume_continues_the_saved_state(comfy_server, sd15_checkpoint, mpod123_run, stage1_field):
    state = sorted((comfy_server.output_dir / "dmtet").glob("mpod123_wf*.safetensors"))[0]
    prompt = _refine_prompt(comfy_server, sd15_checkpoint, mpod123_run["image"], stage1_field)
    prompt["9"] = {"class_type": "MPOD3D_LoadDMTetState",
                   "inputs": {"state_file": f"dmtet/{state.name} [output]", "backend": "auto"}}
    prompt["5"]["inputs"]["resume_state"] = ["9", 0]
    prompt["7"]["inputs"]["filename_prefix"] = "dmtet/resumed"
    comfy_server.run(prompt, timeout=900)
    resumed = sorted((comfy_server.output_dir / "dmtet").glob("resumed*.safetensors"))
    assert len(resumed) == 1
    loaded = load_refine_state(resumed[0], backend="torch")
    total = TINY_REFINE["iterations"] + 1
    assert loaded.steps_done == total and {float(m["step"]) for m in loaded.optimizer_state.values()} == {total}


def _error(server, prompt) -> ExecutionError:
    with pytest.raises(ExecutionError) as info:
        server.run(prompt, timeout=600)
    return info.value


def test_bad_inputs_are_clear(comfy_server, sd15_checkpoint, mpod123_run, stage1_field, tmp_path):
    image = mpod123_run["image"]
    # A MODEL without the MRCA patch works, and says so in report.
    prompt = _refine_prompt(comfy_server, sd15_checkpoint, image, stage1_field, mrca=False)
    prompt["7"]["inputs"]["filename_prefix"] = "dmtet/no_mrca"
    entry = comfy_server.run(prompt, timeout=900)
    assert "WARNING: the MODEL carries no MRCA Attention Patch" in "\n".join(entry["outputs"]["8"]["text"])
    # A field with no surface at the threshold.
    err = _error(comfy_server, _refine_prompt(comfy_server, sd15_checkpoint, image, stage1_field,
                                              density_threshold=1000.0))
    assert err.node_type == REFINE and "lower density_threshold" in err.exception_message, err
    # A mask of another size than the image.
    small = comfy_server.upload(two_colour_disc_png(tmp_path / "mpod123_small.png", size=32))["name"]
    prompt = _refine_prompt(comfy_server, sd15_checkpoint, image, stage1_field)
    prompt["10"] = {"class_type": "LoadImageMask", "inputs": {"image": small, "channel": "alpha"}}
    prompt["5"]["inputs"]["mask"] = ["10", 0]
    err = _error(comfy_server, prompt)
    assert err.node_type == REFINE and "does not match the image size" in err.exception_message, err
    # Stable Zero123 where SD belongs.
    prompt = _refine_prompt(comfy_server, sd15_checkpoint, image, stage1_field, mrca=False)
    prompt["2"]["inputs"]["ckpt_name"] = "mpod3d_random_stable_zero123.safetensors"
    prompt["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["11", 1]}}
    prompt["11"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}}
    err = _error(comfy_server, prompt)
    assert err.node_type == REFINE and "SD 1.x / 2.x" in err.exception_message, err
    # A render beyond the memory bound is refused before anything runs.
    errors = comfy_server.rejection(_refine_prompt(comfy_server, sd15_checkpoint, image, stage1_field,
                                                   resolution=2048), "5")
    assert "1024" in errors, errors
    assert not any(p.name.startswith("x_") for p in (comfy_server.output_dir / "dmtet").glob("*"))


def test_interrupt_stops_the_refine_and_writes_no_state(comfy_server, sd15_checkpoint, mpod123_run, stage1_field):
    prompt = _refine_prompt(comfy_server, sd15_checkpoint, mpod123_run["image"], stage1_field, iterations=500,
                            lambda_sds=0.0, reference_probability=1.0)
    prompt["7"]["inputs"]["filename_prefix"] = "dmtet/interrupted"
    entry, done, stopped_after, _ = interrupt_after(comfy_server, prompt, "5", steps=2)
    with pytest.raises(ExecutionError) as info:
        comfy_server.raise_for_status(entry)
    assert info.value.interrupted and done < 500 and stopped_after < 20, (done, stopped_after)
    assert not list((comfy_server.output_dir / "dmtet").glob("interrupted*"))
    assert not list(comfy_server.output_dir.rglob("*.part"))
