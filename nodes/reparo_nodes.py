"""REPARO nodes (multi-object image -> one placed mesh per object)."""
from __future__ import annotations

import json

import torch
import trimesh
from comfy_api.latest import io

from ..mpod_core import mesh as meshlib
from ..mpod_core.layout.align import LOSSES, LayoutConfig
from ..mpod_core.layout.crop import crop_objects
from ..mpod_core.layout.ot_loss import OTLossConfig
from ..mpod_core.pipelines.reparo import place_objects
from ..mpod_core.render import BACKENDS as RENDER_BACKENDS
from . import comfy_bridge as bridge
from .registry import NODE_DISPLAY_NAMES, REPARO_CATEGORY, TRIMESH_TYPE

Trimesh = io.Custom(TRIMESH_TYPE)


def _schema(node_id: str, **kwargs) -> io.Schema:
    return io.Schema(node_id=node_id, display_name=NODE_DISPLAY_NAMES[node_id], category=REPARO_CATEGORY, **kwargs)


class CropObjects(io.ComfyNode):
    """One centred square crop per object mask, for image-to-3D models."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "MPOD3D_CropObjects",
            description="Cut every object out of an image: one square crop per mask, the object centred and "
                        "scaled so its longer side covers `fill` of the crop, everything outside its mask set to "
                        "the background (image-to-3D models expect one centred object). Occluded objects can be "
                        "inpainted afterwards with ComfyUI's inpainting nodes, using the crop masks.",
            inputs=[
                io.Image.Input("image", tooltip="The image with several objects (the first of a batch is used)."),
                io.Mask.Input("masks", tooltip="One mask per object (a batch of K masks, 1 = object), e.g. from "
                                               "a segmentation node; same size as the image."),
                io.Int.Input("size", default=256, min=64, max=2048, step=8,
                             tooltip="Side of the square crops in pixels (Zero123: 256)."),
                io.Float.Input("fill", default=0.8, min=0.1, max=1.0, step=0.05,
                               tooltip="Fraction of the crop covered by the object's longer side."),
                io.Float.Input("background", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Grey level outside the object (1 = white, what Zero123 expects)."),
            ],
            outputs=[
                io.Image.Output("crops", display_name="crops", tooltip="K square crops, one per object."),
                io.Mask.Output("crop_masks", display_name="crop_masks",
                               tooltip="Each object's mask in its crop (also the inpainting region's complement)."),
                io.String.Output("crop_boxes", display_name="crop_boxes",
                                 tooltip="JSON list, per object: its mask's box and the cropped square in the "
                                         "image's pixels, and the image size (the layout's starting placement)."),
                io.Image.Output("crop_list", display_name="crop_list", is_output_list=True,
                                tooltip="The same crops as a list: a node fed by it (e.g. an image-to-3D node) "
                                        "runs once per object."),
                io.Mask.Output("crop_mask_list", display_name="crop_mask_list", is_output_list=True,
                               tooltip="The crop masks as a list, in step with crop_list."),
            ],
        )

    @classmethod
    def execute(cls, image, masks, size, fill, background) -> io.NodeOutput:
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError("image: expected a ComfyUI IMAGE (B, H, W, 3)")
        if not isinstance(masks, torch.Tensor) or masks.ndim not in (2, 3):
            raise ValueError("masks: expected a ComfyUI MASK batch (K, H, W)")
        m = masks if masks.ndim == 3 else masks[None]
        crops, crop_masks, boxes = crop_objects(image[0, ..., :3].float(), m.float().to(image.device), size=size,
                                                fill=fill, background=background)
        crops, crop_masks = crops.cpu(), crop_masks.cpu()
        return io.NodeOutput(crops, crop_masks, json.dumps([b.to_dict() for b in boxes]),
                             list(crops.split(1)), list(crop_masks.split(1)))


def _single(value, name: str):
    """The one value of a list input (the node takes lists because of its mesh input)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{name}: expected one value, got a list of {len(value)}; only the meshes may be a list")
        return value[0]
    return value


def _meshes(values) -> list:
    """The meshes input as a flat list; a single Scene stands for its objects (each moved to its place)."""
    meshes = [m for m in values if m is not None]
    if len(meshes) == 1 and isinstance(meshes[0], trimesh.Scene):
        return [obj.mesh.copy().apply_transform(obj.transform)
                for obj in meshlib.scene_objects(meshes[0], "meshes")]
    return [meshlib.check_mesh(m, f"meshes: mesh {i + 1}") for i, m in enumerate(meshes)]


class OTLayoutAlign(io.ComfyNode):
    """REPARO layout alignment: place one mesh per object so the scene matches the image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "MPOD3D_OTLayoutAlign",
            description="Place several meshes in one scene so that their render from the reference camera matches "
                        "the image (REPARO). Each object starts where its mask's box says; translation and scale "
                        "are then optimised with an optimal-transport loss between the rendered and the reference "
                        "pixel clouds (colour + depth + position), which pulls objects onto targets they do not "
                        "overlap, joined by a pixel-wise loss for the second half to fit the silhouettes. "
                        "On a 2-core CPU, 500 iterations at 256 px take about 1-2 minutes for 3 objects.",
            is_input_list=True,
            inputs=[
                io.Image.Input("image", tooltip="The reference image with all objects (the first of a batch)."),
                io.Mask.Input("masks", tooltip="One mask per object, in the meshes' order (e.g. SAM Segment "
                                               "Objects' masks); same size as the image."),
                Trimesh.Input("meshes", tooltip="One mesh per object, in the masks' order: a list (Mesh List, or "
                                                "an image-to-3D node run on each crop) or one scene."),
                io.Int.Input("iterations", default=500, min=1, max=10000,
                             tooltip="Optimisation steps (REPARO: 500)."),
                io.Float.Input("learning_rate", default=0.02, min=1e-4, max=1.0, step=0.001,
                               tooltip="Adam learning rate (REPARO: 0.02), decayed by 0.999 per step."),
                io.Boolean.Input("optimise_translation", default=True,
                                 tooltip="Move the objects (in the image plane; see optimise_depth)."),
                io.Boolean.Input("optimise_depth", default=False,
                                 tooltip="Also move objects towards or away from the camera. Off by default: from "
                                         "one view a move in depth looks almost like a scale change."),
                io.Boolean.Input("optimise_scale", default=True, tooltip="Rescale the objects."),
                io.Boolean.Input("uniform_scale", default=True,
                                 tooltip="One scale per object (keeps its proportions). Off scales x, y and z "
                                         "apart, as the paper's code; z is then only constrained by a depth map."),
                io.Combo.Input("loss", options=list(LOSSES), default="ot",
                               tooltip="ot: optimal transport (REPARO), reaches objects that start off their "
                                       "target; l2: plain pixel-wise colour difference, the baseline."),
                io.Float.Input("alpha_rgb", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of colour in the transport cost (eq. 4's alpha)."),
                io.Float.Input("beta_depth", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of depth in the transport cost (beta); used only with a depth map."),
                io.Float.Input("gamma_xy", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the pixel position in the transport cost (gamma)."),
                io.Float.Input("pixel_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the pixel-wise term that joins the OT loss for the second "
                                       "half (it fixes the scales, which OT alone cannot). 0 = OT only."),
                io.Float.Input("lambda_appearance", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Eq. 9's lambda between the appearance and the semantic loss; used only "
                                       "when clip_vision is connected."),
                io.Int.Input("semantic_every", default=1, min=1, max=1000,
                             tooltip="Evaluate the DINOv2 semantic loss every n-th step only (used only with "
                                     "clip_vision). One DINOv2-large step at 224 px costs ~9 s on a 2-core CPU."),
                io.Int.Input("match_interval", default=5, min=1, max=100,
                             tooltip="Steps between two optimal-transport matchings (REPARO: ~5)."),
                io.Int.Input("resolution", default=256, min=32, max=1024, step=8,
                             tooltip="Longer side of the renders; the image is resized to it (REPARO: 256)."),
                io.Float.Input("fov", default=40.0, min=5.0, max=120.0, step=0.5,
                               tooltip="Vertical field of view of the reference camera, in degrees."),
                io.Float.Input("camera_distance", default=2.5, min=0.1, max=100.0, step=0.1,
                               tooltip="Distance of the camera from the world origin; sets the world units."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of the random subsets used by the matching."),
                io.Combo.Input("backend", options=list(RENDER_BACKENDS), default="auto",
                               tooltip="Rasterizer: auto (nvdiffrast on CUDA if installed, else PyTorch), torch "
                                       "or nvdiffrast."),
                io.Image.Input("depth", optional=True,
                               tooltip="Optional relative depth of the image, near = bright (e.g. a Depth "
                                       "Anything node's output). Turns the depth term on."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional DINOv2 (Load CLIP Vision) for REPARO's semantic loss."),
            ],
            outputs=[
                Trimesh.Output("placed_meshes", display_name="placed_meshes", is_output_list=True,
                               tooltip="Each object's mesh moved to its place, as a list (Save Mesh saves one "
                                       "file each)."),
                Trimesh.Output("scene", display_name="scene",
                               tooltip="All objects in one scene (Save Mesh: one GLB, a named node per object)."),
                io.Image.Output("overlay", display_name="overlay",
                                tooltip="The final render blended half and half with the reference."),
                io.String.Output("layout", display_name="layout",
                                 tooltip="JSON: per object its name, world translation, scale and 4x4 matrix."),
                io.Custom("LOSS_MAP").Output("loss_map", display_name="loss_map",
                                             tooltip="Loss at each iteration under \"loss\" (what core Plot Loss "
                                                     "Graph draws), and the terms ot, pixel, semantic unweighted "
                                                     "(0 where not part of that iteration)."),
            ],
        )

    @classmethod
    def execute(cls, image, masks, meshes, **kwargs) -> io.NodeOutput:
        args = {k: _single(v, k) for k, v in kwargs.items()}
        image, masks = _single(image, "image"), _single(masks, "masks")
        meshes = _meshes(meshes)
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError("image: expected a ComfyUI IMAGE (B, H, W, 3)")
        if not isinstance(masks, torch.Tensor) or masks.ndim not in (2, 3):
            raise ValueError("masks: expected a ComfyUI MASK batch (K, H, W)")
        depth = args.pop("depth", None)
        if depth is not None:
            depth = depth[0, ..., :3].float().mean(-1)
        clip_vision = args.pop("clip_vision", None)
        if args["backend"] not in RENDER_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(RENDER_BACKENDS)}")
        config = LayoutConfig(
            iterations=args["iterations"], learning_rate=args["learning_rate"],
            optimise_translation=args["optimise_translation"], optimise_depth=args["optimise_depth"],
            optimise_scale=args["optimise_scale"], uniform_scale=args["uniform_scale"], loss=args["loss"],
            pixel_l2=args["pixel_weight"], lambda_appearance=args["lambda_appearance"],
            semantic_every=args["semantic_every"], seed=args["seed"],
            ot=OTLossConfig(alpha=args["alpha_rgb"], beta=args["beta_depth"], gamma=args["gamma_xy"],
                            match_interval=args["match_interval"]))
        config.validate()
        names = meshlib.object_names(None, len(meshes))
        device = bridge.torch_device()
        reference = image[0, ..., :3].float()
        semantic = None
        if clip_vision is not None:
            from .comfy_bridge.semantic import dino_semantic_loss
            # Compared with renders of the objects on the background: the reference without its own background.
            union = (masks.float().reshape(-1, *masks.shape[-2:]).amax(0) > 0.5)[..., None].to(reference)
            semantic = dino_semantic_loss(clip_vision, reference * union + (1 - union))
        tensors = [meshlib.mesh_to_tensors(m, device=device) for m in meshes]
        with torch.inference_mode(False), torch.enable_grad():
            placement = place_objects(
                tensors, reference.to(device), masks.float().to(device), config,
                depth=None if depth is None else depth.to(device), resolution=args["resolution"],
                distance=args["camera_distance"], fov=args["fov"], semantic_loss=semantic,
                progress=bridge.Progress(config.iterations), backend=args["backend"], names=names)
        matrices = placement.matrices.cpu().numpy()
        placed = []
        for mesh, matrix in zip(meshes, matrices):
            moved = mesh.copy()
            moved.apply_transform(matrix)
            placed.append(moved)
        scene = meshlib.compose_scene(meshes, names, transforms=list(matrices))
        layout = [{"name": n, "translation": t.tolist(), "scale": s.tolist(), "matrix": m.tolist()}
                  for n, t, s, m in zip(names, placement.translations.cpu(), placement.scales.cpu(), matrices)]
        return io.NodeOutput(placed, scene, placement.overlay[None].cpu().float(), json.dumps(layout),
                             placement.result.loss_map)


NODES = [CropObjects, OTLayoutAlign]
