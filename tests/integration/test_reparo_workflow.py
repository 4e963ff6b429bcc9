"""REPARO in a live ComfyUI.

* The bundled workflow (Load Image -> SAM -> Crop Objects -> inpainting of the occluded regions with
  core nodes (SD 1.5 inpainting) -> Zero123 SDS NeRF per completed crop -> Field to Mesh -> OT Layout
  Align -> Save Mesh), converted from its UI file, with a random-weight SAM, SD 1.5 inpainting and
  Stable Zero123 and every long step shrunk for the CPU: it runs end to end and saves one GLB per
  object plus one scene GLB, all valid; the inpainting ran once per object, the completed crops equal
  the crops outside the occluded regions and the inpainted images inside, and Zero123's mask is the
  crop mask plus the painted (not near-white) part of the occluded region.
* A known answer: meshes shipped as GLB files in their own frames, the reference rendered from a
  known layout: OT Layout Align recovers the layout.
* Bad inputs give node errors that name the problem.
"""
from __future__ import annotations

import json

import numpy as np
import pygltflib
import pytest
import torch
import trimesh
from PIL import Image

from harness.comfy_server import ExecutionError
from harness.depth import write_depth_anything
from harness.gltf import validate_gltf
from harness.loss_graph import add_loss_graph, check_loss_graph
from harness.paths import WORKFLOWS_DIR
from harness.progress import interrupt_after
from harness.sam import write_sam_checkpoint
from harness.workflow_convert import ui_to_api
from mpod_core.layout.scene import LayoutScene, render_scene
from mpod_core.layout.synthetic import make_scene

ALIGN = "MPOD3D_OTLayoutAlign"
pytestmark = pytest.mark.filterwarnings("ignore:mpod_core.render")


def _validated(path):
    report = validate_gltf(path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"][:5]
    return path


def _glbs(server, entry, node_id):
    return [server.output_dir / i.get("subfolder", "") / i["filename"] for i in entry["outputs"][node_id]["3d"]]


def _pngs(server, entry, node_id):
    """The images a SaveImage node wrote, in order, as uint8 arrays (H, W, 3)."""
    return [np.asarray(Image.open(server.output_dir / i.get("subfolder", "") / i["filename"]).convert("RGB"))
            for i in entry["outputs"][node_id]["images"]]


def _save(api, name, source, mask=False):
    """Add a SaveImage (behind MaskToImage for a mask) of ``source`` ([node, slot]) to an API prompt."""
    if mask:
        api[f"{name}_image"] = {"class_type": "MaskToImage", "inputs": {"mask": source}}
        source = [f"{name}_image", 0]
    api[name] = {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": f"reparo_inpaint/{name}"}}
    return name


INPAINT_KINDS = ("CheckpointLoaderSimple", "VAEEncodeForInpaint", "KSampler", "VAEDecode", "ImageCompositeMasked")


def _bundled_api(server, load_workflow, zero123_checkpoint, sd15_inpaint_checkpoint):
    """reparo.json converted from its UI file, with the random checkpoints and tiny settings (64^2 crops, one
    sampling step, 2 stage-1 iterations, 4 layout iterations); the shipped settings are checked on the way."""
    sam_name = "mpod3d_random_sam_tiny.pth"
    if not (server.models_dir / "sams" / sam_name).exists():
        write_sam_checkpoint(server.models_dir / "sams" / sam_name)
    depth_name = "mpod3d_random_depth_anything"
    if not (server.models_dir / "depth_estimation" / depth_name).exists():
        write_depth_anything(server.models_dir / "depth_estimation" / depth_name)
    example = server.upload(WORKFLOWS_DIR / "inputs" / "reparo_example.png")["name"]
    api = ui_to_api(load_workflow("reparo"), server.object_info(refresh=True))
    kinds = {n["class_type"]: k for k, n in api.items()}
    assert {"MPOD3D_LoadSAM", "MPOD3D_SAMSegmentObjects", "MPOD3D_CropObjects", "MPOD3D_Zero123SDSNeRF",
            "MPOD3D_FieldToMesh", ALIGN, "MPOD3D_SaveMesh", "Preview3D", "MaskComposite", *INPAINT_KINDS,
            "MPOD3D_LoadDepthModel", "MPOD3D_EstimateDepth"} <= set(kinds)
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadImage":
            inputs["image"] = example
        elif kind == "MPOD3D_LoadSAM":
            inputs["sam_file"] = sam_name
        elif kind == "ImageOnlyCheckpointLoader":
            inputs["ckpt_name"] = zero123_checkpoint
        elif kind == "CheckpointLoaderSimple":
            assert inputs["ckpt_name"] == "sd-v1-5-inpainting.ckpt"
            inputs["ckpt_name"] = sd15_inpaint_checkpoint
        elif kind == "VAEEncodeForInpaint":
            assert inputs["grow_mask_by"] == 6
        elif kind == "KSampler":
            assert (inputs["steps"], inputs["cfg"], inputs["denoise"]) == (20, 7.5, 1.0)
            inputs["steps"] = 1
        elif kind == "MPOD3D_LoadDepthModel":
            assert inputs["model_folder"] == "Depth-Anything-V2-Small-hf"
            inputs["model_folder"] = depth_name
        elif kind == "MPOD3D_CropObjects":
            inputs["size"] = 64
        elif kind == "MPOD3D_Zero123SDSNeRF":
            assert inputs["iterations"] == 5000 and inputs["invert_mask"] is False  # crop masks: 1 = object
            inputs.update(iterations=2, resolution=32, guidance_resolution=64, samples_per_ray=64, turntable_frames=1)
        elif kind == "MPOD3D_FieldToMesh":
            inputs.update(resolution=24, threshold=5.0)
        elif kind == ALIGN:
            assert inputs["iterations"] == 500 and inputs["learning_rate"] == 0.02 and inputs["resolution"] == 256
            inputs.update(iterations=4, resolution=64)
    # The inpainting step's wiring: per object, its crop and occluded region in, the completed crop to Zero123.
    crop, nerf = kinds["MPOD3D_CropObjects"], kinds["MPOD3D_Zero123SDSNeRF"]
    encode, composite = kinds["VAEEncodeForInpaint"], kinds["ImageCompositeMasked"]
    assert api[encode]["inputs"]["pixels"] == [crop, 3] and api[encode]["inputs"]["mask"] == [crop, 6]
    assert api[composite]["inputs"]["destination"] == [crop, 3] and api[composite]["inputs"]["mask"] == [crop, 6]
    assert api[composite]["inputs"]["source"] == [kinds["VAEDecode"], 0]
    assert api[nerf]["inputs"]["image"] == [composite, 0]
    # The depth map of the reference image feeds the layout (its depth-aware start and depth term).
    estimate = kinds["MPOD3D_EstimateDepth"]
    assert api[kinds[ALIGN]]["inputs"]["depth"] == [estimate, 0]
    assert api[estimate]["inputs"]["image"] == [kinds["LoadImage"], 0]
    assert api[kinds[ALIGN]]["inputs"]["optimise_depth"] == "off"
    return api, kinds


def _save_inpainting(api, kinds):
    """SaveImage nodes for the crops, their masks and occluded regions, the inpainted and completed crops and
    Zero123's mask input; returns {name: node id}."""
    crop = kinds["MPOD3D_CropObjects"]
    return {"crops": _save(api, "crops", [crop, 0]), "masks": _save(api, "masks", [crop, 1], mask=True),
            "occluded": _save(api, "occluded", [crop, 5], mask=True),
            "inpainted": _save(api, "inpainted", [kinds["VAEDecode"], 0]),
            "completed": _save(api, "completed", [kinds["ImageCompositeMasked"], 0]),
            "nerf_mask": _save(api, "nerf_mask", api[kinds["MPOD3D_Zero123SDSNeRF"]]["inputs"]["mask"], mask=True)}


def _executed(entry, api, kinds) -> bool:
    """Whether every node of those kinds ran in this prompt (none came from the cache)."""
    cached = {n for kind, details in entry["status"]["messages"] if kind == "execution_cached"
              for n in details.get("nodes", [])}
    return not cached & {k for k, n in api.items() if n["class_type"] in kinds}


def _nerf_mask_error(images, k):
    """Pixels of Zero123's mask off its definition (the crop mask plus the occluded region where the completed
    crop is not near white: all channels above 0.95) by more than the PNG bytes' truncation, and how many
    pixels that term covers. Pixels whose bytes cannot tell which side of 0.95 they were are left out."""
    completed, occluded = images["completed"][k].astype(int), images["occluded"][k][..., 0].astype(int)
    white, maybe_white = (completed >= 243).all(-1), (completed >= 242).all(-1)  # 0.95 * 255 = 242.25
    painted = ~white
    expected = np.clip(images["masks"][k][..., 0].astype(int) + occluded * painted, 0, 255)
    got = images["nerf_mask"][k][..., 0].astype(int)
    wrong = (np.abs(got - expected) > 2) & (white == maybe_white)
    return int(wrong.sum()), int(((occluded > 2) & painted).sum())


def test_bundled_reparo_workflow_runs_end_to_end(comfy_server, zero123_checkpoint, sd15_inpaint_checkpoint,
                                                 load_workflow):
    api, kinds = _bundled_api(comfy_server, load_workflow, zero123_checkpoint, sd15_inpaint_checkpoint)
    image_saves = _save_inpainting(api, kinds)
    entry = comfy_server.run(api, timeout=1800)
    assert _executed(entry, api, INPAINT_KINDS)
    images = {name: _pngs(comfy_server, entry, node) for name, node in image_saves.items()}
    # Batches: one file of K; lists (the inpainting ran once per object): K files.
    assert [len(v) for v in images.values()] == [3, 3, 3, 3, 3, 3]
    for k in range(3):
        crop_k, inpainted, completed = (images[n][k].astype(int) for n in ("crops", "inpainted", "completed"))
        occluded = images["occluded"][k][..., 0]
        assert crop_k.shape == completed.shape == inpainted.shape == (64, 64, 3)
        # Random SAM masks are salt and pepper over the whole image, so every crop's region is soft (box-filtered
        # overlaps, below 0.5: VAE Encode (for Inpainting) rounds it away); the composite still blends by it.
        m, clear = occluded[..., None] / 255.0, occluded == 0  # PNG bytes truncate: 0 = below 1/255
        assert (occluded > 25).sum() >= 100, (k, (occluded > 25).sum())
        # Visible pixels kept: the crop where the region is 0 (tails below 1/255 move a byte at most) ...
        assert np.abs(completed - crop_k)[clear].max() <= 1
        assert (completed == crop_k)[clear].mean() > 0.99
        # ... elsewhere the inpainted image blended in by the region, with the random model's image far from the
        # crop where the region is.
        assert np.abs(completed - (m * inpainted + (1 - m) * crop_k)).max() <= 3
        assert np.abs(inpainted - crop_k)[occluded > 25].mean() > 20
        wrong, term = _nerf_mask_error(images, k)
        assert term >= 100 and wrong <= 0.01 * term, (k, wrong, term)
    saves = [k for k, n in api.items() if n["class_type"] == "MPOD3D_SaveMesh"]
    per_object = next(k for k in saves if api[k]["inputs"]["mesh"][1] == 0)
    whole = next(k for k in saves if api[k]["inputs"]["mesh"][1] == 1)
    objects = _glbs(comfy_server, entry, per_object)
    assert len(objects) == 3 and len(set(objects)) == 3  # one file per object of the example
    for path in objects:
        _validated(path)
    (scene_file,) = _glbs(comfy_server, entry, whole)
    gltf = pygltflib.GLTF2().load(str(_validated(scene_file)))
    assert sorted(n.name for n in gltf.nodes if n.mesh is not None) == ["object_00", "object_01", "object_02"]
    # The scene's objects sit where the per-object files put them.
    loaded = trimesh.load(scene_file, force="scene")
    for name, path in zip(["object_00", "object_01", "object_02"], objects):
        placed = trimesh.load(path, force="mesh")
        world = loaded.graph[name][0]
        geometry = loaded.geometry[loaded.graph[name][1]]
        bounds = trimesh.transform_points(geometry.bounds, world)
        assert np.allclose(np.sort(bounds, 0), placed.bounds, atol=1e-4)


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_bundled_inpainting_completes_a_known_occlusion(comfy_server, sd15_inpaint_checkpoint, load_workflow,
                                                       tmp_path):
    """The workflow's inpainting step alone (its nodes as converted, Crop Objects fed known masks): A's crop is
    an integer copy (fill 0.625: a 40 px box in a 64 px square), so its occluded region is exactly B's rectangle
    there; inside it the completed crop is the inpainted image, outside it the crop; C, which nothing covers,
    comes out unchanged with its own mask for Zero123."""
    api, kinds = _bundled_api(comfy_server, load_workflow, "unused", sd15_inpaint_checkpoint)
    crop, nerf = kinds["MPOD3D_CropObjects"], kinds["MPOD3D_Zero123SDSNeRF"]
    keep = {crop} | {k for k, n in api.items() if n["class_type"] in (*INPAINT_KINDS, "CLIPTextEncode",
                                                                         "ImageToMask", "ThresholdMask",
                                                                         "MaskComposite", "InvertMask")}
    keep.add(nerf)  # only its mask input is read below; the node itself is dropped
    image = np.full((160, 160, 3), 255, np.uint8)
    masks = np.zeros((3, 160, 160), np.uint8)
    masks[0, 20:60, 20:60] = 255
    masks[1, 40:70, 45:80] = 255
    masks[0][masks[1] > 0] = 0  # B in front of A's lower-right corner
    masks[2, 110:150, 110:150] = 255
    for k, colour in enumerate(((220, 30, 30), (30, 200, 30), (30, 30, 220))):
        image[masks[k] > 0] = colour
    names = [comfy_server.upload(_png(tmp_path / "inpaint_scene.png", image))["name"]]
    for k in range(3):
        rgb = np.stack([masks[k], np.zeros_like(masks[k]), np.zeros_like(masks[k])], -1)
        names.append(comfy_server.upload(_png(tmp_path / f"inpaint_mask_{k}.png", rgb))["name"])
    prompt = {k: v for k, v in api.items() if k in keep}
    for i, name in enumerate(names):
        prompt[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    prompt["b0"] = {"class_type": "ImageBatch", "inputs": {"image1": ["load1", 0], "image2": ["load2", 0]}}
    prompt["b1"] = {"class_type": "ImageBatch", "inputs": {"image1": ["b0", 0], "image2": ["load3", 0]}}
    prompt["known_masks"] = {"class_type": "ImageToMask", "inputs": {"image": ["b1", 0], "channel": "red"}}
    prompt[crop]["inputs"].update(image=["load0", 0], masks=["known_masks", 0], size=64, fill=0.625)
    image_saves = _save_inpainting(prompt, kinds)
    del prompt[nerf]
    entry = comfy_server.run(prompt, timeout=600)
    assert _executed(entry, prompt, INPAINT_KINDS[1:])
    images = {name: _pngs(comfy_server, entry, node) for name, node in image_saves.items()}
    crops, occluded = images["crops"], [o[..., 0] for o in images["occluded"]]
    # A's square is x, y 8..72: crop pixel (i, j) is image pixel (8 + i, 8 + j), so the region is B's mask there.
    assert np.array_equal(occluded[0], masks[1, 8:72, 8:72])
    assert np.array_equal(images["masks"][0][..., 0], masks[0, 8:72, 8:72])
    hidden = occluded[0] == 255
    assert np.array_equal(images["completed"][0][hidden], images["inpainted"][0][hidden])
    assert np.array_equal(images["completed"][0][~hidden], crops[0][~hidden])
    assert np.abs(images["inpainted"][0].astype(int) - crops[0])[hidden].mean() > 20
    assert occluded[1].max() == 255  # A's visible part in B's crop
    assert not occluded[2].any()  # nothing covers C: its crop passes unchanged, its mask is its own
    assert np.array_equal(images["completed"][2], crops[2])
    assert np.array_equal(images["nerf_mask"][2], images["masks"][2])
    wrong, term = _nerf_mask_error(images, 0)
    assert wrong <= 0.01 * term, (wrong, term)
    nerf_mask, painted = images["nerf_mask"][0][..., 0], ~(images["completed"][0] > 0.95 * 255).all(-1)
    assert (nerf_mask[hidden & painted] == 255).all() and not nerf_mask[hidden & ~painted].any()



@pytest.fixture(scope="module")
def known_scene(comfy_server, tmp_path_factory):
    """A 3-object scene with a known layout (depth 0), its reference render and masks as PNG files, and
    the three meshes as GLB files in their own frames (moved and enlarged: the node must not rely on them)."""
    folder = tmp_path_factory.mktemp("reparo_known")
    scene = make_scene(3, seed=4, resolution=96)
    scene.translations[:, 2] = 0.0
    with torch.no_grad():
        render = render_scene(LayoutScene(scene.objects, scene.translations, scene.scales), scene.camera, 128, 96)
    names = {}
    Image.fromarray((render.color.numpy() * 255).round().astype(np.uint8)).save(folder / "known_scene.png")
    names["image"] = comfy_server.upload(folder / "known_scene.png")["name"]
    for k, obj in enumerate(scene.objects):
        mask = ((render.object_id == k).numpy() * 255).astype(np.uint8)
        zero = np.zeros_like(mask)  # red only: the blue channel is an empty mask
        Image.fromarray(np.stack([mask, zero, zero], -1)).save(folder / f"known_mask_{k}.png")
        names[f"mask{k}"] = comfy_server.upload(folder / f"known_mask_{k}.png")["name"]
        colours = np.concatenate([(obj.colors.numpy() * 255).round(), np.full((len(obj.colors), 1), 255)], 1)
        mesh = trimesh.Trimesh(obj.vertices.numpy() * 2.0 + np.array([3.0, 1.0, -2.0]), obj.faces.numpy(),
                               vertex_colors=colours.astype(np.uint8), process=False)
        mesh.export(folder / f"known_object_{k}.glb")
        names[f"mesh{k}"] = comfy_server.upload(folder / f"known_object_{k}.glb", subfolder="3d")["name"]
    return scene, names


def _align_prompt(names, iterations=200, masks=(0, 1, 2), meshes=(0, 1, 2)):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": names["image"]}}}
    for k in masks:
        prompt[f"m{k}"] = {"class_type": "LoadImage", "inputs": {"image": names[f"mask{k}"]}}
    batch = [f"m{masks[0]}", 0]
    for i, k in enumerate(masks[1:]):
        prompt[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [f"m{k}", 0]}}
        batch = [f"b{i}", 0]
    prompt["masks"] = {"class_type": "ImageToMask", "inputs": {"image": batch, "channel": "red"}}
    slots = {}
    for i, k in enumerate(meshes):
        prompt[f"l{k}"] = {"class_type": "MPOD3D_LoadMesh", "inputs": {"mesh_file": f"3d/{names[f'mesh{k}']}",
                                                                      "normalize": False}}
        slots[f"mesh_{i + 1}"] = [f"l{k}", 0]
    prompt["list"] = {"class_type": "MPOD3D_MeshList", "inputs": slots}
    prompt["align"] = {"class_type": ALIGN, "inputs": {
        "image": ["1", 0], "masks": ["masks", 0], "meshes": ["list", 0], "iterations": iterations,
        "learning_rate": 0.02, "optimise_translation": True, "optimise_depth": "off", "optimise_scale": True,
        "uniform_scale": True, "loss": "ot", "alpha": 1.0, "beta": 1.0, "gamma": 1.0,
        "pixel_weight": 1.0, "lambda_appearance": 0.5, "semantic_every": 1, "match_interval": 5,
        "resolution": 128, "fov": 40.0,
        "distance": 2.5, "seed": 0, "backend": "auto"}}
    prompt["save"] = {"class_type": "MPOD3D_SaveMesh", "inputs": {"mesh": ["align", 0], "filename_prefix":
                                                                   "reparo_known/object", "format": "glb"}}
    prompt["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["align", 3]}}
    return prompt


def test_layout_align_recovers_a_known_layout_from_shipped_meshes(comfy_server, known_scene):
    scene, names = known_scene
    prompt = _align_prompt(names)
    add_loss_graph(prompt, "align", 4)
    entry = comfy_server.run(prompt, timeout=900)
    check_loss_graph(comfy_server, entry, steps=200)
    files = _glbs(comfy_server, entry, "save")
    assert len(files) == 3
    boxes = LayoutScene(scene.objects, scene.translations, scene.scales).object_boxes().detach()
    for k, path in enumerate(files):
        placed = trimesh.load(_validated(path), force="mesh")
        error = np.abs(placed.bounds - boxes[k].numpy()).max() / scene.extent
        assert error < 0.02, (k, placed.bounds, boxes[k])
    layout = json.loads(entry["outputs"]["show"]["text"][0])
    assert [o["name"] for o in layout] == ["object_00", "object_01", "object_02"]
    assert np.allclose([o["translation"] for o in layout], scene.translations.numpy(), atol=0.02 * scene.extent)


def _error(server, prompt) -> str:
    with pytest.raises(ExecutionError) as info:
        server.run(prompt, timeout=600)
    return info.value.exception_message


def test_layout_align_bad_inputs_name_the_problem(comfy_server, known_scene):
    _, names = known_scene
    assert "got 2 masks and 3 meshes" in _error(comfy_server, _align_prompt(names, iterations=2, masks=(0, 1)))
    empty = _align_prompt(names, iterations=2)
    empty["masks"]["inputs"]["channel"] = "blue"
    assert "object_00: its mask is empty" in _error(comfy_server, empty)


def test_layout_align_shows_previews_and_stops_on_cancel(comfy_server, known_scene):
    _, names = known_scene
    prompt = _align_prompt(names, iterations=5000)
    saved = comfy_server.output_dir / "reparo_known"
    before = sorted(saved.glob("*")) if saved.is_dir() else []
    entry, done, stopped_after, previews = interrupt_after(comfy_server, prompt, "align", steps=12)
    with pytest.raises(ExecutionError) as info:
        comfy_server.raise_for_status(entry)
    assert info.value.interrupted and done < 5000
    assert stopped_after < 10, stopped_after
    assert previews >= 2, previews  # the first step's overlay and every 10th step's
    assert (sorted(saved.glob("*")) if saved.is_dir() else []) == before  # nothing saved, nothing half-written
