"""MPOD123 stage 1 in a live ComfyUI: the bundled workflow (Zero123 SDS NeRF ->
Save Radiance Field / Opacity Mask / Field to Mesh -> Save Mesh) with a
random-weight Stable Zero123 checkpoint, shrunk to a few iterations at small
resolution for the CPU; resuming from a saved field; bad inputs; interrupt."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from harness.comfy_server import ExecutionError
from harness.gltf import validate_gltf
from harness.loss_graph import add_loss_graph, check_loss_graph
from harness.progress import interrupt_after
from harness.workflow_convert import ui_to_api
from mpod_core.cameras import orbit_cameras
from mpod_core.fields import io as field_io
from mpod_core.fields import load_radiance_field, read_settings

NERF = "MPOD3D_Zero123SDSNeRF"
SMALL = {"iterations": 3, "resolution": 32, "guidance_resolution": 64, "samples_per_ray": 64, "turntable_frames": 2}


def _rgba_disc(path, size=64, radius=0.3, square=True):
    """An orange disc on a transparent background (what a background remover gives)."""
    h, w = (size, size) if square else (size, size + 16)
    yy, xx = np.mgrid[:h, :w]
    inside = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (radius * size) ** 2
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[inside] = (230, 120, 40, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


@pytest.fixture
def disc(comfy_server, tmp_path):
    return comfy_server.upload(_rgba_disc(tmp_path / "stage1_disc.png"))["name"]


def _nerf_prompt(checkpoint, image_name, prefix, **widgets):
    """API prompt: loader + image -> Zero123 SDS NeRF -> Save Radiance Field."""
    nerf = {"invert_mask": True, "batch_size": 1, "learning_rate": 0.001, "guidance_scale": 3.0,
            "timestep_preset": "stable-zero123", "min_step": 0.02, "max_step": 0.98, "anneal_min_step": 0.02,
            "anneal_max_step": 0.98, "anneal_start": 0.0, "anneal_end": 0.0, "reference_probability": 0.25,
            "reference_elevation": 0.0, "elevation_min": -45.0, "elevation_max": 45.0, "distance": 2.5,
            "fov": 40.0, "lambda_orient": 1.0, "lambda_normal_smooth": 5.0, "lambda_sparsity": 0.5,
            "lambda_opaque": 0.5, "shading_augmentation": True, "coarse_levels": 8, "seed": 0,
            "backend": "auto", **SMALL, **widgets,
            "model": ["1", 0], "clip_vision": ["1", 1], "vae": ["1", 2], "image": ["2", 0], "mask": ["2", 1]}
    return {"1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": checkpoint}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image_name}},
            "3": {"class_type": NERF, "inputs": nerf},
            "4": {"class_type": "MPOD3D_SaveRadianceField", "inputs": {"field": ["3", 0], "filename_prefix": prefix}}}


def _field_files(server, folder):
    return sorted((server.output_dir / folder).glob("*.safetensors")) if (server.output_dir / folder).is_dir() else []


def test_bundled_stage1_workflow_runs_and_resumes(comfy_server, zero123_checkpoint, disc, load_workflow):
    api = ui_to_api(load_workflow("mpod123_stage1"), comfy_server.object_info())
    kinds = {n["class_type"] for n in api.values()}
    assert {NERF, "MPOD3D_OpacityMask", "MPOD3D_FieldToMesh", "MPOD3D_SaveRadianceField", "MPOD3D_SaveMesh",
            "Preview3D"} <= kinds
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "ImageOnlyCheckpointLoader":
            inputs["ckpt_name"] = zero123_checkpoint
        elif kind == "LoadImage":
            inputs["image"] = disc
        elif kind == NERF:
            assert inputs["iterations"] == 5000 and inputs["resolution"] == 128  # the paper's settings ship
            assert inputs["invert_mask"] is True  # Load Image's MASK is 1 on transparent pixels
            # the reference implementations' settings ship (Stage1Config's defaults)
            assert inputs["timestep_preset"] == "stable-zero123" and inputs["shading_augmentation"] is True
            assert (inputs["lambda_orient"], inputs["lambda_sparsity"], inputs["coarse_levels"]) == (1.0, 0.5, 8)
            inputs.update(SMALL)
        elif kind == "MPOD3D_OpacityMask":
            inputs["resolution"] = 32
        elif kind == "MPOD3D_FieldToMesh":
            inputs.update(resolution=32, threshold=5.0)
        elif kind == "MPOD3D_SaveRadianceField":
            inputs["filename_prefix"] = "fields/stage1_wf"
    add_loss_graph(api, next(k for k, n in api.items() if n["class_type"] == NERF), 2)
    t0 = time.monotonic()
    entry = comfy_server.run(api, timeout=900)
    print(f"\nstage-1 workflow, {SMALL['iterations']} iterations: {time.monotonic() - t0:.1f} s")
    check_loss_graph(comfy_server, entry, steps=SMALL["iterations"])

    previews = comfy_server.output_files(entry, kinds=("images",))
    sizes = sorted(Image.open(p).size for p in previews)
    assert sizes == [(32, 32)] * 6, sizes  # 2 turntable frames + 4 opacity views
    glbs = [p for p in comfy_server.output_files(entry, kinds=("3d",)) if p.suffix == ".glb"]
    assert len(glbs) == 1
    report = validate_gltf(glbs[0])
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"][:5]

    files = _field_files(comfy_server, "fields")
    saved = [f for f in files if f.name.startswith("stage1_wf")]
    assert len(saved) == 1 and not list((comfy_server.output_dir / "fields").glob("*.part"))
    settings = read_settings(saved[0])
    assert settings["meta"]["steps_done"] == 3 and settings["meta"]["camera_convention"] == "mpod3d-orbit-v1"

    # The opacity masks from the server equal the threshold of this process's own render of the saved field.
    field = load_radiance_field(saved[0], backend="torch")
    prompt = {"1": {"class_type": "MPOD3D_LoadRadianceField",
                    "inputs": {"field_file": f"fields/{saved[0].name} [output]", "backend": "auto"}},
              "2": {"class_type": "MPOD3D_OpacityMask",
                    "inputs": {"field": ["1", 0], "azimuths": "0, 120", "elevations": "15", "distance": 0.0,
                               "fov": 0.0, "resolution": 48, "threshold": 0.5}},
              "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "stage1_masks"}}}
    masks = [np.asarray(Image.open(p).convert("L")) > 127
             for p in comfy_server.output_files(comfy_server.run(prompt),
                                                kinds=("images",))]
    with torch.no_grad():
        expect = field.opacity(orbit_cameras(15.0, [0.0, 120.0]), 48, 48) > 0.5
    assert 0 < expect.float().mean() < 1
    for got, want in zip(masks, expect.numpy()):
        assert (got != want).mean() < 0.005, (got != want).mean()

    # Resume: Load Radiance Field -> Zero123 SDS NeRF continues the iteration count.
    prompt = _nerf_prompt(zero123_checkpoint, disc, "fields/stage1_resumed", iterations=2)
    prompt["5"] = {"class_type": "MPOD3D_LoadRadianceField",
                   "inputs": {"field_file": f"fields/{saved[0].name} [output]", "backend": "auto"}}
    prompt["3"]["inputs"]["resume_field"] = ["5", 0]
    comfy_server.run(prompt, timeout=900)
    resumed = [f for f in _field_files(comfy_server, "fields") if f.name.startswith("stage1_resumed")]
    assert len(resumed) == 1 and read_settings(resumed[0])["meta"]["steps_done"] == 5
    # Adam's moments travel with the field: the resumed run continued them (step counts 3 + 2)
    moments = load_radiance_field(resumed[0], backend="torch").optimizer_state
    assert moments and {float(m["step"]) for m in moments.values()} == {5.0}


class _PeakRSS:
    """Samples a process's resident memory every 10 ms in a thread (Linux /proc)."""

    def __init__(self, pid: int):
        self.path, self.peak, self._stop = f"/proc/{pid}/status", 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open(self.path) as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_memory_stays_bounded_at_512(comfy_server, zero123_checkpoint, disc):
    """Zero123 SDS NeRF at 512^2 renders (one novel-view iteration, reference_probability 0: the
    heavier kind, with the guidance; the node's defaults but for 32 samples per ray) peaks <= 4 GiB
    above the server's memory with the models loaded (+1.9 GiB measured; the 128^2 figure beside
    it in bench/README.md is not re-measured here, to keep CI short)."""
    comfy_server.run(_nerf_prompt(zero123_checkpoint, disc, "fields/mem_warm", iterations=1), timeout=900)
    prompt = _nerf_prompt(zero123_checkpoint, disc, "fields/mem_512", iterations=1, resolution=512,
                          guidance_resolution=256, samples_per_ray=32, turntable_frames=1, seed=512,
                          reference_probability=0.0)
    with _PeakRSS(comfy_server.proc.pid) as meter:
        baseline = meter.rss()
        t0 = time.monotonic()
        comfy_server.run(prompt, timeout=1500)
        seconds = time.monotonic() - t0
    growth = (meter.peak - baseline) / 2 ** 30
    print(f"\nZero123 SDS NeRF at 512^2, 1 novel-view iteration: peak +{growth:.2f} GiB above "
          f"{baseline / 2 ** 30:.2f} GiB (models loaded), {seconds:.0f} s")
    assert growth <= 4.0, growth


def _error_of(server, prompt) -> ExecutionError:
    with pytest.raises(ExecutionError) as info:
        server.run(prompt, timeout=600)
    return info.value


def test_bad_reference_images_are_clear_errors(comfy_server, zero123_checkpoint, tmp_path):
    transparent = tmp_path / "stage1_empty.png"
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(transparent)
    cases = [
        (comfy_server.upload(_rgba_disc(tmp_path / "stage1_wide.png", square=False))["name"], {}, "must be square"),
        (comfy_server.upload(transparent)["name"], {}, "no foreground"),
        (comfy_server.upload(_rgba_disc(tmp_path / "stage1_ok.png"))["name"], {"invert_mask": False}, "inverted"),
    ]
    for name, widgets, message in cases:
        err = _error_of(comfy_server, _nerf_prompt(zero123_checkpoint, name, "fields/never", **widgets))
        assert err.node_type == NERF and message in err.exception_message, err
    # A mask of another size than the image.
    small = comfy_server.upload(_rgba_disc(tmp_path / "stage1_small.png", size=32))["name"]
    prompt = _nerf_prompt(zero123_checkpoint, cases[2][0], "fields/never")
    prompt["6"] = {"class_type": "LoadImageMask", "inputs": {"image": small, "channel": "alpha"}}
    prompt["3"]["inputs"]["mask"] = ["6", 0]
    err = _error_of(comfy_server, prompt)
    assert "does not match the image size" in err.exception_message
    # An RGB image with no mask connected.
    del prompt["3"]["inputs"]["mask"]
    err = _error_of(comfy_server, prompt)
    assert "no mask" in err.exception_message
    assert _field_files(comfy_server, "fields") == [] or not any(
        f.name.startswith("never") for f in _field_files(comfy_server, "fields"))


def test_field_files_from_elsewhere_are_refused(comfy_server, tmp_path):
    settings = {"format": field_io.FORMAT_NAME, "version": field_io.FORMAT_VERSION + 1}
    save_file({"x": torch.zeros(1)}, str(comfy_server.input_dir / "future_field.safetensors"),
              metadata={field_io.SETTINGS_KEY: json.dumps(settings)})
    save_file({"x": torch.zeros(1)}, str(comfy_server.input_dir / "not_a_field.safetensors"))
    comfy_server.object_info(refresh=True)
    for name, message in (("future_field.safetensors", "this version of the pack reads version"),
                          ("not_a_field.safetensors", "not an MPOD3D radiance field")):
        prompt = {"1": {"class_type": "MPOD3D_LoadRadianceField", "inputs": {"field_file": name, "backend": "auto"}},
                  "2": {"class_type": "MPOD3D_SaveRadianceField",
                        "inputs": {"field": ["1", 0], "filename_prefix": "fields/never_loaded"}}}
        err = _error_of(comfy_server, prompt)
        assert err.node_type == "MPOD3D_LoadRadianceField" and message in err.exception_message, err


def test_interrupt_stops_the_run_and_writes_nothing(comfy_server, zero123_checkpoint, disc):
    prompt = _nerf_prompt(zero123_checkpoint, disc, "fields/interrupted", iterations=1000)
    entry, done, stopped_after, _ = interrupt_after(comfy_server, prompt, "3", steps=3)
    with pytest.raises(ExecutionError) as info:
        comfy_server.raise_for_status(entry)
    assert info.value.interrupted and done < 1000
    assert stopped_after < 20, stopped_after
    assert not any(f.name.startswith("interrupted") for f in _field_files(comfy_server, "fields"))
    assert not list(comfy_server.output_dir.rglob("*.part"))
    print(f"\ninterrupted after {done} iterations, stopped {stopped_after:.1f} s later")


@pytest.mark.parametrize("widgets,limit", [
    ({"batch_size": 4, "guidance_resolution": 512}, str(4 * 256 * 256)),  # the encoder's backward memory
    ({"samples_per_ray": 4096}, "1024"),                                  # the ray marcher's cap
    ({"resolution": 4096}, "2048"),                                       # the render size cap
])
def test_sizes_the_machine_cannot_hold_are_refused_in_validation(comfy_server, zero123_checkpoint, disc,
                                                                  widgets, limit):
    errors = comfy_server.rejection(_nerf_prompt(zero123_checkpoint, disc, "fields/never_sized", **widgets), "3")
    assert limit in errors, errors


@pytest.mark.parametrize("azimuths,size", [(", ".join(["0"] * 17), 2048),               # 17 x 2048^2
                                           (", ".join(["0"] * 1025), 256)])           # 1025 x 256^2
def test_opacity_masks_past_the_memory_limit_are_refused_in_validation(comfy_server, azimuths, size):
    """Opacity Mask chunks its rays (one 2048^2 view peaks at ~0.37 GiB), but its outputs keep 28 bytes
    a pixel and the view list is free text: views x resolution^2 beyond the limit is refused, named."""
    from mpod_core.fields import RadianceField, save_radiance_field
    from mpod_core.fields.nerf import NeRFFieldConfig
    from mpod_core.encoding import HashGridConfig
    from mpod_core.fields.radiance_field import MAX_OPACITY_PIXELS
    tiny = RadianceField(NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=2, log2_hashmap_size=8)), backend="torch")
    save_radiance_field(tiny, comfy_server.input_dir / "tiny_field.safetensors")
    comfy_server.object_info(refresh=True)
    prompt = {"1": {"class_type": "MPOD3D_LoadRadianceField",
                    "inputs": {"field_file": "tiny_field.safetensors", "backend": "auto"}},
              "2": {"class_type": "MPOD3D_OpacityMask",
                    "inputs": {"field": ["1", 0], "azimuths": azimuths, "elevations": "0", "distance": 0.0,
                               "fov": 0.0, "resolution": size, "threshold": 0.5}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}}}
    errors = comfy_server.rejection(prompt, "2")
    views = len(azimuths.split(","))
    assert "Opacity Mask" in errors and f"= {views * size * size} exceeds {MAX_OPACITY_PIXELS}" in errors, errors
