"""SAM nodes in a live ComfyUI: Load SAM Model reads a random-weight checkpoint in the
official .pth format from the server's models/sams, SAM Segment Objects makes one mask
per box, Crop Objects and SaveImage take them; errors name the problem."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from harness.comfy_server import ExecutionError, PromptRejected
from harness.sam import write_sam_checkpoint

SCENE_W, SCENE_H = 160, 100
BOXES = "[[20, 10, 60, 30], [130, 60, 160, 100], [70, 40, 110, 90]]"


@pytest.fixture(scope="module")
def sam_checkpoint(comfy_server) -> str:
    """A tiny random-weight SAM (harness.sam) in the server's models/sams folder."""
    name = "mpod3d_random_sam_tiny.pth"
    target = comfy_server.models_dir / "sams" / name
    if not target.exists():
        write_sam_checkpoint(target)
    return name


@pytest.fixture(scope="module")
def scene(comfy_server, tmp_path_factory) -> str:
    array = np.full((SCENE_H, SCENE_W, 3), 255, np.uint8)
    array[10:30, 20:60] = (255, 0, 0)
    array[60:100, 130:160] = (0, 255, 0)
    array[40:90, 70:110] = (0, 0, 255)
    path = tmp_path_factory.mktemp("sam") / "sam_scene.png"
    Image.fromarray(array).save(path)
    return comfy_server.upload(path)["name"]


def _prompt(scene: str, sam_file: str, boxes: str = BOXES) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": scene}},
        "2": {"class_type": "MPOD3D_LoadSAM", "inputs": {"sam_file": sam_file, "model_type": "auto", "device": "auto"}},
        "3": {"class_type": "MPOD3D_SAMSegmentObjects",
              "inputs": {"sam_model": ["2", 0], "image": ["1", 0], "boxes": boxes, "threshold": 0.5}},
        "4": {"class_type": "MPOD3D_CropObjects",
              "inputs": {"image": ["1", 0], "masks": ["3", 0], "size": 64, "fill": 0.8, "background": 1.0}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "sam_crops"}},
        "6": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sam_masks"}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["3", 2], "filename_prefix": "sam_preview"}},
    }


def _files(comfy_server, entry, node_id):
    return [comfy_server.output_dir / i.get("subfolder", "") / i["filename"]
            for i in entry["outputs"][node_id]["images"]]


def test_loader_lists_the_sams_folder(comfy_server, sam_checkpoint):
    info = comfy_server.object_info(refresh=True)
    options = info["MPOD3D_LoadSAM"]["input"]["required"]["sam_file"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert sam_checkpoint in names
    assert info["MPOD3D_LoadSAM"]["output"] == ["SAM_MODEL"]
    assert info["MPOD3D_SAMSegmentObjects"]["input"]["required"]["sam_model"][0] == "SAM_MODEL"


def test_segment_then_crop_in_a_workflow(comfy_server, sam_checkpoint, scene):
    entry = comfy_server.run(_prompt(scene, sam_checkpoint), timeout=300)
    masks = _files(comfy_server, entry, "7")
    assert len(masks) == 3  # one mask per box
    for path in masks:
        mask = np.asarray(Image.open(path).convert("L"))
        assert mask.shape == (SCENE_H, SCENE_W)
        assert set(np.unique(mask)) <= {0, 255}
    crops = _files(comfy_server, entry, "5")
    assert len(crops) == 3 and all(Image.open(p).size == (64, 64) for p in crops)
    (preview,) = _files(comfy_server, entry, "8")
    assert Image.open(preview).size == (SCENE_W, SCENE_H)


def test_boxes_from_a_linked_string(comfy_server, sam_checkpoint, scene):
    """Crop Objects' crop_boxes JSON drives a second segmentation (boxes linked, not typed)."""
    prompt = _prompt(scene, sam_checkpoint)
    prompt["9"] = {"class_type": "MPOD3D_SAMSegmentObjects",
                   "inputs": {"sam_model": ["2", 0], "image": ["1", 0], "boxes": ["4", 2], "threshold": 0.5}}
    prompt["10"] = {"class_type": "MaskToImage", "inputs": {"mask": ["9", 0]}}
    prompt["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "sam_again"}}
    entry = comfy_server.run(prompt, timeout=300)
    assert len(_files(comfy_server, entry, "11")) == 3


def _error(comfy_server, prompt) -> ExecutionError:
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(prompt, timeout=300)
    assert info.value.node_type == "MPOD3D_SAMSegmentObjects"
    return info.value


def test_box_errors_name_the_problem(comfy_server, sam_checkpoint, scene):
    err = _error(comfy_server, _prompt(scene, sam_checkpoint, "[[20, 10, 60, 30], [200, 10, 260, 50]]"))
    assert "boxes: object_01: box [200, 10, 260, 50] is entirely outside the 160x100 image" in err.exception_message
    err = _error(comfy_server, _prompt(scene, sam_checkpoint, "[]"))
    assert "boxes: zero boxes" in err.exception_message
    err = _error(comfy_server, _prompt(scene, sam_checkpoint, "[[20, 10, 60, 30]"))
    assert "boxes: malformed JSON" in err.exception_message


def test_missing_checkpoint_names_file_and_folder(comfy_server, scene):
    with pytest.raises(PromptRejected) as info:
        comfy_server.queue(_prompt(scene, "sam_vit_h_4b8939.pth"))
    text = str(info.value)
    assert "'sam_vit_h_4b8939.pth' not found in ComfyUI's models/sams folder" in text
    assert str(comfy_server.models_dir / "sams") in text
    assert "sam_vit_b_01ec64.pth" in text and "github.com/facebookresearch/segment-anything" in text
