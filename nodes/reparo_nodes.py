"""REPARO nodes (multi-object image -> one placed mesh per object)."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..mpod_core.layout.crop import crop_objects
from .registry import NODE_DISPLAY_NAMES, REPARO_CATEGORY


class CropObjects(io.ComfyNode):
    """One centred square crop per object mask, for image-to-3D models."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MPOD3D_CropObjects", display_name=NODE_DISPLAY_NAMES["MPOD3D_CropObjects"],
            category=REPARO_CATEGORY,
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
        return io.NodeOutput(crops.cpu(), crop_masks.cpu(), json.dumps([b.to_dict() for b in boxes]))


NODES = [CropObjects]
