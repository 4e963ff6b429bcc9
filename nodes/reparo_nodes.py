"""REPARO nodes (multi-object image -> one placed mesh per object)."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..mpod_core import mesh as meshlib
from ..mpod_core.layout.align import LayoutConfig
from ..mpod_core.layout.crop import crop_objects
from ..mpod_core.layout.ot_loss import OTLossConfig
from ..mpod_core.configdoc import config_from_values
from ..mpod_core.pipelines.reparo import ReferenceView, place_objects, placed_outputs, semantic_reference
from . import comfy_bridge as bridge
from .schema import (RENDER_BACKEND_TOOLTIP, RENDER_BACKENDS, Trimesh, backend_input, check_backend, check_image,
                     check_masks, config_input, loss_map_output, node_schema, single_value)


class CropObjects(io.ComfyNode):
    """One centred square crop per object mask, for image-to-3D models."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_CropObjects",
            description="Cut every object out of an image: one square crop per mask, the object centred and "
                        "scaled so its longer side covers `fill` of the crop, everything outside its mask set to "
                        "the background (image-to-3D models expect one centred object). Also gives, per crop, "
                        "the region the OTHER objects cover there (their masks' union minus the object's own, "
                        "resampled like its mask): where an occluded object is to be completed by an inpainting "
                        "model (REPARO sec. 3.1; workflows/reparo.json wires VAE Encode (for Inpainting), "
                        "KSampler and Image Composite Masked to it).",
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
                               tooltip="Each object's own mask in its crop (1 = object)."),
                io.String.Output("crop_boxes", display_name="crop_boxes",
                                 tooltip="JSON list, per object: its mask's box and the cropped square in the "
                                         "image's pixels, and the image size (the layout's starting placement)."),
                io.Image.Output("crop_list", display_name="crop_list", is_output_list=True,
                                tooltip="The same crops as a list: a node fed by it (e.g. an image-to-3D node) "
                                        "runs once per object."),
                io.Mask.Output("crop_mask_list", display_name="crop_mask_list", is_output_list=True,
                               tooltip="The crop masks as a list, in step with crop_list."),
                io.Mask.Output("occluded_masks", display_name="occluded_masks",
                               tooltip="K masks, the inpainting regions: where the other objects cover each crop "
                                       "(their masks' union minus the object's own, resampled as crop_masks; 0 "
                                       "for an object nothing overlaps). Crop mask + occluded mask <= 1."),
                io.Mask.Output("occluded_mask_list", display_name="occluded_mask_list", is_output_list=True,
                               tooltip="The inpainting regions as a list, in step with crop_list (the mask of VAE "
                                       "Encode (for Inpainting) and of Image Composite Masked, per object)."),
            ],
        )

    @classmethod
    def execute(cls, image, masks, size, fill, background) -> io.NodeOutput:
        image = check_image(image, "Crop Objects")
        m = check_masks(masks, "Crop Objects", size=image.shape[1:3])
        out = crop_objects(image[0, ..., :3].float(), m.float().to(image.device), size=size, fill=fill,
                           background=background)
        crops, crop_masks, occluded = out.crops.cpu(), out.masks.cpu(), out.occluded.cpu()
        return io.NodeOutput(crops, crop_masks, json.dumps([b.to_dict() for b in out.boxes]),
                             list(crops.split(1)), list(crop_masks.split(1)), occluded, list(occluded.split(1)))


class OTLayoutAlign(io.ComfyNode):
    """REPARO layout alignment: place one mesh per object so the scene matches the image."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_OTLayoutAlign",
            description="Place several meshes in one scene so that their render from the reference camera matches "
                        "the image (REPARO). Each object starts where its mask's box says; translation and scale "
                        "are then optimised with an optimal-transport loss between the rendered and the reference "
                        "pixel clouds (colour + depth + position), which pulls objects onto targets they do not "
                        "overlap, joined by a pixel-wise loss for the second half to fit the silhouettes. With a depth map "
                        "connected, objects start at the depths it gives, occluders in front; without one they "
                        "all start at the orbit target's depth. "
                        "On a 2-core CPU, 500 iterations at 256 px take about 1-2 minutes for 3 objects.",
            is_input_list=True,
            inputs=[
                io.Image.Input("image", tooltip="The reference image with all objects (the first of a batch)."),
                io.Mask.Input("masks", tooltip="One mask per object, in the meshes' order (e.g. SAM Segment "
                                               "Objects' masks); same size as the image."),
                Trimesh.Input("meshes", tooltip="One mesh per object, in the masks' order: a list (Mesh List, or "
                                                "an image-to-3D node run on each crop) or one scene."),
                *(config_input(LayoutConfig, name) for name in (
                    "iterations", "learning_rate", "optimise_translation", "optimise_depth", "optimise_scale",
                    "uniform_scale", "loss")),
                *(config_input(OTLossConfig, name) for name in ("alpha", "beta", "gamma")),
                *(config_input(LayoutConfig, name) for name in ("pixel_weight", "lambda_appearance",
                                                                "semantic_every")),
                config_input(OTLossConfig, "match_interval"),
                *(config_input(ReferenceView, name) for name in ("resolution", "fov", "distance")),
                config_input(LayoutConfig, "seed"),
                backend_input(RENDER_BACKEND_TOOLTIP),
                io.Image.Input("depth", optional=True,
                               tooltip="Optional relative depth of the image, near = bright (Estimate Depth's "
                                       "output, or any depth estimator's; same view and aspect as the image, "
                                       "any size). Each object then starts at the depth the map gives it "
                                       "(sized for that depth, occluders in front), the depth term joins the "
                                       "transport cost (REPARO sec. 3.2, eq. 4), and optimise_depth=auto lets "
                                       "objects move along the view axis. A constant map is refused."),
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
                loss_map_output("ot, pixel, semantic"),
            ],
        )

    @classmethod
    def execute(cls, image, masks, meshes, **kwargs) -> io.NodeOutput:
        node = "OT Layout Align"
        args = {k: single_value(v, k, node) for k, v in kwargs.items()}
        image = check_image(single_value(image, "image", node), node)
        reference = image[0, ..., :3].float()
        masks = check_masks(single_value(masks, "masks", node), node, size=reference.shape[:2])
        meshes = meshlib.mesh_list(meshes, "OT Layout Align: meshes")
        depth = args.pop("depth", None)
        if depth is not None:
            depth = check_image(depth, node, "depth")[0, ..., :3].float().mean(-1)
        clip_vision = args.pop("clip_vision", None)
        config = config_from_values(LayoutConfig, args, ot=config_from_values(OTLossConfig, args))
        config.validate()
        view = config_from_values(ReferenceView, args)
        names = meshlib.object_names(None, len(meshes))
        device = bridge.torch_device()
        semantic = None
        if clip_vision is not None:
            from .comfy_bridge.semantic import dino_semantic_loss
            semantic = dino_semantic_loss(clip_vision, semantic_reference(reference, masks, config.background))
        tensors = [meshlib.mesh_to_tensors(m, device=device) for m in meshes]
        with torch.inference_mode(False), torch.enable_grad():
            placement = place_objects(
                tensors, reference.to(device), masks.float().to(device), config,
                depth=None if depth is None else depth.to(device), resolution=view.resolution,
                distance=view.distance, fov=view.fov, semantic_loss=semantic,
                progress=bridge.Progress(config.iterations),
                backend=RENDER_BACKENDS[check_backend(node, args["backend"])], names=names)
        placed, scene, layout = placed_outputs(meshes, placement, names)
        return io.NodeOutput(placed, scene, placement.overlay[None].cpu().float(), json.dumps(layout),
                             placement.result.loss_map)


NODES = [CropObjects, OTLayoutAlign]
