"""The bundled ThemeStation priors workflow (workflows/themestation_priors.json) in a live server:
it ships the official settings (30 views, 150 / 300 steps, the two caption forms, colour-only
renders of the initial model) and, at tiny settings with the random SD 1.5 checkpoint, runs end
to end: both LoRAs are saved as standard LoRA files (the concept prior's trained on the concept
image plus the initial model's renders), the concept image is saved, the loss curve plots."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from harness.loss_graph import add_loss_graph, check_loss_graph
from harness.paths import WORKFLOWS_DIR
from harness.workflow_convert import ui_to_api

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

TF, RENDER = "MPOD3D_ThemeFinetune", "MPOD3D_RenderExemplars"


def test_bundled_themestation_priors_workflow_runs_end_to_end(comfy_server, sd15_checkpoint, load_workflow):
    workflow = load_workflow("themestation_priors")
    if not (comfy_server.input_dir / "3d" / "example.glb").is_file():  # any mesh will do (a test may upload one)
        comfy_server.upload(WORKFLOWS_DIR / "inputs" / "example.glb", subfolder="3d")
    api = ui_to_api(workflow, comfy_server.object_info(refresh=True))
    by_kind = {}
    for key, node in api.items():
        by_kind.setdefault(node["class_type"], []).append(key)
    assert len(by_kind[TF]) == 2 and len(by_kind[RENDER]) == 2 and len(by_kind["MPOD3D_LoadMesh"]) == 3
    priors = {api[k]["inputs"]["lora_name"]: k for k in by_kind[TF]}
    reference, concept = priors["theme_reference_prior"], priors["theme_concept_prior"]
    assert api[reference]["inputs"]["steps"] == 150 and api[concept]["inputs"]["steps"] == 300
    for key in (reference, concept):
        inputs = api[key]["inputs"]
        assert (inputs["learning_rate"], inputs["resolution"], inputs["batch_size"], inputs["train_text_encoder"]) == \
            (1e-4, 512, 8, True)
    renders = {api[k]["inputs"]["normal_maps"]: k for k in by_kind[RENDER]}
    exemplars, initial = renders[True], renders[False]
    assert api[exemplars]["inputs"]["views"] == 30 and api[exemplars]["inputs"]["caption"] == \
        "a 3d model of {object}, in the style of {token}"
    assert api[initial]["inputs"]["caption"] == "a 3d model of {token} {object}"
    assert api[initial]["inputs"]["views"] == 20  # paper §4: the concept image and 20 augmented views
    # the concept prior trains on the concept image (the reference prior's sample) + the img2img-augmented renders
    batch = api[api[concept]["inputs"]["images"][0]]
    assert batch["class_type"] == "ImageBatch"

    def sampler_of(image_input):
        decode = api[image_input[0]]
        assert decode["class_type"] == "VAEDecode"
        return api[decode["inputs"]["samples"][0]]

    concept_sampler, augment_sampler = sampler_of(batch["inputs"]["image1"]), sampler_of(batch["inputs"]["image2"])
    assert concept_sampler["inputs"]["model"][0] == reference and concept_sampler["inputs"]["denoise"] == 1.0
    assert augment_sampler["inputs"]["model"][0] == reference and augment_sampler["inputs"]["denoise"] == 0.5
    encode = api[augment_sampler["inputs"]["latent_image"][0]]
    assert encode["class_type"] == "VAEEncode" and encode["inputs"]["pixels"][0] == initial

    names = {}
    for key, node in api.items():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = sd15_checkpoint
        elif kind == RENDER:
            inputs.update(views=1, resolution=64)
        elif kind == TF:
            names[key] = inputs["lora_name"] = f"{inputs['lora_name']}_ci"
            # 2 steps for the concept prior: core Plot Loss Graph divides by the loss range
            inputs.update(steps=2 if key == concept else 1, resolution=64, batch_size=1,
                          train_text_encoder=key == concept)
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs.update(steps=1)
    add_loss_graph(api, concept, 3)
    folder = comfy_server.models_dir / "loras"
    try:
        entry = comfy_server.run(api, timeout=1800)
        for key, name in names.items():
            with safe_open(str(folder / f"{name}.safetensors"), "pt") as f:
                settings = json.loads(f.metadata()["mpod3d_theme_finetune"])
                keys = list(f.keys())
            assert settings["steps"] == (2 if key == concept else 1)
            assert settings["train_text_encoder"] == (key == concept)
            assert len(keys) == 3 * (128 + (48 if key == concept else 0))
        saved = next(k for k, n in api.items() if n["class_type"] == "SaveImage")
        assert len(entry["outputs"][saved]["images"]) == 1  # the concept image
        check_loss_graph(comfy_server, entry, 2)
    finally:
        for name in names.values():
            (folder / f"{name}.safetensors").unlink(missing_ok=True)
