"""The bundled SDS workflows, converted from the very UI files users drag in,
run in the live server with random-weight checkpoints (shrunk to 64x64 and
2 steps for the CPU), with SDS Image Fit's LOSS_MAP output wired into core
Plot Loss Graph."""
import json

import numpy as np
import pytest
from PIL import Image

from harness.loss_graph import add_loss_graph, check_loss_graph
from harness.paths import WORKFLOWS_DIR
from harness.workflow_convert import ui_to_api

CASES = [("sds_image_fit", "sd15_checkpoint"), ("sds_zero123_view", "zero123_checkpoint")]


def test_images_past_the_encoder_memory_limit_are_refused(comfy_server, sd15_checkpoint):
    """The image arrives by link, so its size is checked when SDS Image Fit runs, before any model work.
    First in this module: the bundled SD 1.5 workflow run next reuses its loaded checkpoint (same loader inputs)."""
    from harness.comfy_server import ExecutionError
    from mpod_core.guidance.sds import MAX_GUIDANCE_PIXELS
    fit = {"steps": 2, "learning_rate": 0.01, "guidance_scale": 7.5, "min_step": 0.02, "max_step": 0.98,
           "weighting": "sds", "elevation": 0.0, "azimuth": 0.0, "seed": 0,
           "model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "image": ["3", 0]}
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
           "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a chair"}},
           "3": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1, "color": 0}},
           "4": {"class_type": "MPOD3D_SDSImageFit", "inputs": fit},
           "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    with pytest.raises(ExecutionError) as info:
        comfy_server.run(api, timeout=600)
    err = info.value
    assert err.node_type == "MPOD3D_SDSImageFit", err
    assert f"SDS Image Fit: image: batch x height x width = 1 x 1024 x 1024 = {1024 * 1024} exceeds " \
           f"{MAX_GUIDANCE_PIXELS}" in err.exception_message, err.exception_message


@pytest.mark.parametrize("name,checkpoint_fixture", CASES)
def test_bundled_sds_workflow_runs(comfy_server, request, tmp_path, name, checkpoint_fixture):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    start = tmp_path / "sds_start.png"
    rng = np.random.default_rng(0)
    pixels = (rng.random((80, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(start)
    uploaded = comfy_server.upload(start)["name"]

    api = ui_to_api(json.loads((WORKFLOWS_DIR / f"{name}.json").read_text()), comfy_server.object_info())
    kinds = {node["class_type"] for node in api.values()}
    assert "MPOD3D_SDSImageFit" in kinds and "PreviewImage" in kinds
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] in ("CheckpointLoaderSimple", "ImageOnlyCheckpointLoader"):
            inputs["ckpt_name"] = checkpoint
        elif node["class_type"] == "LoadImage":
            inputs["image"] = uploaded
        elif node["class_type"] == "ImageScale":
            inputs["width"] = inputs["height"] = 64
        elif node["class_type"] == "MPOD3D_SDSImageFit":
            assert inputs["steps"] >= 100  # the workflow itself carries real settings
            inputs["steps"] = 2
    info = comfy_server.object_info()["MPOD3D_SDSImageFit"]
    assert info["output"] == ["IMAGE", "LOSS_MAP"]  # appended last: saved workflows' links by index hold
    fit = next(nid for nid, node in api.items() if node["class_type"] == "MPOD3D_SDSImageFit")
    add_loss_graph(api, fit, 1)
    entry = comfy_server.run(api, timeout=600)
    check_loss_graph(comfy_server, entry, steps=2)
    previews = comfy_server.output_files(entry, kinds=("images",))
    assert len(previews) == 1, previews
    fitted = np.asarray(Image.open(previews[0]).convert("RGB"), dtype=np.float32) / 255
    scaled = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255
    assert fitted.shape == (64, 64, 3)
    assert np.isfinite(fitted).all()
    assert np.abs(fitted - scaled).max() > 0.02  # SDS moved the image

