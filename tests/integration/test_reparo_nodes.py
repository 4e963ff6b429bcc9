"""REPARO nodes in a live ComfyUI: Crop Objects fed by core nodes (a mask batch
built with Image Batch + Convert Image to Mask)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from harness.comfy_server import ExecutionError


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def uploaded(comfy_server, tmp_path):
    scene = np.zeros((100, 160, 3), np.uint8)
    scene[10:30, 20:60] = (255, 0, 0)
    scene[60:100, 130:160] = (0, 255, 0)
    masks = np.zeros((2, 100, 160, 3), np.uint8)
    masks[0, 10:30, 20:60, 0] = 255  # red only: the blue channel is an empty mask
    masks[1, 60:100, 130:160, 0] = 255
    names = {"scene": _png(tmp_path / "reparo_scene.png", scene),
             "m0": _png(tmp_path / "reparo_m0.png", masks[0]), "m1": _png(tmp_path / "reparo_m1.png", masks[1]),
             "small": _png(tmp_path / "reparo_small.png", masks[0][:50, :80])}
    return {k: comfy_server.upload(v)["name"] for k, v in names.items()}


def _prompt(files, second_mask="m1"):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": files["scene"]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": files["m0"]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": files[second_mask]}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
        "5": {"class_type": "ImageToMask", "inputs": {"image": ["4", 0], "channel": "red"}},
        "6": {"class_type": "MPOD3D_CropObjects",
              "inputs": {"image": ["1", 0], "masks": ["5", 0], "size": 64, "fill": 0.8, "background": 1.0}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "reparo_crops"}},
    }


def test_crop_objects_in_a_workflow(comfy_server, uploaded):
    entry = comfy_server.run(_prompt(uploaded), timeout=300)
    files = sorted(comfy_server.output_files(entry, kinds=("images",)))
    assert len(files) == 2
    for path, colour in zip(files, ((255, 0, 0), (0, 255, 0))):
        crop = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert crop.shape == (64, 64, 3)
        assert (np.abs(crop[32, 32] - colour) <= 2).all()  # the object at the centre
        assert (crop[0, 0] >= 253).all() and (crop[-1, -1] >= 253).all()  # white around it


def test_crop_objects_errors_name_the_problem(comfy_server, uploaded):
    prompt = _prompt(uploaded)
    prompt["8"] = {"class_type": "LoadImage", "inputs": {"image": uploaded["small"]}}
    prompt["9"] = {"class_type": "ImageToMask", "inputs": {"image": ["8", 0], "channel": "red"}}
    prompt["6"]["inputs"]["masks"] = ["9", 0]
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(prompt, timeout=300)
    assert "does not match the image size" in info.value.exception_message
    empty = _prompt(uploaded)
    empty["5"]["inputs"]["channel"] = "blue"  # the mask images are red-only on black: blue is empty
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(empty, timeout=300)
    assert "object_00: its mask is empty" in info.value.exception_message
