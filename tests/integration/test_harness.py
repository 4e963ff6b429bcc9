"""The harness itself, on core nodes only: running, rejected prompts, node
errors, interrupt, upload, and UI→API conversion of core workflows."""

from __future__ import annotations

import json
import random
import time

import pytest

from harness.comfy_server import ExecutionError, PromptRejected
from harness.images import png_size, write_png
from harness.paths import TEST_WORKFLOWS_DIR
from harness.workflow_convert import ui_to_api
from harness.workflows import stage_input_files


def _color() -> int:
    # A fresh colour per call, so ComfyUI's cache never answers for us.
    return random.randrange(1, 0xFFFFFF)


def test_server_is_up(comfy_server):
    stats = comfy_server.get_json("/system_stats")
    assert stats["devices"], stats
    assert comfy_server.boot_seconds is not None and comfy_server.boot_seconds < 180
    # --database-url points into the temporary base dir: no database warning.
    assert "Failed to initialize database" not in comfy_server.log_text()


def test_run_empty_image_to_save_image(comfy_server):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 1, "color": _color()}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness/empty"}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success"
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].is_file(), files
    assert files[0].parent == comfy_server.output_dir / "harness"
    assert png_size(files[0]) == (40, 24)


def test_invalid_prompt_is_rejected_with_server_json(comfy_server):
    prompt = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}  # no images
    with pytest.raises(PromptRejected) as exc:
        comfy_server.queue(prompt)
    assert "1" in exc.value.node_errors, exc.value.response
    assert "required_input_missing" in json.dumps(exc.value.node_errors)


def test_node_exception_raises_execution_error(comfy_server, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a PNG")
    up = comfy_server.upload(bad, subfolder="harness")
    assert up["name"] == "not_an_image.png" and up["subfolder"] == "harness"
    assert (comfy_server.input_dir / "harness" / "not_an_image.png").is_file()
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "harness/not_an_image.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(ExecutionError) as exc:
        comfy_server.run(prompt, timeout=120)
    err = exc.value
    assert not err.interrupted
    assert err.node_id == "1" and err.node_type == "LoadImage"
    assert err.exception_type and err.exception_message, err.details


def test_upload_then_load_image(comfy_server, tmp_path):
    src = write_png(tmp_path / "harness_upload.png", 20, 12, (10, 200, 30, 255))
    up = comfy_server.upload(src)
    assert up["name"] == "harness_upload.png"
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "harness_upload.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                      "width": 10, "height": 6, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "harness/up"}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    (out,) = comfy_server.output_files(entry)
    assert png_size(out) == (10, 6)


def test_interrupt_stops_a_running_prompt(comfy_server):
    # Six slow blurs on a 2048² image (about 1-2 s each on 2 CPU cores).
    prompt = {"1": {"class_type": "EmptyImage",
                    "inputs": {"width": 2048, "height": 2048, "batch_size": 1, "color": _color()}}}
    prev = "1"
    for i in range(2, 8):
        prompt[str(i)] = {"class_type": "ImageBlur",
                          "inputs": {"image": [prev, 0], "blur_radius": 8, "sigma": 1.0 + i / 10}}
        prev = str(i)
    prompt["9"] = {"class_type": "PreviewImage", "inputs": {"images": [prev, 0]}}
    t0 = time.monotonic()
    prompt_id = comfy_server.queue(prompt)
    while not comfy_server.get_json("/queue")["queue_running"]:
        assert time.monotonic() - t0 < 60, "prompt never started"
        time.sleep(0.05)
    time.sleep(0.3)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=120)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert "9" not in (entry.get("outputs") or {})
    # run() turns the same entry into an ExecutionError with interrupted=True.
    with pytest.raises(ExecutionError) as exc:
        comfy_server.raise_for_status(entry)
    assert exc.value.interrupted


@pytest.mark.parametrize("name", ["core_seed_widgets", "core_modes", "core_primitive_node",
                                  "core_reroute_notes", "core_loadimage_scale_preview",
                                  "handwritten_minimal"])
def test_converted_core_workflows_run(comfy_server, name):
    """ui_to_api output of frontend-made core workflows is accepted and runs."""
    wf = json.loads((TEST_WORKFLOWS_DIR / f"{name}.json").read_text())
    prompt = ui_to_api(wf, comfy_server.object_info())
    stage_input_files(comfy_server, wf)  # LoadImage's files (placeholders)
    if name == "core_modes":
        # As from the UI: the frontend drops a widget input fed by a muted node
        # (EmptyImage 9 loses "width") and a link from a muted node
        # (PreviewImage 6 loses "images"); the server refuses both.
        with pytest.raises(PromptRejected) as exc:
            comfy_server.queue(prompt)
        assert {"6", "9"} <= set(exc.value.node_errors), exc.value.node_errors
        prompt["9"]["inputs"]["width"] = 8
        prompt.pop("6")
    if name == "handwritten_minimal":
        # PreviewImage 8 lost its only input (bypassed MaskToImage cannot pass
        # a MASK as IMAGE): drop it, as a user would have to.
        prompt.pop("8")
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"


def test_gltf_validator_reports_valid_and_broken_files(tmp_path):
    from harness.gltf import error_messages, validate_gltf

    trimesh = pytest.importorskip("trimesh")
    good = tmp_path / "sphere.glb"
    trimesh.creation.icosphere(subdivisions=1).export(good)
    report = validate_gltf(good)
    assert report["issues"]["numErrors"] == 0, error_messages(report)
    assert report["info"]["totalTriangleCount"] == 80
    bad = tmp_path / "truncated.glb"
    bad.write_bytes(good.read_bytes()[:200])
    report = validate_gltf(bad)
    assert report["issues"]["numErrors"] > 0
    assert error_messages(report)
