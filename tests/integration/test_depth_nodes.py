"""Depth nodes in a live ComfyUI: Load Depth Model lists and reads a tiny random Depth Anything folder
(tests/harness/depth.py, the Hugging Face format) from the server's models/depth_estimation, Estimate
Depth turns an uploaded 96x64 picture (twice, as a batch) into grey depth maps of the same size in
[0, 1], equal to the core's estimate computed here on the same file; a folder of another architecture
and a missing folder are errors naming them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.comfy_server import ExecutionError
from harness.depth import write_depth_anything, write_vit_classifier

pytestmark = pytest.mark.comfyui

IMAGE_W, IMAGE_H = 96, 64
MODEL = "Depth-Anything-mpod3d-tiny"
NOT_DEPTH = "vit-classifier-mpod3d-tiny"


@pytest.fixture(scope="module")
def model_folders(comfy_server):
    """A tiny random Depth Anything and a ViT classifier (not a depth model) in models/depth_estimation."""
    root = comfy_server.models_dir / "depth_estimation"
    if not (root / MODEL / "config.json").exists():
        write_depth_anything(root / MODEL)
    if not (root / NOT_DEPTH / "config.json").exists():
        write_vit_classifier(root / NOT_DEPTH)
    return root


@pytest.fixture(scope="module")
def picture(comfy_server, tmp_path_factory):
    """A 96x64 picture: a gradient with a bright square, so the map varies."""
    y, x = np.mgrid[0:IMAGE_H, 0:IMAGE_W]
    array = np.stack([x * 255 // IMAGE_W, y * 255 // IMAGE_H, np.full_like(x, 90)], -1).astype(np.uint8)
    array[20:44, 30:60] = (250, 240, 30)
    path = tmp_path_factory.mktemp("depth") / "depth_input.png"
    Image.fromarray(array).save(path)
    return comfy_server.upload(path)["name"], array


def _prompt(image: str, folder: str, resolution: int = 0) -> dict:
    return {
        "img": {"class_type": "LoadImage", "inputs": {"image": image}},
        "batch": {"class_type": "RepeatImageBatch", "inputs": {"image": ["img", 0], "amount": 2}},
        "load": {"class_type": "MPOD3D_LoadDepthModel", "inputs": {"model_folder": folder, "device": "auto"}},
        "depth": {"class_type": "MPOD3D_EstimateDepth",
                  "inputs": {"depth_model": ["load", 0], "image": ["batch", 0], "resolution": resolution}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["depth", 0], "filename_prefix": "depth_map"}},
    }


def test_loader_lists_model_folders(comfy_server, model_folders):
    info = comfy_server.object_info(refresh=True)
    options = info["MPOD3D_LoadDepthModel"]["input"]["required"]["model_folder"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert MODEL in names and NOT_DEPTH in names  # folders holding config.json, by folder
    assert not any(n.endswith(".safetensors") or n.endswith(".json") for n in names if n.startswith(MODEL))
    assert info["MPOD3D_LoadDepthModel"]["output"] == ["MPOD3D_DEPTH_MODEL"]
    assert info["MPOD3D_EstimateDepth"]["input"]["required"]["depth_model"][0] == "MPOD3D_DEPTH_MODEL"


def test_estimate_depth_in_a_workflow(comfy_server, model_folders, picture):
    from mpod_core import depth_estimation as de

    name, array = picture
    entry = comfy_server.run(_prompt(name, MODEL), timeout=300)
    files = comfy_server.output_files(entry)
    assert len(files) == 2  # one map per batch image
    maps = [np.asarray(Image.open(f).convert("RGB")).astype(np.float32) / 255 for f in files]
    for m in maps:
        assert m.shape == (IMAGE_H, IMAGE_W, 3)
        assert (m[..., 0] == m[..., 1]).all() and (m[..., 0] == m[..., 2]).all()  # grey
        assert m.min() == 0 and m.max() == 1  # min-max normalised
    np.testing.assert_array_equal(maps[0], maps[1])
    # what the core gives here on the same picture; SaveImage truncates 255 x value to uint8
    dm = de.load_depth_model(model_folders / MODEL)
    local = de.estimate_depth(dm.model, dm.processor, torch.from_numpy(array).float()[None] / 255)[0].numpy()
    below = local - maps[0][..., 0]
    assert below.min() >= -1e-4 and below.max() < 1 / 255 + 1e-4


def test_another_architecture_is_an_error_naming_the_folder(comfy_server, model_folders, picture):
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(_prompt(picture[0], NOT_DEPTH), timeout=120)
    err = info.value
    assert err.node_type == "MPOD3D_LoadDepthModel"
    assert f"model_folder '{NOT_DEPTH}'" in err.exception_message
    assert "'vit'" in err.exception_message and "not a supported depth estimator" in err.exception_message
    assert "Depth-Anything-V2-Small-hf" in err.exception_message


def test_a_missing_folder_is_refused_naming_it_and_the_models_folder(comfy_server, model_folders, picture):
    text = comfy_server.rejection(_prompt(picture[0], "Depth-Anything-V2-Small-hf"), "load")
    assert "'Depth-Anything-V2-Small-hf'" in text and "models/depth_estimation" in text
    assert "hf download depth-anything/Depth-Anything-V2-Small-hf --local-dir" in text


def test_an_oversized_input_is_refused_with_the_limit(comfy_server, model_folders, picture):
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(_prompt(picture[0], MODEL, resolution=2072), timeout=120)
    assert info.value.node_type == "MPOD3D_EstimateDepth"
    assert "resolution" in info.value.exception_message and "1073296" in info.value.exception_message
