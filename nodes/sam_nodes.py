"""REPARO object segmentation: Load SAM Model and SAM Segment Objects (one SAM mask per box).

``segment_anything`` is imported only when a node runs (through mpod_core.segment),
so a missing package never stops the pack from loading.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..mpod_core import segment as seg
from . import comfy_bridge as bridge
from .schema import SamModel, check_image, check_masks, node_schema


#: ComfyUI model folder of SAM checkpoints (the name other packs use too): models/sams.
SAM_FOLDER = "sams"
SAM_EXTENSIONS = (".pth", ".pt", ".safetensors")
DEVICES = ("auto", "cpu")
_OFFICIAL = ", ".join(seg.SAM_CHECKPOINTS.values())


def _missing_checkpoint(sam_file: str, reason: str) -> str:
    return (f"Load SAM Model: {reason}. Put a Segment Anything checkpoint in ComfyUI's models/{SAM_FOLDER} "
            f"folder ({', '.join(map(str, bridge.ensure_model_folder(SAM_FOLDER)))}); the official ones are "
            f"{_OFFICIAL} from {seg.SAM_CHECKPOINTS_URL} (REPARO uses vit_h)")


class LoadSAM(io.ComfyNode):
    """A Segment Anything checkpoint from models/sams."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_LoadSAM",
            description=f"Load a Segment Anything (SAM) checkpoint from ComfyUI's models/{SAM_FOLDER} folder: the "
                        f"official .pth files ({_OFFICIAL}) or .safetensors with the same keys. The output plugs "
                        "into SAM Segment Objects (and other packs' SAM_MODEL inputs).",
            inputs=[
                io.Combo.Input("sam_file", options=bridge.list_model_files(SAM_FOLDER, SAM_EXTENSIONS),
                               tooltip=f"Checkpoint in models/{SAM_FOLDER} (.pth, .pt or .safetensors). Official: "
                                       f"{_OFFICIAL} ({seg.SAM_CHECKPOINTS_URL})."),
                io.Combo.Input("model_type", options=list(seg.MODEL_TYPES), default="auto",
                               tooltip="auto reads the architecture from the file (vit_b, vit_l, vit_h or a "
                                       "smaller custom SAM); naming one checks the file is that model."),
                io.Combo.Input("device", options=list(DEVICES), default="auto",
                               tooltip="auto: ComfyUI's compute device (GPU when there is one); cpu keeps SAM "
                                       "off the GPU (vit_h needs ~2.5 GB there)."),
            ],
            outputs=[SamModel.Output("sam_model", display_name="sam_model",
                                     tooltip="The segment_anything Sam model, in eval mode.")],
        )

    @classmethod
    def validate_inputs(cls, sam_file: str) -> bool | str:
        try:
            bridge.resolve_model_file(SAM_FOLDER, sam_file)
        except (ValueError, FileNotFoundError) as exc:
            return _missing_checkpoint(sam_file, str(exc))
        return True

    @classmethod
    def fingerprint_inputs(cls, sam_file: str, **_):
        return bridge.file_fingerprint(sam_file, lambda name: bridge.resolve_model_file(SAM_FOLDER, name))

    @classmethod
    def execute(cls, sam_file: str, model_type: str, device: str) -> io.NodeOutput:
        try:
            path = bridge.resolve_model_file(SAM_FOLDER, sam_file)
        except (ValueError, FileNotFoundError) as exc:
            raise FileNotFoundError(_missing_checkpoint(sam_file, str(exc))) from None
        try:
            sam = seg.load_sam(path, model_type, device=bridge.torch_device() if device == "auto" else "cpu")
        except ValueError as exc:
            raise ValueError(f"Load SAM Model: {sam_file}: {exc}") from None
        return io.NodeOutput(sam)


class SAMSegmentObjects(io.ComfyNode):
    """REPARO 3.1: one SAM mask per object box."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "MPOD3D_SAMSegmentObjects",
            description="Segment each object of an image with SAM from its bounding box (REPARO 3.1): one mask per "
                        "box, in box order. Boxes come from the boxes text (JSON, pixels) or from rough box_masks; "
                        "give one of them. Feed the masks to Crop Objects.",
            inputs=[
                SamModel.Input("sam_model", tooltip="From Load SAM Model (or another pack's SAM loader)."),
                io.Image.Input("image", tooltip="The image with several objects (the first of a batch is used)."),
                io.String.Input("boxes", default="", multiline=True,
                                tooltip="Object boxes in the image's pixels as JSON: [[x0, y0, x1, y1], ...] or one "
                                        "[x0, y0, x1, y1]; Crop Objects' crop_boxes output is read too. Boxes "
                                        "partly outside the image are clipped. Leave empty when box_masks is "
                                        "connected (giving both is an error)."),
                io.Mask.Input("box_masks", optional=True,
                              tooltip="Instead of boxes: rough masks, 1 = object. A batch of K masks gives one box "
                                      "each; a single mask gives one box per connected region (regions under "
                                      "0.1% of the image are ignored as specks)."),
                io.Float.Input("threshold", default=0.5, min=0.01, max=0.99, step=0.01, optional=True,
                               tooltip="Mask probability above which a pixel is object; 0.5 is SAM's own "
                                       "threshold, higher gives tighter masks."),
            ],
            outputs=[
                io.Mask.Output("object_masks", display_name="masks",
                               tooltip="One mask per box (K, H, W), at the image's size, 1 = object."),
                io.String.Output("used_boxes", display_name="boxes",
                                 tooltip="JSON [[x0, y0, x1, y1], ...]: the boxes used (clipped), in mask order."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="The image with each mask tinted a colour and its box outlined."),
            ],
        )

    @classmethod
    def execute(cls, sam_model, image, boxes: str = "", box_masks=None, threshold: float = 0.5) -> io.NodeOutput:
        if not hasattr(sam_model, "image_encoder") or not hasattr(sam_model, "mask_decoder"):
            raise ValueError(f"SAM Segment Objects: sam_model: expected a segment_anything Sam (from Load SAM "
                             f"Model), got {type(sam_model).__name__}")
        check_image(image, "SAM Segment Objects")
        picture = image[0, ..., :3].float()
        h, w = picture.shape[:2]
        text = (boxes or "").strip()
        if box_masks is not None and text:
            raise ValueError("SAM Segment Objects: both boxes and box_masks are given: clear the boxes text or "
                             "disconnect box_masks")
        if box_masks is not None:
            masks = check_masks(box_masks, "SAM Segment Objects", "box_masks", size=(h, w))
            try:
                box_tensor = seg.boxes_from_masks(masks)
            except ValueError as exc:
                raise ValueError(f"SAM Segment Objects: box_masks: {exc}") from None
        else:
            try:
                box_tensor = seg.parse_boxes(text, w, h)
            except ValueError as exc:
                raise ValueError(f"SAM Segment Objects: boxes: {exc}") from None
        chunks = -(-len(box_tensor) // seg.DEFAULT_CHUNK)
        masks_out = seg.segment_boxes(sam_model, picture, box_tensor, threshold=threshold, chunk=seg.DEFAULT_CHUNK,
                                      progress=bridge.Progress(1 + chunks))  # also checks for Cancel
        preview = seg.overlay_masks(picture, masks_out, box_tensor)
        return io.NodeOutput(masks_out.cpu(), seg.boxes_to_json(box_tensor), preview[None].cpu())


NODES = [LoadSAM, SAMSegmentObjects]
